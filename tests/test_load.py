"""`vqsearch load`: files straight into a data dir's bank, under the data dir's writer lock."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import brute_force
from tests.service.conftest import app_client
from vqsearch._load import LoadError, load
from vqsearch.index import Bank
from vqsearch.service import Settings
from vqsearch.service._lock import DataDirLock


def _files(tmp_path: Path, rng: np.random.Generator) -> tuple[list[Path], np.ndarray]:
    a = rng.standard_normal((130, 8)).astype(np.float32)
    b = rng.standard_normal((70, 8))  # float64: converted
    c = rng.standard_normal((25, 8)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    np.savez(tmp_path / "c.npz", vectors=c, ids=np.arange(1000, 1025))
    files = [tmp_path / "a.npy", tmp_path / "b.npy", tmp_path / "c.npz"]
    return files, np.concatenate([a, b.astype(np.float32), c])


async def test_files_become_a_bank_the_server_then_serves(tmp_path, rng):
    """Rows land in order with default ids, then the .npz's own ids; slabs of 10 rows make
    23 segments, folded into one at the end; a server on the data dir serves the bank, and
    its exact answers are float64's."""
    files, x = _files(tmp_path, rng)
    out = io.StringIO()
    assert load(tmp_path / "data", "emb", files, "l2", chunk_bytes=10 * 8 * 4, out=out) == 225
    assert "100%" in out.getvalue() and "vectors/s" in out.getvalue()
    bank = Bank.open(tmp_path / "data" / "banks" / "emb")
    ids = np.concatenate([np.arange(200), np.arange(1000, 1025)])
    np.testing.assert_array_equal(bank.ids(), ids)
    np.testing.assert_array_equal(bank.vectors(), x)
    assert bank.num_segments == 1
    settings = Settings(data_dir=tmp_path / "data", device="cpu")
    xq = rng.standard_normal((9, 8)).astype(np.float32)
    async with app_client(settings) as api:
        r = await api.post("/v1/banks/emb/search?k=3", json={"queries": xq.tolist()})
        assert r.status_code == 200
    np.testing.assert_array_equal(r.json()["ids"], ids[brute_force(xq, x, 3, "l2")[1]])


def test_appends_to_an_existing_bank_and_checks_it(tmp_path, rng):
    """A second load appends (default ids continue); a width or metric the bank does not
    have, a non-matrix, or a bad name is refused before anything is written."""
    files, _ = _files(tmp_path, rng)
    load(tmp_path / "data", "emb", files[:1], "cosine", out=io.StringIO())
    load(tmp_path / "data", "emb", files[1:2], out=io.StringIO())
    bank = Bank.open(tmp_path / "data" / "banks" / "emb")
    assert bank.ntotal == 200 and bank.ids()[-1] == 199 and bank.metric == "cosine"
    version = bank.version
    np.save(tmp_path / "wide.npy", np.zeros((3, 9), np.float32))
    np.save(tmp_path / "flat.npy", np.zeros(9, np.float32))
    cases = [
        ([files[0], tmp_path / "wide.npy"], None, "emb", "has d=8"),
        ([tmp_path / "flat.npy"], None, "emb", "(n, d) matrices"),
        (files[:1], "l2", "emb", "metric cosine"),
        (files[:1], None, "../up", "must match"),
        (files[:1], None, "emb2\n", "must match"),  # the service refuses it too
    ]
    for fs, metric, name, words in cases:
        with pytest.raises(LoadError, match=words.replace("(", r"\(").replace(")", r"\)")):
            load(tmp_path / "data", name, fs, metric, out=io.StringIO())
    again = Bank.open(tmp_path / "data" / "banks" / "emb")
    assert again.version == version and again.ntotal == 200
    assert sorted(p.name for p in (tmp_path / "data" / "banks").iterdir()) == ["emb"]


def test_refused_while_another_process_writes_the_data_dir(tmp_path, rng):
    """The writer lock a server holds: the CLI exits 1 naming the holder, writing nothing."""
    files, _ = _files(tmp_path, rng)
    cli = [sys.executable, "-m", "vqsearch", "load", "--bank", "emb"]
    cli += ["--data-dir", str(tmp_path / "data"), *map(str, files)]
    held = DataDirLock(tmp_path / "data")
    held.acquire()
    try:
        r = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    finally:
        held.release()
    assert r.returncode == 1 and "in use by another vqsearch server" in r.stderr
    assert not (tmp_path / "data" / "banks").exists()
    ok = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert Bank.open(tmp_path / "data" / "banks" / "emb").ntotal == 225
