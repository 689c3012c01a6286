"""A short bounded load test (the long one is bench/load.py): loopback only, stops by itself."""

from __future__ import annotations

from bench.load import run
from tests.service.conftest import Server


async def test_32_clients_mixing_reads_and_appends(tmp_path):
    """32 concurrent clients for 8 s mixing search, nearest and appends: zero errors, and the
    memory the server still holds 2 s after the load stops stays within 25 MB of its RSS
    under load after warm-up (which includes the requests in flight: about 25 MB more)."""
    srv = Server(tmp_path / "d", VQSEARCH_MAX_INFLIGHT="256").start()
    try:
        assert srv.proc is not None
        report = await run(srv.url, srv.proc.pid, clients=32, seconds=8, warmup=0.5)
    finally:
        srv.stop()
    print(report)
    assert report["errors"] == 0, report["first_errors"]
    assert report["requests"] > 200
    assert report["rss_mb_end"] - report["rss_mb_after_warmup"] < 25, report
