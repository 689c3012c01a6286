"""Bad and unusual input: empty batches, `d` on create, and clear, consistently shaped errors."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest

from .conftest import CODEBOOK, npy

NPY, NPZ = {"content-type": "application/x-npy"}, {"content-type": "application/x-npz"}
D = CODEBOOK.shape[1]


def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def load(r):
    kind = r.headers["content-type"]
    if "x-npy" in kind:
        return {"": np.load(io.BytesIO(r.content))}
    if "x-npz" in kind:
        with np.load(io.BytesIO(r.content)) as z:
            return {k: z[k] for k in z.files}
    return r.json()


async def _index(api, spec="PQ8x4fs,RFlat"):
    assert (await api.put(f"/v1/banks/cb/index?spec={spec}")).status_code == 202
    for _ in range(400):
        if (await api.get("/v1/banks/cb")).json()["index"]["state"] == "ready":
            return
        await asyncio.sleep(0.05)
    raise AssertionError("index not ready")


@pytest.mark.parametrize("mode", ["exact", "approx", "auto"])
@pytest.mark.parametrize("k", [1, 5])
async def test_empty_search_in_every_format_and_mode(api, mode, k):
    """0 queries: 200 with (0, k) ids int64 and distances float32, in JSON, .npy and .npz."""
    await _index(api)
    empty = np.zeros((0, D), np.float32)
    url = f"/v1/banks/cb/search?k={k}&mode={mode}"
    r = await api.post(url, json={"queries": []})
    assert r.status_code == 200, r.text
    assert r.json()["ids"] == [] and r.json()["distances"] == []
    r = await api.post(url, content=npy(empty), headers=NPY)
    assert r.status_code == 200, r.text
    out = load(r)
    assert out["ids"].shape == (0, k) and out["ids"].dtype == np.int64
    assert out["distances"].shape == (0, k) and out["distances"].dtype == np.float32
    r = await api.post(
        url.split("?")[0] + f"?mode={mode}", content=npz(queries=empty, k=k), headers=NPZ
    )
    assert r.status_code == 200 and load(r)["ids"].shape == (0, k)


@pytest.mark.parametrize("mode", ["exact", "approx"])
async def test_empty_nearest_keeps_the_layout(api, mode):
    """(0, d) -> codes (0,); (2, d, 0, 4) with channel_axis=1 -> codes (2, 0, 4), quantized
    (2, d, 0, 4), errors (2, 0, 4), each in its dtype."""
    await _index(api)
    r = await api.post(
        f"/v1/banks/cb/nearest?mode={mode}", content=npy(np.zeros((0, D), np.float32)), headers=NPY
    )
    assert r.status_code == 200 and load(r)[""].shape == (0,) and load(r)[""].dtype == np.int64
    z = np.zeros((2, D, 0, 4), np.float32)
    url = (
        f"/v1/banks/cb/nearest?mode={mode}&channel_axis=1"
        "&return_quantized=true&return_error=true&codes_dtype=int16"
    )
    out = load(await api.post(url, content=npy(z), headers=NPY))
    assert out["codes"].shape == (2, 0, 4) and out["codes"].dtype == np.int16
    assert out["quantized"].shape == (2, D, 0, 4) and out["quantized"].dtype == np.float32
    assert out["errors"].shape == (2, 0, 4) and out["errors"].dtype == np.float32
    # JSON cannot carry a trailing axis after an empty one: (2, d, 0) -> codes (2, 0)
    r = await api.post(url, json={"queries": z.tolist()})
    assert r.status_code == 200 and np.array(r.json()["codes"]).shape == (2, 0)


async def test_empty_decode_and_append(api):
    r = await api.post("/v1/banks/cb/decode", content=npy(np.zeros((3, 0), np.int64)), headers=NPY)
    assert r.status_code == 200 and load(r)[""].shape == (3, 0, D)
    r = await api.post("/v1/banks/cb/decode", json={"codes": []})
    assert r.status_code == 200 and r.json()["vectors"] == []
    r = await api.post(
        "/v1/banks/cb/vectors", content=npy(np.zeros((0, D), np.float32)), headers=NPY
    )
    assert r.status_code == 200 and load(r)[""].shape == (0,)


async def test_d_on_create(api):
    """`d` that contradicts the vectors is a 422; `d` alone, no body, makes an empty bank."""
    r = await api.put("/v1/banks/x?d=8", json={"vectors": [[1.0, 2.0]]})
    assert r.status_code == 422 and "d=8" in r.json()["detail"] and "d=2" in r.json()["detail"]
    r = await api.put("/v1/banks/x?d=8")
    assert r.status_code == 201 and r.json()["d"] == 8 and r.json()["count"] == 0
    r = await api.post("/v1/banks/x/vectors", json={"vectors": [[1.0] * 8]})
    assert r.status_code == 200 and r.json()["ids"] == [0]
    r = await api.put("/v1/banks/y")
    assert r.status_code == 422 and "'d'" in r.json()["detail"]


def _shape(r) -> None:
    """The one error shape: a string `detail`, and `errors`, each with loc, msg and type."""
    body = r.json()
    assert set(body) == {"detail", "errors"} and isinstance(body["detail"], str), body
    assert body["errors"] and all(set(e) == {"loc", "msg", "type"} for e in body["errors"])


async def test_every_error_has_one_shape(api):
    answers = [
        await api.get("/v1/banks/nope"),  # 404
        await api.put("/v1/banks/cb?d=4"),  # 409
        await api.post("/v1/banks/cb/search?k=0", json={"queries": [[0.0] * D]}),  # 422 query
        await api.post("/v1/banks/cb/search", json={"queries": [[0.0] * 3]}),  # 422 engine
        await api.post(
            "/v1/banks/cb/search", content=b"{", headers={"content-type": "application/json"}
        ),
        await api.post("/v1/banks/cb/search", content=b"x", headers={"content-type": "text/plain"}),
        await api.post("/v1/banks/cb/search", content=b"x" * (5 << 20), headers=NPY),  # 413
        await api.put("/v1/banks/bad name!?d=4"),  # 422 path
        await api.post("/v1/banks/cb/search?mode=approx", json={"queries": [[0.0] * D]}),  # 409
    ]
    assert [r.status_code for r in answers] == [404, 409, 422, 422, 400, 415, 413, 422, 409]
    for r in answers:
        _shape(r)


async def test_messages_name_the_problem(api):
    q = {"queries": [[0.0] * D]}
    r = await api.post("/v1/banks/cb/search", content=b'{"queries": [[1, 2]]}', headers=NPY)
    assert r.status_code == 400 and "not a .npy array" in r.json()["detail"]
    assert "application/json" in r.json()["detail"] and "pickle" not in r.json()["detail"]
    big = {"vectors": np.zeros((200, D)).tolist()}
    r = await api.post("/v1/banks/cb/search", json=big)
    assert r.status_code == 422 and "unknown field 'vectors'" in r.json()["detail"]
    assert "queries" in r.json()["detail"] and len(r.text) < 500  # the input is not echoed
    r = await api.post("/v1/banks/cb/search", json={"queries": [["a"] * D]})
    assert r.status_code == 422 and "got strings" in r.json()["detail"]
    r = await api.post("/v1/banks/cb/search?k=3", json={**q, "k": 5})
    assert r.status_code == 422 and "'k' given in both" in r.json()["detail"]
    for url, words in [
        ("/v1/banks/cb/search?nprobe=4", "nprobe applies to mode=approx"),
        ("/v1/banks/cb/search?k_factor=4&mode=auto", "k_factor applies to mode=approx"),
        ("/v1/banks/cb/search?target_recall=0.9", "target_recall applies to mode=auto"),
        ("/v1/banks/cb/nearest?target_recall=0.9&mode=approx", "target_recall applies"),
    ]:
        r = await api.post(url, json=q)
        assert r.status_code == 422 and words in r.json()["detail"], (url, r.text)
    r = await api.post(
        "/v1/banks/cb/search",
        content=npz(queries=np.zeros((1, D)), return_quantized=np.array(3.5)),
        headers=NPZ,
    )
    assert r.status_code == 422 and "return_quantized" in r.json()["detail"]


async def test_search_parameters_that_do_not_apply_to_the_index(api):
    """nprobe on an index without IVF is a 422; k_factor applies to every index (RFlat's
    copy or the bank re-ranks the shortlist); the setting header names only what applies,
    and k_factor is always a float."""
    q = {"queries": CODEBOOK[:2].tolist()}
    await _index(api, "PQ8x4fs")
    r = await api.post("/v1/banks/cb/search?mode=approx&nprobe=4", json=q)
    assert r.status_code == 422 and "IVF" in r.json()["detail"]
    r = await api.post("/v1/banks/cb/search?mode=approx&k_factor=8", json=q)
    assert r.headers["x-vqsearch-setting"] == "PQ8x4fs;k_factor=8.0"
    r = await api.post("/v1/banks/cb/search?mode=approx", json=q)
    assert r.headers["x-vqsearch-setting"] == "PQ8x4fs;k_factor=4.0" and r.json()["setting"] == {
        "spec": "PQ8x4fs",
        "k_factor": 4.0,
    }
    await _index(api, "IVF16,PQ8x4fs,RFlat")
    r = await api.post("/v1/banks/cb/search?mode=approx&k_factor=8", json=q)
    assert r.headers["x-vqsearch-setting"] == "IVF16,PQ8x4fs,RFlat;nprobe=2;k_factor=8.0"
    assert r.json()["setting"] == {"spec": "IVF16,PQ8x4fs,RFlat", "nprobe": 2, "k_factor": 8.0}
    info = (await api.get("/v1/banks/cb")).json()["index"]
    assert isinstance(info["k_factor"], float)


def _header(shape: str) -> bytes:
    head = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}"
    head += " " * (63 - (10 + len(head)) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little") + head.encode()


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (npy(np.zeros((2, D), ">f4")), None),  # big-endian: converted, served
        (npy(np.zeros((2, D), np.float32)).replace(b"(2, 16)", b"(2  16)"), "not a readable .npy"),
        (npy(np.zeros((2, D), np.float32)).replace(b"}", b" "), "not a readable .npy"),
        (_header("(1000000000000, 16)") + b"\0" * 128, "bytes of data"),  # a claimed 64 TB
    ],
)
async def test_malformed_npy(api, body, words):
    r = await api.post("/v1/banks/cb/nearest", content=body, headers=NPY)
    if words is None:
        assert r.status_code == 200 and load(r)[""].shape == (2,)
    else:
        assert r.status_code == 400 and words in r.json()["detail"], r.text


async def test_huge_json_integers_and_deep_nesting(api):
    big = b'{"queries": [[' + b", ".join([b"18446744073709551616"] * D) + b"]]}"
    r = await api.post(
        "/v1/banks/cb/search", content=big, headers={"content-type": "application/json"}
    )
    assert r.status_code == 422 and "beyond 64 bits" in r.json()["detail"]
    r = await api.post("/v1/banks/cb/search", json={"queries": [[2**63] * D]})
    assert r.status_code == 200  # a (huge but finite) float32 query
    r = await api.request("DELETE", "/v1/banks/cb/vectors", json={"ids": [2**63]})
    assert r.status_code == 422 and "2**63" in r.json()["detail"]
    deep = b'{"queries": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = await api.post(
        "/v1/banks/cb/search", content=deep, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "nested too deeply" in r.json()["detail"]
