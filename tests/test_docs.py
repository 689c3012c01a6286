"""The README stays true: its settings table and set-up commands match the code."""

from __future__ import annotations

from pathlib import Path

from vqsearch.service import Settings

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_lists_every_setting():
    """Every Settings field appears in the README's settings table as VQSEARCH_<NAME>."""
    missing = [
        f"VQSEARCH_{n.upper()}"
        for n in Settings.model_fields
        if f"`VQSEARCH_{n.upper()}`" not in README
    ]
    assert not missing


def test_readme_set_up_is_make_run_and_make_test():
    """The two set-up commands are the Makefile targets CI runs."""
    assert "make run" in README and "make test" in README
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "make test" in ci and "make check" in ci
