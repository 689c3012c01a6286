"""`vqsearch tokenize`: every array of a directory of latents becomes its codes, equal to
`nearest` (and float64 brute force); the manifest names what made them, and a rerun after a
failed or interrupted run finishes only the rest."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import brute_force
from tests.service.conftest import Server
from vqsearch import _tokenize
from vqsearch.__main__ import main
from vqsearch.client import Client
from vqsearch.index import Bank

D = 8


def codebook(rng: np.random.Generator, n: int = 300) -> np.ndarray:
    """A trained codebook's shape: clusters of codes, far from the origin."""
    centres = rng.standard_normal((12, D)).astype(np.float32) * 3 + 20
    return centres[rng.integers(0, 12, n)] + rng.standard_normal((n, D)).astype(np.float32)


def latents(rng: np.random.Generator, src: Path, cb: np.ndarray) -> dict[str, np.ndarray]:
    """Files in src, channels on axis 1: an (B, C, H, W) .npy, an .npz of an (N, C) and an
    (B, C, T) array in a sub-directory, an (N, C) .npy of codes plus noise."""
    near = cb[rng.integers(0, len(cb), 200)] + 0.01 * rng.standard_normal((200, D))
    arrays = {
        "a.npy": (cb[rng.integers(0, len(cb), (2, 3, 4))] + 0.3).transpose(0, 3, 1, 2),
        "sub/b.npz:x": near[:50].astype(np.float32),
        "sub/b.npz:y": near[50:80].reshape(2, 15, D).transpose(0, 2, 1).astype(np.float64),
        "c.npy": near.astype(np.float32),
    }
    (src / "sub").mkdir(parents=True)
    np.save(src / "a.npy", arrays["a.npy"].astype(np.float32))
    np.savez(src / "sub" / "b.npz", x=arrays["sub/b.npz:x"], y=arrays["sub/b.npz:y"])
    np.save(src / "c.npy", arrays["c.npy"])
    return arrays


def expected(arrays: dict[str, np.ndarray], cb: np.ndarray, ids: np.ndarray) -> dict:
    """float64 brute force over the codebook, channels on axis 1."""
    out = {}
    for key, z in arrays.items():
        v = np.moveaxis(z, 1, -1)
        _, I = brute_force(v.reshape(-1, D), cb, 1, "l2")
        out[key] = ids[I[:, 0]].reshape(v.shape[:-1])
    return out


def read(dst: Path) -> dict[str, np.ndarray]:
    with np.load(dst / "sub" / "b.npz") as z:
        b = {f"sub/b.npz:{m}": z[m] for m in z.files}
    return {"a.npy": np.load(dst / "a.npy"), **b, "c.npy": np.load(dst / "c.npy")}


def tokenize(*args: str | Path) -> int:
    return main(["tokenize", "--bank", "cb", *map(str, args)])


def make_bank(data: Path, cb: np.ndarray, ids: np.ndarray) -> Bank:
    bank = Bank.create(data / "banks" / "cb", D, "l2")
    bank.add(cb, ids)
    return bank


@pytest.mark.parametrize("chunk", [1 << 16, 5])
def test_in_process_codes_equal_brute_force(tmp_path: Path, rng, capsys, monkeypatch, chunk):
    """Whole files at once, and in slabs of a few vectors (the slabs of a big file)."""
    monkeypatch.setattr(_tokenize, "CHUNK", chunk)
    cb = codebook(rng)
    ids = np.arange(len(cb))
    make_bank(tmp_path / "data", cb, ids)
    arrays = latents(rng, tmp_path / "in", cb)
    out = tmp_path / "out"
    rc = tokenize("--input", tmp_path / "in", "--output", out, "--channel-axis", "1",
                  "--data-dir", tmp_path / "data")  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    got, want = read(out), expected(arrays, cb, ids)
    for key in want:
        assert got[key].dtype == np.int16, key  # 300 codes fit
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert got["a.npy"].shape == (2, 3, 4)  # (B, C, H, W) -> (B, H, W)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["a.npy", "c.npy", "sub/b.npz"]
    assert manifest["files"]["sub/b.npz"] == {"shapes": {"x": [50], "y": [2, 15]}, "vectors": 80}
    assert manifest["version"] == Bank.open(tmp_path / "data" / "banks" / "cb").version


def test_a_rerun_finishes_only_what_did_not_finish(tmp_path: Path, rng, capsys):
    cb = codebook(rng)
    ids = np.arange(len(cb)) * 1000  # ids up to 299,000: int32 codes
    make_bank(tmp_path / "data", cb, ids)
    arrays = latents(rng, tmp_path / "in", cb)
    good = (tmp_path / "in" / "c.npy").read_bytes()
    (tmp_path / "in" / "c.npy").write_bytes(good[:200])  # truncated: this file fails
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "b.npz.part").write_bytes(b"half a file an interrupted run left")
    args = ("--input", tmp_path / "in", "--output", out, "--channel-axis", "1",
            "--data-dir", tmp_path / "data")  # fmt: skip
    assert tokenize(*args) == 1
    err = capsys.readouterr().err
    assert "failed: c.npy" in err
    assert sorted(json.loads((out / "manifest.json").read_text())["files"]) == [
        "a.npy",
        "sub/b.npz",
    ]
    assert not (out / "c.npy").exists()
    before = {f: os.stat(out / f).st_mtime_ns for f in ("a.npy", "sub/b.npz")}

    (tmp_path / "in" / "c.npy").write_bytes(good)
    assert tokenize(*args) == 0
    err = capsys.readouterr().err
    assert "1 files to tokenize" in err
    assert {f: os.stat(out / f).st_mtime_ns for f in before} == before  # not redone
    got, want = read(out), expected(arrays, cb, ids)
    for key in want:
        assert got[key].dtype == np.int32, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert tokenize(*args) == 0  # all done: nothing to do
    assert "0 files to tokenize" in capsys.readouterr().err


def test_an_output_inside_the_input_is_not_read_as_latents(tmp_path: Path, rng, capsys):
    cb = codebook(rng)
    make_bank(tmp_path / "data", cb, np.arange(len(cb)))
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "z.npy", cb[:9])
    args = ("--input", tmp_path / "in", "--output", tmp_path / "in" / "codes",
            "--data-dir", tmp_path / "data")  # fmt: skip
    assert tokenize(*args) == 0
    np.save(tmp_path / "in" / "y.npy", cb[3:5])
    assert tokenize(*args) == 0  # codes/z.npy (int16, 1-d) is not taken for latents
    assert "1 files to tokenize" in capsys.readouterr().err
    assert np.load(tmp_path / "in" / "codes" / "y.npy").tolist() == [3, 4]


def test_codes_of_another_version_are_not_mixed_in(tmp_path: Path, rng, capsys):
    cb = codebook(rng)
    bank = make_bank(tmp_path / "data", cb, np.arange(len(cb)))
    latents(rng, tmp_path / "in", cb)
    args = ("--input", tmp_path / "in", "--output", tmp_path / "out", "--channel-axis", "1",
            "--data-dir", tmp_path / "data")  # fmt: skip
    assert tokenize(*args) == 0
    bank.add(cb[:5] + 1.0)  # the codebook changed
    (tmp_path / "in" / "d.npy").write_bytes((tmp_path / "in" / "c.npy").read_bytes())
    assert tokenize(*args) == 1
    err = capsys.readouterr().err
    assert "TokenizeError" in err and "use another --output" in err
    assert not (tmp_path / "out" / "d.npy").exists()


def test_wrong_shapes_fail_that_file_only(tmp_path: Path, rng, capsys):
    cb = codebook(rng)
    make_bank(tmp_path / "data", cb, np.arange(len(cb)))
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "bad.npy", np.zeros((4, D + 1), np.float32))
    np.save(tmp_path / "in" / "ok.npy", cb[:7])
    np.save(tmp_path / "in" / "one.npy", cb[5])  # (d,): one vector, one code
    np.save(tmp_path / "in" / "none.npy", np.zeros((0, 3, D), np.float32))  # empty is valid
    rc = tokenize("--input", tmp_path / "in", "--output", tmp_path / "out",
                  "--data-dir", tmp_path / "data")  # fmt: skip
    assert rc == 1
    assert "bad.npy: ValueError: shape (4, 9): 9 channels, the bank has d = 8" in (
        capsys.readouterr().err
    )
    assert np.load(tmp_path / "out" / "ok.npy").tolist() == list(range(7))
    assert np.load(tmp_path / "out" / "one.npy").tolist() == 5
    assert np.load(tmp_path / "out" / "none.npy").shape == (0, 3)


def test_unknown_bank_and_missing_input_are_named(tmp_path: Path, capsys):
    rc = tokenize("--input", tmp_path / "nowhere", "--output", tmp_path / "out",
                  "--data-dir", tmp_path / "data")  # fmt: skip
    assert rc == 1
    assert "vqsearch tokenize:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_through_a_server_the_codes_equal_nearest(tmp_path: Path, rng, capsys):
    cb = codebook(rng)
    arrays = latents(rng, tmp_path / "in", cb)
    srv = Server(tmp_path / "srv").start()
    try:
        with Client(srv.url) as c:
            c.create_bank("cb", cb)
            rc = tokenize("--input", tmp_path / "in", "--output", tmp_path / "out",
                          "--channel-axis", "1", "--server", srv.url)  # fmt: skip
            assert rc == 0, capsys.readouterr().err
            got = read(tmp_path / "out")
            for key, z in arrays.items():
                codes = c.nearest("cb", z.astype(np.float32), channel_axis=1).codes
                np.testing.assert_array_equal(got[key], codes, err_msg=key)
            want = expected(arrays, cb, np.arange(len(cb)))
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    finally:
        srv.stop()
