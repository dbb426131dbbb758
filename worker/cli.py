"""`welore worker [--queues Q] [--concurrency N]`: a thin wrapper over `celery worker`; and `welore
serve`, the API (api/cli.py) with its in-process worker when embedded."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("worker", help="run a Celery worker for the job service (needs WELORE_REDIS_URL)")
    p.add_argument("--queues", "-Q", default=None,
                   help="comma-separated queues (default: the gpu and light queues, e.g. welore.gpu,welore.light)")
    p.add_argument("--concurrency", "-c", type=int, default=1, help="jobs run at once (default 1: one GPU job)")
    p.add_argument("--loglevel", "-l", default="info")
    p.add_argument("--pool", default=None, help="Celery pool (default prefork; solo runs jobs in the main process)")
    p.add_argument("--hostname", "-n", default=None)
    p.set_defaults(func=run)


def register_serve(sub) -> None:
    from api.cli import register_serve as register_api_serve

    register_api_serve(sub, serve)


def serve(args: argparse.Namespace) -> int:
    from api.cli import serve as serve_api

    from .embedded import create_app

    return serve_api(args, create_app)


def run(args: argparse.Namespace) -> int:
    from api.settings import get_settings
    from welore_core.errors import InvalidArgument

    settings = get_settings()
    if not settings.redis_url:
        raise InvalidArgument("`welore worker` needs a broker: set WELORE_REDIS_URL (and WELORE_DATABASE_URL, "
                              "WELORE_ARTIFACT_DIR shared with the API). Embedded `welore serve` needs no worker.")
    from .celery_app import make_celery

    app = make_celery(settings)
    queues = args.queues or f"{settings.queue('gpu')},{settings.queue('light')}"
    argv = ["worker", f"--queues={queues}", f"--concurrency={args.concurrency}", f"--loglevel={args.loglevel}"]
    if args.pool:
        argv.append(f"--pool={args.pool}")
    if args.hostname:
        argv.append(f"--hostname={args.hostname}")
    app.worker_main(argv)
    return 0
