"""Where the platform's data lives, and the SQLAlchemy engine over it.

Default: one SQLite file, `k2serve.db`, in the data directory (`--data-dir`, else
`$K2SERVE_HOME`, else `~/.k2serve`), shared by the server and every CLI command. WAL journal,
`synchronous=FULL`, a 30 s busy timeout: readers never block the writer, a crash or a kill
loses no committed row. PostgreSQL (or any SQLAlchemy URL) by `--database-url` or
`$K2SERVE_DATABASE_URL`.

The schema is created and upgraded by Alembic (`migrations/`), programmatically, every time a
process opens the database: `alembic upgrade head` under a lock, so two processes starting at
once do not race.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

DB_FILENAME = "k2serve.db"
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_PG_MIGRATION_LOCK = 0x6B32_7365  # pg_advisory_xact_lock key for `alembic upgrade`


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """`--data-dir`, else $K2SERVE_HOME, else ~/.k2serve."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("K2SERVE_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".k2serve"


def database_url(explicit: str | None = None, data_directory: str | os.PathLike | None = None) -> str:
    """`--database-url`, else $K2SERVE_DATABASE_URL, else the SQLite file in the data dir."""
    url = explicit or os.environ.get("K2SERVE_DATABASE_URL")
    if url:
        return normalize_url(url)
    directory = data_dir(data_directory)
    return f"sqlite:///{directory / DB_FILENAME}"


def normalize_url(url: str) -> str:
    """`postgresql://` and `postgres://` mean psycopg 3 (the driver k2serve depends on)."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def redact(url: str) -> str:
    """The URL with its password hidden, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<database url>"


def make_engine(url: str) -> Engine:
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        _sqlite_pragmas_and_real_transactions(engine)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def _sqlite_pragmas_and_real_transactions(engine: Engine) -> None:
    """WAL + durable commits, and transactions that really BEGIN (pysqlite's legacy mode
    defers BEGIN until the first write, so a read-then-write could race another process).
    A connection run with execution_options(sqlite_begin="IMMEDIATE") takes the write lock
    at BEGIN."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=30000")
        _wal(cursor)
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


def _wal(cursor) -> None:
    """Switch the file to WAL once. The switch needs an exclusive lock, and SQLite may answer
    "database is locked" without waiting when processes open a new file at the same time."""
    import sqlite3

    deadline = time.monotonic() + 30
    while True:
        try:
            mode = cursor.execute("PRAGMA journal_mode").fetchone()[0].lower()
            if mode != "wal":  # answers the old mode when it could not switch
                mode = cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower()
            if mode == "wal" or mode == "memory":
                return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise sqlite3.OperationalError("could not switch the database to WAL mode")
        time.sleep(0.05)

def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def upgrade(engine: Engine) -> None:
    """`alembic upgrade head`, serialised between processes."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("path_separator", "os")
    options = {"sqlite_begin": "IMMEDIATE"} if is_sqlite(engine) else {}
    with engine.connect() as conn:
        conn = conn.execution_options(**options)
        with conn.begin():
            if engine.dialect.name == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")


class Database:
    """Engine + session factory over one URL, migrated to head when opened."""

    def __init__(self, url: str, *, migrate: bool = True):
        self.url = normalize_url(url)
        self.engine = make_engine(self.url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if migrate:
            upgrade(self.engine)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def session(self) -> Session:
        return self._sessions()

    @contextlib.contextmanager
    def write(self):
        """A write transaction; on SQLite it takes the write lock at BEGIN (IMMEDIATE)."""
        options = {"sqlite_begin": "IMMEDIATE"} if is_sqlite(self.engine) else {}
        with self.engine.connect() as conn:
            conn = conn.execution_options(**options)
            with Session(bind=conn, expire_on_commit=False) as session:
                with session.begin():
                    yield session

    def journal_mode(self) -> str | None:
        if not is_sqlite(self.engine):
            return None
        with self.engine.connect() as conn:
            return conn.exec_driver_sql("PRAGMA journal_mode").scalar()

    def close(self) -> None:
        self.engine.dispose()


def open_database(*, database_url_arg: str | None = None, data_dir_arg: str | None = None,
                  migrate: bool = True) -> Database:
    return Database(database_url(database_url_arg, data_dir_arg), migrate=migrate)
