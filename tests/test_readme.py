"""The README's code runs as shown: every ```python block as a script, every ```sh block
against a demo server, except the blocks whose commands this test cannot run (listed in SKIP).

A block that fails fails the test with its output. The server is `python -m vqsearch serve` on
127.0.0.1 with its own data dir and `VQSEARCH_DEMO=1`; the README's `:8000` is rewritten to its
port. Every block runs in a fresh temporary directory holding a `.venv` link to this venv, so the
README's `.venv/bin/...` commands work as they do from the checkout.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.conftest import Server

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.S | re.M)
PORT = re.compile(r"\b(?:127\.0\.0\.1|localhost):8000\b")

# Commands no test here can run, by first word: a block made only of these is not run, and a
# block mixing them with runnable commands fails (split it). Anything else in a sh block runs.
SKIP = {
    "make": "builds and tests the checkout itself (make test would run this test again)",
    "docker": "needs a Docker daemon and builds images",
    "ray": "starts a Ray cluster on this host's network (tests/ray runs one in a loopback-only "
    "network namespace)",
}
# Blocks that must run again as they are (the engine example writes to a new temp dir, the
# client example deletes the bank it made): run twice here.
TWICE = ("from vqsearch.index import", "from vqsearch.client import")
# `vqsearch compare` times each setting for 0.2 s at 3 batch sizes (a minute on 2 cores for
# the --npy example); these options make the same sweep a few seconds, its output unchanged.
FAST_COMPARE = "--min-seconds 0.01 --batch-sizes 1 64 --n-queries 200"
TIMEOUT = 300  # seconds for one block


def blocks(lang: str) -> list[str]:
    return [code for kind, code in BLOCK.findall(README) if kind == lang]


def commands(block: str) -> list[str]:
    """The block's shell commands: continuation lines joined, comments and blanks dropped."""
    joined = block.replace("\\\n", " ")
    return [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.startswith("#")]


def first_word(command: str) -> str:
    """The program a command runs, after any leading VAR=value assignments."""
    words = shlex.split(command, comments=True)
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        words.pop(0)
    return words[0] if words else ""


def skipped(block: str) -> str | None:
    """The reason a block is not run, or None to run it; a mixed block is an error."""
    words = {first_word(c) for c in commands(block)}
    if not words & SKIP.keys():
        return None
    assert words <= SKIP.keys(), f"block mixes unrunnable {words & SKIP.keys()} with the rest"
    return "; ".join(sorted(SKIP[w] for w in words))


def run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, f"exit {r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("readme") / "data", VQSEARCH_DEMO="1")
    try:
        yield srv.start()
    finally:
        srv.stop()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A fresh cwd with `.venv` pointing at this interpreter's venv."""
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    return tmp_path


def env_for(workdir: Path) -> dict[str, str]:
    # TMPDIR: the engine example's tempfile.mkdtemp() lands under pytest's tmp_path
    return {**os.environ, "TMPDIR": str(workdir), "PYTHONWARNINGS": "error"}


def test_readme_blocks_are_found():
    """The README's languages are python and sh only, and the blocks this test knows are there;
    it skips exactly the set-up block (make), the deployment block (docker compose) and the
    block that starts a Ray cluster."""
    assert {kind for kind, _ in BLOCK.findall(README)} == {"python", "sh"}
    assert len(blocks("python")) == 2 and len(blocks("sh")) == 6
    reasons = [skipped(b) for b in blocks("sh")]
    assert reasons == [SKIP["make"], None, SKIP["docker"], SKIP["ray"], None, None]
    assert all(any(t in b for b in blocks("python")) for t in TWICE)


@pytest.mark.parametrize("i", range(len(blocks("python"))))
def test_python_block_runs(i: int, server: Server, workdir: Path):
    code = PORT.sub(f"127.0.0.1:{server.port}", blocks("python")[i])
    for _ in range(2 if any(t in code for t in TWICE) else 1):
        run([sys.executable, "-c", code], workdir, env_for(workdir))
    assert not (workdir / "data").exists()  # nothing written into ./data, the server's place


@pytest.mark.parametrize("i", range(len(blocks("sh"))))
def test_sh_block_runs(i: int, server: Server, workdir: Path):
    block = blocks("sh")[i]
    reason = skipped(block)
    if reason is not None:
        pytest.skip(f"not run: {reason}")
    script = PORT.sub(f"127.0.0.1:{server.port}", block)
    script = re.sub(
        r"(vqsearch compare\b[^#\n]*?)(\s*(?:#.*)?)$", rf"\1 {FAST_COMPARE}\2", script, flags=re.M
    )
    # a failing command or an HTTP error answer fails the block
    prelude = 'set -euo pipefail\ncurl() { command curl --fail-with-body --max-time 60 "$@"; }\n'
    r = run(["bash", "-c", prelude + script], workdir, env_for(workdir))
    for command in commands(block):
        if "compare" in command:  # what the README says it writes
            out = Path(shlex.split(command, comments=True)[-1])
            assert (workdir / out.with_suffix(".json")).is_file(), r.stdout
            assert (workdir / out.with_suffix(".png")).is_file(), r.stdout
