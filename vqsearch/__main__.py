"""Command line: `vqsearch serve`, `compare`, `tokenize`, `load` (also `python -m vqsearch ...`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vqsearch")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP server (settings from VQSEARCH_* env)")
    serve.add_argument("--host", help="overrides VQSEARCH_HOST")
    serve.add_argument("--port", type=int, help="overrides VQSEARCH_PORT")
    serve.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    serve.add_argument(
        "--ray", metavar="HOST:PORT", help="a Ray cluster for sharded banks: VQSEARCH_RAY_ADDRESS"
    )
    from vqsearch import _compare

    compare = sub.add_parser("compare", help="measure recall against speed; table, JSON, PNG")
    _compare.add_arguments(compare)
    from vqsearch import _tokenize

    tokenize = sub.add_parser("tokenize", help="every array in a directory to its codes")
    _tokenize.add_arguments(tokenize)
    from vqsearch import _load

    load = sub.add_parser("load", help="vectors from .npy / .npz files into a data dir's bank")
    _load.add_arguments(load)
    args = parser.parse_args(argv)
    if args.command == "load":
        return _load.run(args)
    if args.command == "compare":
        return _compare.run(args)
    if args.command == "tokenize":
        return _tokenize.run(args)

    import uvicorn

    from vqsearch.service import Settings, create_app
    from vqsearch.service._observe import configure_logging, return_freed_memory

    return_freed_memory()
    settings = Settings()
    if args.ray is not None:
        settings = settings.model_copy(update={"ray_address": args.ray})
    replicas = bool(settings.ray_replicas or settings.ray_max_replicas)
    if replicas and settings.ray_address is None:
        parser.error("VQSEARCH_RAY_REPLICAS needs a Ray cluster: --ray or VQSEARCH_RAY_ADDRESS")
    if args.workers > 1 and settings.ray_address is not None:
        parser.error("--workers > 1 with a Ray cluster: each worker would place every shard")
    if args.host or args.port is not None:
        settings = settings.model_copy(
            update={
                "host": args.host or settings.host,
                "port": settings.port if args.port is None else args.port,
            }
        )
    host, port = settings.host, settings.port
    configure_logging(settings.log_level)
    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("vqsearch").warning(
            "listening on %s: reachable beyond this machine", host
        )
    if args.workers > 1 and not settings.read_only:
        # Each worker holds its own copy of every bank's state: writes landing on different
        # workers would overwrite each other's manifests. Several workers serve reads only.
        parser.error("--workers > 1 needs VQSEARCH_READ_ONLY=1 (writes go to one primary)")
    if not settings.read_only:
        # The server takes the data dir's lock when it starts; asked here first, a second
        # writer stops with one line naming the holder instead of a startup traceback.
        from vqsearch.service._lock import DataDirLock, DataDirLockedError

        probe = DataDirLock(settings.data_dir)
        try:
            probe.acquire()
        except DataDirLockedError as exc:
            print(f"vqsearch: {exc}", file=sys.stderr)
            return 1
        probe.release()
    if replicas:
        from vqsearch.ray import serve_on_ray

        serve_on_ray(settings)  # the writer, a Serve deployment, takes the lock
        return 0
    from vqsearch.service._protocol import LimitedHttpToolsProtocol, raise_fd_limit

    raise_fd_limit()
    LimitedHttpToolsProtocol.header_timeout = settings.header_timeout
    LimitedHttpToolsProtocol.max_connections = settings.max_connections
    if args.workers > 1:
        # Each worker runs its own torch thread pool; without this N workers start N x cores
        # threads that fight over the cores. Spawned workers inherit the environment.
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.workers)))
        uvicorn.run(
            "vqsearch.service._factory:app",
            host=host,
            port=port,
            workers=args.workers,
            factory=True,
            log_config=None,
            timeout_graceful_shutdown=settings.shutdown_timeout,
            http=LimitedHttpToolsProtocol,
        )
    else:
        uvicorn.run(
            create_app(settings),
            host=host,
            port=port,
            log_config=None,
            timeout_graceful_shutdown=settings.shutdown_timeout,
            http=LimitedHttpToolsProtocol,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
