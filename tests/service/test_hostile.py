"""Hostile sequences against a real server process: a stale append racing a delete and a
re-create, rows faiss cannot train on, a build the process died in."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from .conftest import Server, npy

NPY = {"content-type": "application/x-npy"}
D = 8


def _rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


def _alive(srv: Server) -> None:
    """The server process is still running (else: its exit status and the tail of stderr)."""
    assert srv.proc is not None
    code = srv.proc.poll()
    if code is None:
        return
    tail = srv.proc.stderr.read().decode(errors="replace")[-2000:] if srv.proc.stderr else ""
    raise AssertionError(f"the server process died (exit status {code}): {tail}")


def _index(c: httpx.Client, name: str) -> dict[str, Any]:
    r = c.get(f"/v1/banks/{name}")
    assert r.status_code == 200, r.text
    return r.json()["index"] or {}


def _settle(srv: Server, c: httpx.Client, name: str, seconds: float = 60) -> dict[str, Any]:
    """Poll the bank's index until no build is under way (bounded); the server must live."""
    deadline = time.monotonic() + seconds
    while True:
        _alive(srv)
        index = _index(c, name)
        if index.get("state") not in ("queued", "training", "saving"):
            return index
        assert time.monotonic() < deadline, f"the index of {name!r} did not settle: {index}"
        time.sleep(0.1)


def _exact_search(c: httpx.Client, name: str, q: np.ndarray) -> httpx.Response:
    return c.post(f"/v1/banks/{name}/search", json={"queries": q.tolist(), "k": 1, "mode": "exact"})


# -- 1. a stale append does not land in a re-created bank -----------------------------------------


def _recv_all(sock: socket.socket, seconds: float = 30) -> bytes:
    """The whole answer of a `Connection: close` request (bounded in time and size)."""
    deadline, chunks = time.monotonic() + seconds, []
    sock.settimeout(1.0)
    for _ in range(10_000):
        if time.monotonic() > deadline:
            break
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_stale_append_does_not_poison_a_re_created_bank(tmp_path: Path) -> None:
    """An append to `r` is sending its body when `r` is deleted and created again. It lands
    whole in the bank named `r` when its body is in (the new one), never in the old entry's
    files: after a restart the new bank holds what the PUT and the append acknowledged."""
    srv = Server(tmp_path / "d").start()
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            r = c.put("/v1/banks/r", content=npy(_rows(100, 1)), headers=NPY)
            assert r.status_code == 201, r.text
            body = npy(_rows(10, 2))
            head = (
                "POST /v1/banks/r/vectors HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{srv.port}\r\n"
                "Content-Type: application/x-npy\r\n"
                f"Content-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
                sock.sendall(head + body[:-1])
                time.sleep(0.5)  # the route has resolved bank `r` and awaits the last byte
                r = c.delete("/v1/banks/r")
                assert r.status_code == 200, r.text
                fresh = _rows(5, 3)
                created = c.put("/v1/banks/r", content=npy(fresh), headers=NPY)
                assert created.status_code == 201, created.text
                made = created.json()
                assert made["count"] == 5
                sock.sendall(body[-1:])
                answer = _recv_all(sock)
            status_line = answer.split(b"\r\n", 1)[0].decode(errors="replace")
            assert status_line.startswith("HTTP/1.1 "), answer[:200]
            status = int(status_line.split()[1])
            # The body is read before the request is routed (`_admission`), so the append
            # is routed once its last byte is in: to the bank named `r` then, the new one,
            # as a whole write after the create. (A writer that resolved the old entry
            # before the delete gets 404: test_state's registry test.)
            assert status == 200, answer[-500:]
            assert answer.endswith(npy(np.arange(5, 15, dtype=np.int64))), answer[-200:]
            info = c.get("/v1/banks/r").json()
            assert info["count"] == made["count"] + 10 and info["max_id"] == 14, info
            made = info
        _alive(srv)
        srv.stop()
        srv.start()  # the new bank's files, as the stale append left them
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            info = c.get("/v1/banks/r").json()
            assert (info["count"], info["version"]) == (made["count"], made["version"]), info
            assert info["max_id"] == 14, info  # not the old bank's ids 100..109
            assert c.put("/v1/banks/r", content=npy(fresh), headers=NPY).status_code == 409
            assert c.delete("/v1/banks/r").status_code == 200
            assert c.get("/v1/banks/r").status_code == 404
    finally:
        srv.stop()


# -- 2. rows faiss cannot train on fail the build, not the process --------------------------------


def _extreme() -> np.ndarray:
    """Two finite float32 rows whose squared distance overflows float32 (faiss aborts)."""
    return np.array([[3e38] * D, [-3e38] * D], np.float32)


def test_rows_faiss_cannot_train_on_fail_the_build_not_the_process(tmp_path: Path) -> None:
    """A bank with two huge (finite) rows: PUT index, with a spec and with the default one, is
    a failed build naming the cause; the server lives and still answers exact searches."""
    srv = Server(tmp_path / "d").start()
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            rows = np.concatenate([_rows(62, 4), _extreme()])
            r = c.put("/v1/banks/x", content=npy(rows), headers=NPY)
            assert r.status_code == 201, r.text
            for params in ({"spec": "PQ4x4fs"}, {}):
                r = c.put("/v1/banks/x/index", params=params)
                assert r.status_code == 202, (params, r.text)
                index = _settle(srv, c, "x")
                assert index["state"] == "failed", (params, index)
                assert "norm" in (index["error"] or ""), (params, index)
                _alive(srv)
                r = _exact_search(c, "x", rows[:2])
                assert r.status_code == 200, r.text
                assert r.json()["ids"] == [[0], [1]]
            assert c.get("/healthz").status_code == 200
        _alive(srv)
    finally:
        srv.stop()


def test_an_append_faiss_cannot_train_on_keeps_the_working_index(tmp_path: Path) -> None:
    """The two huge rows appended to a bank with a ready index: the automatic rebuild fails
    with the reason, the working spec is kept (stale), exact search answers; a restart (whose
    rebuild fails the same way) comes up and stays up: no crash loop."""
    srv = Server(tmp_path / "d").start()
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            base = _rows(256, 5)
            assert c.put("/v1/banks/y", content=npy(base), headers=NPY).status_code == 201
            r = c.put("/v1/banks/y/index", params={"spec": "PQ4x4fs"})
            assert r.status_code == 202, r.text
            index = _settle(srv, c, "y")
            assert index["state"] == "ready", index
            spec = index["spec"]
            r = c.post("/v1/banks/y/vectors", content=npy(_extreme()), headers=NPY)
            assert r.status_code == 200, r.text
            index = _settle(srv, c, "y")
            assert index["spec"] == spec and index["state"] == "stale", index
            assert "fail" in (index["error"] or "") and "norm" in index["error"], index
            r = _exact_search(c, "y", base[:2])
            assert r.status_code == 200 and r.json()["ids"] == [[0], [1]], r.text
        _alive(srv)
        srv.stop()
        srv.start()
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # the start's rebuild runs and fails meanwhile
                _alive(srv)
                assert c.get("/healthz").status_code == 200
                time.sleep(0.2)
            index = _settle(srv, c, "y")
            assert index["spec"] == spec and index["state"] == "stale", index
            assert "norm" in (index["error"] or ""), index
            r = _exact_search(c, "y", base[:2])
            assert r.status_code == 200 and r.json()["ids"] == [[0], [1]], r.text
        _alive(srv)
    finally:
        srv.stop()


# -- 3. a build the process died in is not retried at start ---------------------------------------


def test_a_build_the_process_died_in_is_not_retried_at_start(tmp_path: Path) -> None:
    """A stale index and the marker a build leaves when the process dies during it: the next
    start (auto-rebuild on) reports the unfinished build and does not start one; the marker is
    gone; a PUT of the index builds."""
    data = tmp_path / "d"
    srv = Server(data, VQSEARCH_AUTO_REBUILD="0").start()
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert c.put("/v1/banks/z", content=npy(_rows(256, 6)), headers=NPY).status_code == 201
            assert c.put("/v1/banks/z/index", params={"spec": "PQ4x4fs"}).status_code == 202
            assert _settle(srv, c, "z")["state"] == "ready"
            r = c.post("/v1/banks/z/vectors", content=npy(_rows(1, 7)), headers=NPY)
            assert r.status_code == 200, r.text
            assert _settle(srv, c, "z")["state"] == "stale"
    finally:
        srv.stop()
    marker = data / "banks" / "z" / "index" / "building.json"
    marker.write_text(json.dumps({"spec": "PQ4x4fs"}))
    srv = Server(data).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            seen = []
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                index = _index(c, "z")
                seen.append(index.get("state"))
                assert index.get("state") == "stale", index
                assert "did not finish" in (index.get("error") or ""), index
                time.sleep(0.1)
            assert not marker.exists()
            assert c.put("/v1/banks/z/index", params={"spec": "PQ4x4fs"}).status_code == 202
            index = _settle(srv, c, "z")
            assert index["state"] == "ready", index
            assert index["error"] is None, index
        _alive(srv)
    finally:
        srv.stop()
