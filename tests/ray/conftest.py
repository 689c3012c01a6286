"""A real multi-node Ray cluster on this machine, one per test package: a head and two
worker nodes (`ray.cluster_utils.Cluster`), every process bound to 127.0.0.1 and kept under a
temp dir of its own, stopped by the cluster object that started them (never `ray stop`).

Ray turns the address 127.0.0.1 into the address this host routes from (the one a UDP socket
"connected" to a public DNS server gets), and its processes bound to 127.0.0.1 are not there.
So these tests run where loopback is the only network: a network namespace of their own
(`make test` runs them under `unshare -n`), and skip elsewhere, saying so."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator

import pytest

ray = pytest.importorskip("ray", reason="the ray extra is not installed")
from ray.cluster_utils import Cluster  # noqa: E402


def require_loopback_only() -> None:
    """Skip unless the only route out of this process is loopback (see the docstring)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("8.8.8.8", 53))
        except OSError:
            return
        if not s.getsockname()[0].startswith("127."):
            pytest.skip(
                "Ray resolves 127.0.0.1 to this host's routed address: run in a network "
                "namespace with loopback only (make test: unshare -n)"
            )


# a node that stops answering health checks is declared dead in about a second, not 30
FAST_DEATH = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 200,
    "health_check_failure_threshold": 5,
}
NODE = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}


@pytest.fixture(scope="package")
def cluster() -> Iterator[Cluster]:
    """Head (1 CPU) and two workers (1 CPU each); this process is the driver."""
    require_loopback_only()
    temp = tempfile.mkdtemp(prefix="vqray", dir="/tmp")  # short: Ray's socket paths are long
    before = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp  # Ray notes "the current cluster" in ./ray, not /tmp/ray
    os.mkdir(os.path.join(temp, "ray"))
    c = None
    try:
        c = Cluster(
            initialize_head=True,
            head_node_args={
                **NODE,
                "temp_dir": temp,
                "include_dashboard": False,
                "_system_config": FAST_DEATH,
            },
        )
        c.temp_dir = temp  # type: ignore[attr-defined]
        restore_workers(c)
        ray.init(address=c.address, logging_level=logging.WARNING, log_to_driver=False)
        yield c
    finally:
        ray.shutdown()
        if c is not None:
            c.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        if before is None:
            del os.environ["RAY_TMPDIR"]
        else:
            os.environ["RAY_TMPDIR"] = before


def restore_workers(c: Cluster, n: int = 2) -> None:
    """Add worker nodes until n are up (a test that removed one puts it back)."""
    while len(c.worker_nodes) < n:
        c.add_node(**NODE, temp_dir=c.temp_dir)  # type: ignore[attr-defined]
    c.wait_for_nodes()
