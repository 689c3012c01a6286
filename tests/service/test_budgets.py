"""Memory and time budgets against a real server: answers over the answer budget, concurrent
requests over the memory budget, slow clients, connection caps, deadlines and cancellation.
Memory-bound cases run the server in a memory cgroup, so a regression fails the test (the
server is killed there), not the machine."""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import socket
import threading
import time
import zipfile

import httpx
import numpy as np
import pytest

from vqsearch.service._sampling import Usage

from .conftest import Server, memory_cgroup, npy, oom_kills

NPY = {"content-type": "application/x-npy"}
GB = 1 << 30


def _alive(srv: Server) -> None:
    assert srv.proc is not None and srv.proc.poll() is None, "the server died"
    assert httpx.get(f"{srv.url}/healthz", timeout=10).status_code == 200


def test_small_requests_for_huge_answers_are_refused_before_any_work(tmp_path):
    """The reported cases, in a 1.5 GB cgroup with budgets to match: k=1024 for 1,048,576
    one-float queries (a 4 MB body, a 12 GB answer), decode of 1M codes as JSON, nearest with
    return_quantized as JSON (64 MB in, ~370 MB of JSON out): each a 422 naming
    VQSEARCH_MAX_ANSWER_BYTES, and the server is not OOM-killed."""
    with memory_cgroup(int(1.5 * GB)) as cg:
        srv = Server(
            tmp_path / "d",
            cgroup=cg,
            VQSEARCH_DEMO="1",
            VQSEARCH_MAX_ANSWER_BYTES=str(200 << 20),
            VQSEARCH_MEMORY_BUDGET=str(800 << 20),
        ).start()
        try:
            xb = np.random.default_rng(0).standard_normal((1024, 1)).astype(np.float32)
            assert httpx.put(f"{srv.url}/v1/banks/tiny", content=npy(xb), headers=NPY).is_success
            q = np.zeros((1 << 20, 1), np.float32)
            r = httpx.post(
                f"{srv.url}/v1/banks/tiny/search?k=1024", content=npy(q), headers=NPY, timeout=60
            )
            assert r.status_code == 422 and "VQSEARCH_MAX_ANSWER_BYTES" in r.json()["detail"]
            codes = np.zeros(1 << 20, np.int64)
            r = httpx.post(
                f"{srv.url}/v1/banks/demo/decode",
                content=npy(codes),
                headers={**NPY, "accept": "application/json"},
                timeout=60,
            )
            assert r.status_code == 422 and "binary answer" in r.json()["detail"]
            z = np.zeros((1 << 16, 256), np.float32)
            r = httpx.post(
                f"{srv.url}/v1/banks/demo/nearest?return_quantized=true",
                content=npy(z),
                headers={**NPY, "accept": "application/json"},
                timeout=60,
            )
            assert r.status_code == 422 and "VQSEARCH_MAX_ANSWER_BYTES" in r.json()["detail"]
            # the same decode as binary fits: streamed from the array
            r = httpx.post(
                f"{srv.url}/v1/banks/demo/decode",
                content=npy(codes[:100_000]),
                headers=NPY,
                timeout=60,
            )
            assert r.status_code == 200
            assert np.load(io.BytesIO(r.content)).shape == (100_000, 256)
            _alive(srv)
            assert oom_kills(cg) == 0
        finally:
            srv.stop()


def _bomb(inflated: int) -> bytes:
    """An .npz of zeros: a few hundred KB that inflate to `inflated` bytes."""
    buf = io.BytesIO()
    a = np.zeros((inflated // 4 // 16, 16), np.float32)
    with (
        zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf,
        zf.open("queries.npy", "w", force_zip64=True) as f,
    ):
        np.lib.format.write_array(f, a, allow_pickle=False)
    return buf.getvalue()


def test_concurrent_npz_bombs_share_one_memory_budget(tmp_path):
    """Ten concurrent deflate bombs, each inflating to 200 MB (under the body limit), with a
    600 MB budget, in a 2.5 GB cgroup: the ones over the budget get 503 + Retry-After at once,
    the server lives and no request is OOM-killed."""
    body = _bomb(200 << 20)
    assert len(body) < 1 << 20
    with memory_cgroup(int(2.5 * GB)) as cg:
        srv = Server(
            tmp_path / "d", cgroup=cg, VQSEARCH_DEMO="1", VQSEARCH_MEMORY_BUDGET=str(600 << 20)
        ).start()
        try:
            headers = {"content-type": "application/x-npz"}

            def send(_: int) -> int:
                url = f"{srv.url}/v1/banks/demo/nearest"
                return httpx.post(url, content=body, headers=headers, timeout=120).status_code

            with concurrent.futures.ThreadPoolExecutor(10) as pool:
                codes = list(pool.map(send, range(10)))
            assert 503 in codes, codes
            assert set(codes) <= {200, 422, 503}, codes  # 422: the zeros are not d=256 rows
            _alive(srv)
            assert oom_kills(cg) == 0
        finally:
            srv.stop()


def _raw(srv: Server) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    return s


def _read_all(s: socket.socket, seconds: float) -> bytes:
    s.settimeout(seconds)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return out


def test_slow_bodies_hold_connections_not_slots(tmp_path):
    """8 clients sending a body a byte at a time, with MAX_INFLIGHT=4: other requests are still
    served (the slow ones are not in flight until their body is read), and each slow one gets
    408 at VQSEARCH_BODY_TIMEOUT."""
    srv = Server(
        tmp_path / "d", VQSEARCH_DEMO="1", VQSEARCH_MAX_INFLIGHT="4", VQSEARCH_BODY_TIMEOUT="3"
    ).start()
    slow = []
    try:
        for _ in range(8):
            s = _raw(srv)
            s.sendall(
                b"POST /v1/banks/demo/nearest HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
            )
            slow.append(s)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.5:  # the slow ones trickle on
            for s in slow:
                s.sendall(b" ")
            r = httpx.post(f"{srv.url}/v1/banks/demo/nearest", json={"queries": [[0.0] * 256]})
            assert r.status_code == 200, r.text
            time.sleep(0.2)
        answers = [_read_all(s, 6) for s in slow]
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers[0][:200]
        assert b"VQSEARCH_BODY_TIMEOUT" in answers[0]
        _alive(srv)
    finally:
        for s in slow:
            s.close()
        srv.stop()


def test_slow_headers_and_too_many_connections_are_closed(tmp_path):
    """Connections sending their headers slowly are closed at VQSEARCH_HEADER_TIMEOUT; past
    VQSEARCH_MAX_CONNECTIONS new ones are closed at once; the server keeps serving."""
    srv = Server(tmp_path / "d", VQSEARCH_HEADER_TIMEOUT="2", VQSEARCH_MAX_CONNECTIONS="20").start()
    socks = []
    try:
        for _ in range(10):
            s = _raw(srv)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never the final CRLF
            socks.append(s)
        t0 = time.monotonic()
        closed = [_read_all(s, 8) for s in socks]
        assert closed == [b""] * 10 and time.monotonic() - t0 < 8  # closed, no answer
        for s in socks:
            s.close()
        socks = [_raw(srv) for _ in range(25)]
        time.sleep(0.5)
        dropped = 0
        for s in socks:
            s.settimeout(0.2)
            with contextlib.suppress(TimeoutError):
                dropped += s.recv(1) == b""
        assert dropped >= 5, dropped  # over the cap: closed before a byte was read
        for s in socks:
            s.close()
        socks = []
        time.sleep(0.3)
        _alive(srv)
    finally:
        for s in socks:
            s.close()
        srv.stop()


def _bank(srv: Server, name: str, nb: int, d: int) -> None:
    xb = np.random.default_rng(1).standard_normal((nb, d)).astype(np.float32)
    r = httpx.put(f"{srv.url}/v1/banks/{name}", content=npy(xb), headers=NPY, timeout=120)
    assert r.status_code == 201, r.text


def test_deadline_cancellation_and_fair_turns(tmp_path):
    """Large searches run in chunks: two slow ones on one bank do not keep another bank from
    answering; one past VQSEARCH_REQUEST_TIMEOUT ends with 504; a client that goes away stops
    its search (the server records 499)."""
    srv = Server(tmp_path / "d", VQSEARCH_REQUEST_TIMEOUT="4").start()
    try:
        _bank(srv, "big", 100_000, 64)
        _bank(srv, "small", 256, 8)
        q = npy(np.random.default_rng(2).standard_normal((60_000, 64)).astype(np.float32))
        url = f"{srv.url}/v1/banks/big/search?k=10"
        results: list[int] = []

        def slow() -> None:
            results.append(httpx.post(url, content=q, headers=NPY, timeout=120).status_code)

        threads = [threading.Thread(target=slow) for _ in range(2)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(1.0)
        small = time.monotonic()
        r = httpx.post(
            f"{srv.url}/v1/banks/small/nearest", json={"queries": [[0.0] * 8]}, timeout=60
        )
        waited = time.monotonic() - small
        for t in threads:
            t.join(120)
        total = time.monotonic() - t0
        assert r.status_code == 200
        assert results == [504, 504], results
        assert waited < total / 2, (waited, total)  # answered between chunks, not after both
        # a client that goes away: its search stops at the next chunk
        s = _raw(srv)
        s.sendall(
            b"POST /v1/banks/big/search?k=10 HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/x-npy\r\nContent-Length: %d\r\n\r\n" % len(q) + q
        )
        time.sleep(0.5)
        s.close()
        for _ in range(300):  # within a few chunks
            metrics = httpx.get(f"{srv.url}/metrics").text
            if 'status="499"' in metrics:
                break
            time.sleep(0.1)
        assert 'status="499"' in metrics
        _alive(srv)
    finally:
        srv.stop()


@pytest.mark.parametrize("window", [1, 7, 1000, 5000])
def test_usage_window_grows_with_use(window):
    """The usage buffer holds what was served, up to the window (1,000 idle banks hold next
    to nothing), and counts exactly the last `window` codes."""
    rng = np.random.default_rng(0)
    usage, served = Usage(window), []
    assert usage.buf.nbytes == 0
    for _ in range(300):
        c = rng.integers(0, 50, rng.integers(0, 60))
        usage.record(c)
        served.extend(c.tolist())
    ids, n = np.unique(np.array(served[-window:]), return_counts=True)
    got_ids, got_n = usage.counts()
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_n, n)
    assert len(usage.buf) == window and usage.served == len(served)


def test_compaction_streams_in_the_background(tmp_path):
    """17 appends of 120,000 x 32 (a 260 MB bank) in a 700 MB cgroup: the 17th pile-up is
    compacted after its write was answered, streaming (the old compaction inside the write
    held ~3 copies of the bank and was OOM-killed here), and no write is lost."""
    with memory_cgroup(700 << 20) as cg:
        srv = Server(tmp_path / "d", cgroup=cg).start()
        try:
            rng = np.random.default_rng(0)
            for i in range(17):
                x = npy(rng.standard_normal((120_000, 32), dtype=np.float32))
                url = f"{srv.url}/v1/banks/b" + ("" if i == 0 else "/vectors")
                r = (httpx.put if i == 0 else httpx.post)(url, content=x, headers=NPY, timeout=300)
                assert r.status_code in (200, 201), r.text
            for _ in range(600):
                info = httpx.get(f"{srv.url}/v1/banks/b", timeout=30).json()
                if info["segments"] == 1:
                    break
                time.sleep(0.1)
            assert info["segments"] == 1 and info["count"] == 17 * 120_000, info
            assert info["max_id"] == 17 * 120_000 - 1
            _alive(srv)
            assert oom_kills(cg) == 0
        finally:
            srv.stop()


def test_a_thousand_small_banks_fit_in_little_memory(tmp_path):
    """VQSEARCH_MAX_BANKS (1000) tiny banks, each asked for a code, in a 900 MB cgroup (the
    usage windows once took 8 MB each, allocated eagerly: 8 GB)."""
    with memory_cgroup(900 << 20) as cg:
        srv = Server(tmp_path / "d", cgroup=cg).start()
        try:
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                for i in range(1000):
                    r = c.put(f"/v1/banks/b{i}", json={"vectors": [[float(i), 1.0]]})
                    assert r.status_code == 201, r.text
                    assert c.post(f"/v1/banks/b{i}/nearest", json={"queries": [[0.0, 0.0]]}).json()[
                        "codes"
                    ] == [0]
                assert c.put("/v1/banks/one-more?d=2").status_code == 422  # the limit holds
                assert len(c.get("/v1/banks").json()) == 1000
            _alive(srv)
            assert oom_kills(cg) == 0
        finally:
            srv.stop()
