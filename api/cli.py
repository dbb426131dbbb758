"""Service sub-commands of `welore`, registered through the `welore.commands` entry points:

  welore serve [--host H] [--port P]   the API (embedded with no configuration: SQLite, local
                                       artifacts, in-process worker; it locks its state
                                       directory, migrates and, on an empty database, creates
                                       and prints an API key)
  welore keys create [--name N]        a new API key, printed as the last stdout line
  welore keys list | revoke ID
  welore db upgrade [REV] | current | downgrade REV
"""

from __future__ import annotations

import argparse
import sys


def register_serve(sub, serve_fn=None) -> None:
    """`welore serve`; the entry point is worker/cli.py's, which gives `serve_fn` (the app with its
    in-process worker for embedded mode: the API does not import the worker)."""
    p = sub.add_parser("serve", help="run the job service API (embedded unless WELORE_REDIS_URL is set)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=serve_fn or serve)


def register_keys(sub) -> None:
    p = sub.add_parser("keys", help="manage API keys of the job service")
    ks = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    c = ks.add_parser("create", help="create a key and print it (last stdout line)")
    c.add_argument("--name", default="", help="a label for the key")
    c.set_defaults(func=keys_create)
    ks.add_parser("list", help="list keys (never their secrets)").set_defaults(func=keys_list)
    r = ks.add_parser("revoke", help="revoke a key by id")
    r.add_argument("key_id")
    r.set_defaults(func=keys_revoke)


def register_db(sub) -> None:
    p = sub.add_parser("db", help="database migrations of the job service (Alembic)")
    ds = p.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    u = ds.add_parser("upgrade", help="apply migrations (default: to the latest)")
    u.add_argument("revision", nargs="?", default="head")
    u.set_defaults(func=db_upgrade)
    d = ds.add_parser("downgrade", help="revert migrations to REVISION (e.g. base)")
    d.add_argument("revision")
    d.set_defaults(func=db_downgrade)
    ds.add_parser("current", help="print the applied revision").set_defaults(func=db_current)


def _settings():
    from .settings import get_settings

    return get_settings()


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def db_upgrade(args: argparse.Namespace) -> int:
    from . import migrate

    s = _settings()
    migrate.upgrade(s.db_url, args.revision)
    print(f"database {_redact(s.db_url)} at revision {migrate.current(s.db_url)}")
    return 0


def db_downgrade(args: argparse.Namespace) -> int:
    from . import migrate

    s = _settings()
    migrate.downgrade(s.db_url, args.revision)
    print(f"database {_redact(s.db_url)} at revision {migrate.current(s.db_url)}")
    return 0


def db_current(args: argparse.Namespace) -> int:
    from . import migrate

    print(migrate.current(_settings().db_url) or "none")
    return 0


def _ensure_schema(settings) -> None:
    """Embedded SQLite migrates itself; elsewhere say how to migrate."""
    from . import migrate

    if settings.database_url is None:
        migrate.upgrade(settings.db_url)
        return
    if migrate.current(settings.db_url) is None:
        from welore_core.errors import InvalidArgument

        raise InvalidArgument(f"the database {_redact(settings.db_url)} has no schema; run `welore db upgrade` first")


def keys_create(args: argparse.Namespace) -> int:
    from .auth.keys import create_key
    from .db import session_scope

    s = _settings()
    _ensure_schema(s)
    with session_scope(s.db_url) as session:
        row, plain = create_key(session, args.name)
        key_id = row.id
    print(f"created API key {key_id} ({args.name or 'no name'}); it is shown only once:", file=sys.stderr)
    print(plain, flush=True)
    return 0


def keys_list(args: argparse.Namespace) -> int:
    from .auth.keys import list_keys
    from .db import session_scope

    s = _settings()
    _ensure_schema(s)
    with session_scope(s.db_url) as session:
        for k in list_keys(session):
            state = f"revoked {k.revoked_at:%Y-%m-%d}" if k.revoked_at else "active"
            print(f"{k.id}  {k.created_at:%Y-%m-%d %H:%M}  {state:<18} {k.name}")
    return 0


def keys_revoke(args: argparse.Namespace) -> int:
    from .auth.keys import revoke
    from .db import session_scope
    from welore_core.errors import InvalidArgument

    s = _settings()
    with session_scope(s.db_url) as session:
        if not revoke(session, args.key_id):
            raise InvalidArgument(f"no API key with id {args.key_id!r}; see `welore keys list`")
    print(f"revoked {args.key_id}")
    return 0


def bootstrap_key(settings) -> str | None:
    """On an empty database, create the first key (embedded start) and return it."""
    from .auth.keys import count_keys, create_key
    from .db import session_scope

    with session_scope(settings.db_url) as session:
        if count_keys(session):
            return None
        _, plain = create_key(session, "created by welore serve")
        return plain


KEEP_ALIVE_S = 75


def serve(args: argparse.Namespace, create_app=None) -> int:
    """Run the API. `create_app(settings)` builds the app (default api.app.create_app, which has no
    in-process worker: worker/cli.py passes worker.embedded.create_app)."""
    import uvicorn

    if create_app is None:
        from .app import create_app

    s = _settings()
    if s.embedded:
        from .statelock import acquire

        acquire(s.state_dir)  # before anything touches the database: one server per state directory
        _ensure_schema(s)
        s.artifacts.mkdir(parents=True, exist_ok=True)
        key = bootstrap_key(s)
        mode = (f"embedded: database {_redact(s.db_url)}, artifacts {s.artifacts}, in-process worker "
                f"({s.embedded_workers} thread(s)); set WELORE_DATABASE_URL and WELORE_REDIS_URL for production")
        print(f"welore serve — {mode}", flush=True)
        if key:
            print("first start with an empty database: created an API key (shown only once; "
                  "use it as 'Authorization: Bearer <key>'):", flush=True)
            print(f"WELORE_API_KEY={key}", flush=True)
    else:
        _ensure_schema(s)
        print(f"welore serve — database {_redact(s.db_url)}, broker {_redact(s.redis_url)}, "
              f"artifacts {s.artifacts}; run jobs with `welore worker`", flush=True)
    print(f"listening on http://{args.host}:{args.port} (OpenAPI at /docs)", flush=True)
    # Open SSE streams get a few seconds to end on shutdown; then running jobs are handed back.
    # Idle keep-alive connections stay open longer than clients keep them (httpx, requests and
    # browsers drop theirs after 5–60 s): a server that closes first races a client reusing the
    # connection, and the client sees its request fail with no response.
    uvicorn.run(create_app(s), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=5, timeout_keep_alive=KEEP_ALIVE_S)
    return 0
