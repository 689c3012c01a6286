"""Service fixtures: an in-process app with its lifespan, and a real uvicorn server process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

from vqsearch.service import Settings, create_app

CODEBOOK = np.random.default_rng(7).standard_normal((512, 16)).astype(np.float32)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", device="cpu", max_body_bytes=4 << 20)


@asynccontextmanager
async def app_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app in-process over httpx.ASGITransport, its lifespan run around the client."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield client


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """In-process app with a codebook bank named 'cb'."""
    async with app_client(settings) as client:
        r = await client.put("/v1/banks/cb", json={"vectors": CODEBOOK.tolist(), "metric": "l2"})
        assert r.status_code == 201, r.text
        yield client


def npy(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`python -m vqsearch serve` on 127.0.0.1 with its own data dir, started and stopped."""

    def __init__(
        self,
        data_dir: Path,
        file_size_limit: int | None = None,
        cgroup: Path | None = None,
        args: list[str] | None = None,
        **env: str,
    ) -> None:
        self.data_dir, self.port, self.env, self.args = data_dir, free_port(), env, args or []
        self.file_size_limit = file_size_limit  # RLIMIT_FSIZE: a stand-in for a full disk
        self.cgroup = cgroup  # a memory cgroup (v1) the server runs in, from its first byte
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        env = {
            **os.environ,
            "VQSEARCH_DATA_DIR": str(self.data_dir),
            "VQSEARCH_PORT": str(self.port),
            "VQSEARCH_HOST": "127.0.0.1",
            "VQSEARCH_LOG_LEVEL": "warning",
            **self.env,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vqsearch", "serve", *self.args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=self._limit if self.file_size_limit or self.cgroup else None,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                assert self.proc.stderr is not None
                with self.proc.stderr:
                    raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not become ready in 60 s")

    def _limit(self) -> None:
        import resource

        if self.cgroup is not None:
            (self.cgroup / "cgroup.procs").write_text(str(os.getpid()))
        if self.file_size_limit is not None:
            limit = self.file_size_limit
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    def stop(self, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill() if kill else self.proc.terminate()
            self.proc.wait(30)
        if self.proc and self.proc.stderr:
            self.proc.stderr.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "srv").start()
    yield srv
    srv.stop()


MEMORY_CGROUPS = Path("/sys/fs/cgroup/memory")


@contextmanager
def memory_cgroup(limit_bytes: int) -> Iterator[Path]:
    """A cgroup v1 memory group of its own (page cache charged to it, swap not allowed),
    removed afterwards; skips the test where none can be made (no v1 controller, not root)."""
    path = MEMORY_CGROUPS / f"vqsearch-test-{os.getpid()}-{time.monotonic_ns()}"
    try:
        path.mkdir()
    except OSError as exc:
        pytest.skip(f"no memory cgroup to run the server in: {exc}")
    try:
        (path / "memory.limit_in_bytes").write_text(str(limit_bytes))
        swap = path / "memory.memsw.limit_in_bytes"
        if swap.exists():
            swap.write_text(str(limit_bytes))
        yield path
    finally:
        for _ in range(50):  # its processes are gone once the test stopped them
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def oom_kills(cgroup: Path) -> int:
    for line in (cgroup / "memory.oom_control").read_text().splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return 0
