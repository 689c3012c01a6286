"""Service settings: one `BaseSettings`, read from `VQSEARCH_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every setting has an env variable: the field name upper-cased behind `VQSEARCH_`."""

    model_config = SettingsConfigDict(env_prefix="VQSEARCH_", extra="ignore")

    data_dir: Path = Field(Path("./data"), description="where banks are stored")
    host: str = Field("127.0.0.1", description="address `vqsearch serve` binds to")
    port: int = Field(8000, ge=0, le=65535)
    device: str = Field("auto", description="torch device for exact search: auto, cpu, cuda")
    exact_precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = Field(
        "auto",
        description="candidate scan of exact search (answers are exact in all): auto (for "
        "nearest, fp16 in the fused GPU kernel, else bf16 where the CPU/GPU runs it natively, "
        "int8 on other CPUs, each while it proves most queries), fp32, bf16, fp16 (GPU, "
        "nearest), int8 (CPU, nearest)",
    )
    demo: bool = Field(False, description="create the demo codebook when the data dir is empty")
    max_body_bytes: int = Field(256 << 20, ge=1, description="largest request body accepted")
    max_queries: int = Field(1 << 20, ge=1, description="most vectors in one request")
    max_k: int = Field(1024, ge=1, description="largest k of a search")
    auto_rebuild: bool = Field(
        True, description="rebuild a bank's approximate index in the background after writes"
    )
    read_only: bool = Field(
        False,
        description="serve reads only (replicas; required for several workers): writes get 405",
    )
    ray_address: str | None = Field(
        None,
        description="HOST:PORT of a Ray cluster (`ray start --head`): banks made with ?shards=N "
        "are split over N shard actors on its nodes; unset, Ray is never imported",
    )
    ray_gpus: float = Field(
        0.0, ge=0, description="GPUs each shard actor and each HTTP replica takes (num_gpus)"
    )
    ray_replicas: int = Field(
        0,
        ge=0,
        description="with a Ray cluster: serve HTTP from this many Ray Serve replicas (reads; "
        "writes go to one writer deployment); 0: this process serves, as without replicas",
    )
    ray_max_replicas: int | None = Field(
        None,
        ge=1,
        description="autoscale the Ray Serve replicas between VQSEARCH_RAY_REPLICAS and this",
    )
    ray_replica_cpus: float = Field(1.0, ge=0, description="CPUs each Ray Serve replica takes")
    ray_timeout: float = Field(
        30.0, gt=0, description="seconds a shard may take to answer before the request gets 503"
    )
    refresh_seconds: float = Field(
        2.0, gt=0, description="read-only replicas: how often to take up the primary's writes"
    )
    query_reservoir: int = Field(
        0,
        ge=0,
        le=1_000_000,
        description="real queries kept per bank (uniform sample) for tradeoff sweeps; 0: off",
    )
    usage_window: int = Field(
        1 << 20, ge=0, description="last codes served kept per bank for usage figures; 0: off"
    )
    shutdown_timeout: int = Field(
        30, ge=0, description="seconds in-flight requests get to finish after SIGTERM"
    )
    read_keys: str = Field(
        "", description="comma-separated API keys allowed to search, nearest, decode and read info"
    )
    admin_keys: str = Field("", description="comma-separated API keys allowed everything")
    metrics_public: bool = Field(True, description="serve /metrics without a key")
    max_d: int = Field(65536, ge=1, description="widest vectors a bank may hold")
    max_bank_vectors: int = Field(
        10_000_000,
        ge=1,
        description="most vectors in one bank (compaction holds ~3 copies of the bank in RAM)",
    )
    max_banks: int = Field(1000, ge=1, description="most banks")
    max_inflight: int = Field(
        64,
        ge=1,
        description="requests under way at once (counted once their body is read); beyond "
        "it 503 with Retry-After",
    )
    max_answer_bytes: int = Field(
        1 << 30,
        ge=1,
        description="largest answer one request may ask for (JSON counted at its encoded "
        "size), checked before any work: 422 beyond",
    )
    memory_budget: int = Field(
        4 << 30,
        ge=1,
        description="bytes of request bodies, parsed arrays and answers all requests may hold "
        "at once; beyond it 503 with Retry-After",
    )
    index_memory_fraction: float = Field(
        0.25,
        gt=0,
        le=1,
        description="a default index (built without a spec) holds at most this fraction of "
        "the memory the server may use (its memory cgroup's limit, else physical RAM): "
        "PQ codes are chosen to fit",
    )
    request_timeout: float = Field(
        300.0, gt=0, description="seconds a query may run before it is stopped (504)"
    )
    body_timeout: float = Field(
        60.0, gt=0, description="seconds a client has to send a request body (408 beyond)"
    )
    header_timeout: float = Field(
        10.0, gt=0, description="seconds a connection has to send a request's headers"
    )
    max_connections: int = Field(
        2048, ge=1, description="open client connections; beyond it new ones are closed"
    )
    batch_max_rows: int = Field(
        4096,
        ge=0,
        description="micro-batching: coalesce small concurrent queries up to this "
        "many rows (0: off)",
    )
    batch_max_wait_ms: float = Field(
        2.0,
        ge=0,
        le=1000,
        description="micro-batching: how long a query waits for company when a search thread "
        "is free (while every one is busy, its batch keeps gathering)",
    )
    log_level: str = Field("info")
    otel: bool = Field(
        False,
        description="FastAPI's native OpenTelemetry (traces, metrics, logs to the global "
        "providers); off by default: even unconfigured, it looks the providers up on every "
        "request, a share of the event loop's time under one-vector load",
    )

    @property
    def read_key_list(self) -> list[str]:
        return [k.strip() for k in self.read_keys.split(",") if k.strip()]

    @property
    def admin_key_list(self) -> list[str]:
        return [k.strip() for k in self.admin_keys.split(",") if k.strip()]

    @property
    def auth_enabled(self) -> bool:
        return bool(self.read_key_list or self.admin_key_list)
