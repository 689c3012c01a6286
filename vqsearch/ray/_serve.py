"""The HTTP API as a Ray Serve application (`VQSEARCH_RAY_REPLICAS`): replicas of the ingress
behind Serve's proxy on `VQSEARCH_HOST:VQSEARCH_PORT` serve reads, each with the data dir
mapped read-only, and send every write on to one `WriterServer` deployment, the data dir's
one writer (it also places the sharded banks' shards). Same routes, answers and errors as
`vqsearch serve` alone.

    serve_on_ray(settings)              # `vqsearch serve --ray HOST:PORT`, blocks
    application({"ray_replicas": "4"})  # a Serve config's `import_path: vqsearch.ray:application`
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Any

from ray import exceptions as rx
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from vqsearch.service import (
    Forwarded,
    LocalWriter,
    Settings,
    WriterAnswer,
    WriterUnavailableError,
    create_app,
)

from ._cluster import Cluster

APP_NAME = "vqsearch"
HEAD = "node:__internal_head__"  # a resource only the head node has
log = logging.getLogger("vqsearch")


class WriterServer:
    """The one writer: the app with the data dir's lock, its lifespan entered here (a Serve
    application has one HTTP ingress), answering the requests the replicas forward."""

    async def __init__(self, settings: Settings) -> None:  # type: ignore[misc]
        app = create_app(settings)
        self._stack = contextlib.AsyncExitStack()
        await self._stack.enter_async_context(app.router.lifespan_context(app))
        self.writer = LocalWriter(app)
        self._stack.push_async_callback(self.writer.aclose)

    async def forward(self, request: Forwarded) -> WriterAnswer:
        return await self.writer(request)

    async def __del__(self) -> None:
        await self._stack.aclose()  # the lifespan's end: jobs stopped, the lock released


@serve.ingress()
class ReadReplica:
    """A replica of the HTTP ingress: reads served here, writes sent to the `WriterServer`."""

    def __init__(self, settings: Settings, writer: DeploymentHandle) -> None:
        self.settings, self.writer = settings, writer

    def __serve_build_asgi_app__(self) -> Any:
        replica = self.settings.model_copy(update={"read_only": True, "demo": False})
        return create_app(replica, forward=self._forward)

    async def _forward(self, request: Forwarded) -> WriterAnswer:
        try:
            answer: WriterAnswer = await self.writer.forward.remote(request)
        except (
            rx.RayActorError,
            rx.ActorUnavailableError,
            serve.exceptions.BackPressureError,
        ) as exc:
            raise WriterUnavailableError(
                f"the writer is not answering ({type(exc).__name__}); it restarts: retry"
            ) from exc
        return answer


def build(settings: Settings) -> Application:
    """The Serve application: `ray_replicas` read replicas (autoscaled up to
    `ray_max_replicas` when set) in front of one writer."""
    actor = {"num_cpus": settings.ray_replica_cpus, "num_gpus": settings.ray_gpus}
    writer = serve.deployment(
        name="writer",
        num_replicas=1,
        # on the head, whose copy of the data dir is writable in every deployment here (the
        # workers' may be read-only); no CPU of Ray's count, so it always finds room there
        ray_actor_options={"num_cpus": 0, "resources": {HEAD: 0.001}},
        max_ongoing_requests=settings.max_inflight,
    )(WriterServer)
    replicas = serve.deployment(
        name="http",
        ray_actor_options=actor,
        max_ongoing_requests=settings.max_inflight,
        **scaling(settings),
    )(ReadReplica)
    return replicas.bind(settings, writer.bind(settings))


def scaling(settings: Settings) -> dict[str, Any]:
    """The read replicas' deployment options: `ray_replicas` of them (at least one), or
    autoscaled from there up to `ray_max_replicas` when it is set."""
    lo = max(1, settings.ray_replicas)
    if settings.ray_max_replicas is None:
        return {"num_replicas": lo}
    hi = max(lo, settings.ray_max_replicas)
    return {"autoscaling_config": {"min_replicas": lo, "max_replicas": hi}}


def application(args: dict[str, str]) -> Application:
    """A Serve config's builder (`import_path: vqsearch.ray:application`, a RayService's
    `serveConfigV2`): settings from the `VQSEARCH_*` environment, `args` overriding them by
    field name (`{"ray_replicas": "4"}`)."""
    return build(Settings(**args))  # type: ignore[arg-type]


def serve_on_ray(settings: Settings) -> None:
    """Run the application on the cluster at `settings.ray_address`, Serve's proxy on
    `settings.host:port`, until SIGTERM or SIGINT; then delete it and leave the cluster."""
    assert settings.ray_address is not None
    cluster = Cluster.connect(settings.ray_address, settings.ray_gpus, settings.ray_timeout)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(
            proxy_location="HeadOnly",
            http_options={"host": settings.host, "port": settings.port},
        )
        serve.run(build(settings), name=APP_NAME, route_prefix="/")
        log.info("serving on Ray Serve at %s:%s", settings.host, settings.port)
        stop.wait()
    finally:
        serve.delete(APP_NAME)
        serve.shutdown()
        cluster.close()
