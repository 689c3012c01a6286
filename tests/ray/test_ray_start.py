"""End to end: a cluster started as users start one (`ray start --head`, `ray start
--address`), `vqsearch serve --ray HOST:PORT` on it, driven over HTTP by the client. Every
process the test started carries a token in its environment (Ray passes its environment on
to the processes it starts), and only those are stopped."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import brute_force
from tests.ray.conftest import require_loopback_only
from tests.ray.test_shards import clustered, queries
from tests.service.conftest import Server, free_port
from vqsearch.client import Client

RAY = str(Path(sys.executable).with_name("ray"))
TOKEN = "VQSEARCH_TEST_RAY"


def _ours(token: str) -> list[int]:
    """Pids of the processes whose environment carries the token."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            env = (proc / "environ").read_bytes()
        except OSError:
            continue
        if f"{TOKEN}={token}".encode() in env.split(b"\0"):
            found.append(int(proc.name))
    return found


def _stop(token: str) -> None:
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in _ours(token):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while _ours(token) and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture
def ray_started() -> Iterator[tuple[str, str]]:
    """`ray start --head` and one `ray start --address` worker on 127.0.0.1: (the address,
    the RAY_TMPDIR where the head notes itself as this host's current cluster)."""
    require_loopback_only()
    token, temp = uuid.uuid4().hex, tempfile.mkdtemp(prefix="vqrs", dir="/tmp")
    os.mkdir(os.path.join(temp, "ray"))
    env = {**os.environ, TOKEN: token, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": temp}
    port = free_port()
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats"]
    address = f"127.0.0.1:{port}"
    try:
        subprocess.run(
            [
                RAY,
                "start",
                "--head",
                f"--port={port}",
                f"--temp-dir={temp}",
                "--include-dashboard=false",
                *common,
            ],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        subprocess.run(
            [RAY, "start", f"--address={address}", *common],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        yield address, temp
    finally:
        _stop(token)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.parametrize("how", ["HOST:PORT", "auto", "replicas"])
def test_serve_on_a_started_cluster(ray_started: tuple[str, str], how, tmp_path: Path, rng) -> None:
    """`--ray HOST:PORT`, `--ray auto` (the cluster this host's head started, as the
    compose file and the KubeRay manifest run it), and Ray Serve replicas of the HTTP API
    (`VQSEARCH_RAY_REPLICAS`) in front of a writer deployment."""
    xb = clustered(rng, 500)
    xq = queries(rng, xb)
    address, temp = ray_started
    arg = "auto" if how == "auto" else address
    env = {"RAY_TMPDIR": temp}
    if how == "replicas":  # the cluster's 2 CPUs are for the shards
        env |= {"VQSEARCH_RAY_REPLICAS": "2", "VQSEARCH_RAY_REPLICA_CPUS": "0"}
    srv = Server(tmp_path / "data", args=["--ray", arg], **env).start()
    try:
        with Client(srv.url) as c:
            info = c.create_bank("cb", xb, shards=2)
            assert info.shards == 2
            D_, I_ = c.search("cb", xq, k=3)
            Db, Ib = brute_force(xq, xb, 3, "l2")
            np.testing.assert_array_equal(I_, Ib)
            np.testing.assert_allclose(D_, Db, rtol=1e-5, atol=1e-3)
            ids = c.add("cb", xb[2:7] + 0.5)
            codes = c.nearest("cb", xb[2:7] + 0.5).codes
            assert codes.tolist() == ids.tolist()
            assert c.get_bank("cb").count == 505
        srv.stop()  # SIGTERM: uvicorn's graceful stop (or Serve's app deleted), not Ray's
        # handler's sys.exit(15); uvicorn re-raises the SIGTERM it handled once it is done
        assert srv.proc is not None and srv.proc.returncode in (0, -signal.SIGTERM)
    finally:
        srv.stop()
