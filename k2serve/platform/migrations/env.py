"""Alembic environment. Normally run in-process by `k2serve.platform.db.upgrade`, which hands
over an open connection (inside a transaction, under a lock). From a checkout, new revisions
can be authored with `alembic -x url=sqlite:///path.db revision --autogenerate -m msg`
using a config whose script_location points here."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from k2serve.platform.models import Base

config = context.config
target_metadata = Base.metadata


def _configure(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite",
                      compare_type=True)


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or \
        config.get_main_option("sqlalchemy.url")
    engine = create_engine(url)
    with engine.connect() as conn:
        _configure(conn)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported")
run_migrations_online()
