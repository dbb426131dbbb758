"""Alembic environment: the URL comes from the config (set by api.migrate), `-x url=`, or the
service settings; SQLite runs in batch mode so later ALTERs work there too."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from api.models import Base

config = context.config


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url") or context.get_x_argument(as_dictionary=True).get("url")
    if url:
        return url
    from api.settings import get_settings

    return get_settings().db_url


def run_offline() -> None:
    context.configure(url=_url(), target_metadata=Base.metadata, literal_binds=True,
                      render_as_batch=_url().startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    url = _url()
    if url.startswith("sqlite"):
        import os

        os.makedirs(os.path.dirname(os.path.abspath(url.split("///", 1)[-1])), exist_ok=True)
    engine = create_engine(url)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata,
                          render_as_batch=url.startswith("sqlite"))
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
