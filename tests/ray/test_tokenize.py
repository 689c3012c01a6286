"""`vqsearch tokenize --ray` on the test cluster: Ray Data codes the files on the nodes, the
same codes as in process (float64 brute force), and a rerun finishes only what failed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.test_tokenize import codebook, expected, latents, make_bank, read, tokenize


def test_on_ray_the_codes_equal_brute_force_and_a_rerun_resumes(cluster, tmp_path: Path, rng,
                                                                 capsys):  # fmt: skip
    cb = codebook(rng)
    ids = np.arange(len(cb))
    make_bank(tmp_path / "data", cb, ids)
    arrays = latents(rng, tmp_path / "in", cb)
    for i in range(6):  # more files than nodes
        np.save(tmp_path / "in" / f"more{i}.npy", arrays["c.npy"][i * 30 : (i + 1) * 30])
    good = (tmp_path / "in" / "c.npy").read_bytes()
    (tmp_path / "in" / "c.npy").write_bytes(good[:100])
    out = tmp_path / "out"
    args = ("--input", tmp_path / "in", "--output", out, "--channel-axis", "1",
            "--data-dir", tmp_path / "data", "--ray", cluster.address)  # fmt: skip
    assert tokenize(*args) == 1
    assert "failed: c.npy" in capsys.readouterr().err
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert sorted(files) == ["a.npy", *(f"more{i}.npy" for i in range(6)), "sub/b.npz"]

    (tmp_path / "in" / "c.npy").write_bytes(good)
    assert tokenize(*args) == 0
    assert "1 files to tokenize" in capsys.readouterr().err
    got, want = read(out), expected(arrays, cb, ids)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    for i in range(6):
        np.testing.assert_array_equal(
            np.load(out / f"more{i}.npy"), want["c.npy"][i * 30 : (i + 1) * 30]
        )
