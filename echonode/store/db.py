"""Engines, sessions and schema migrations.

* :func:`make_engine` — SQLite (default, WAL, ``synchronous=FULL`` so a committed row
  survives power loss, ``BEGIN IMMEDIATE`` so concurrent writers queue instead of
  failing) or PostgreSQL by URL.
* :func:`session_factory` — a ``sessionmaker`` bound to an engine.
* :func:`migrate` — ``alembic upgrade head``, configured in code so it works from an
  installed package (no ``alembic.ini`` needed); call it at start-up.

Importing this module imports every table module (``models``, ``outbox``,
``results``), so ``Base.metadata`` is complete wherever the store is used.
"""

from __future__ import annotations

import importlib
import os
import threading
from pathlib import Path

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from echonode.store.base import Base

for _mod in ("echonode.store.models", "echonode.store.outbox", "echonode.store.interpretations",
             "echonode.store.jobs", "echonode.store.audit",
             "echonode.store.priors", "echonode.store.workers"):
    importlib.import_module(_mod)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()

__all__ = ["Base", "make_engine", "session_factory", "migrate", "is_sqlite", "get_engine", "describe_error"]


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def make_engine(url: str, **kwargs) -> Engine:
    """A new Engine for ``url``; SQLite gets WAL, full fsync and immediate write locks.

    Statement parameters are hidden from SQLAlchemy's exception messages (``hide_parameters``):
    they hold patient IDs and birth dates, and those messages reach the logs."""
    create = kwargs.pop("create", True)     # False: never create the SQLite file (read-only commands)
    kwargs.setdefault("hide_parameters", True)
    if is_sqlite(url):
        u = make_url(url)
        if u.database and u.database != ":memory:" and create:
            _create_private_file(Path(u.database).expanduser())
        connect_args = {"timeout": 60, "check_same_thread": False}
        connect_args.update(kwargs.pop("connect_args", {}))
        engine = create_engine(url, connect_args=connect_args, **kwargs)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):  # pragma: no cover - trivial
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn):  # pragma: no cover - trivial
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def _create_private_file(path: Path) -> None:
    """The SQLite file holds patient data: created 0640 in a 0750 directory, before SQLite
    would create it with the umask's permissions."""
    from echonode.files import FILE_MODE, ensure_dir

    ensure_dir(path.parent)
    if not path.exists():
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, FILE_MODE))
        os.chmod(path, FILE_MODE)


class NotMigrated(RuntimeError):
    """The database does not exist yet or is not at this echonode's schema revision."""


def require_migrated(url: str) -> None:
    """For read-only commands, which never migrate: raise :class:`NotMigrated` with what to do
    when the database is missing or behind. Creates nothing."""
    from alembic.script import ScriptDirectory

    if is_sqlite(url):
        u = make_url(url)
        if u.database and u.database != ":memory:" and not Path(u.database).expanduser().is_file():
            raise NotMigrated(f"no database yet ({Path(u.database).expanduser()}): `echonode serve` creates "
                              "and migrates it on start")
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    current = current_revision(url)
    if current != head:
        raise NotMigrated(f"the database is not migrated yet (schema revision {current or 'none'}, this "
                          f"echonode needs {head}): `echonode serve` or `echonode worker` migrates it on start")


def ping(session_factory) -> None:
    """Round-trip to the database (raises if it does not answer); for health checks."""
    with session_factory() as s:
        s.execute(text("SELECT 1"))


def describe_error(exc: BaseException) -> str:
    """A log-safe description of a database error: no statement, no parameters, no values.

    PostgreSQL's own messages quote the offending statement with its values interpolated
    (psycopg2 binds on the client) and data errors quote the value itself, so only the
    error class and SQLSTATE are kept for it; SQLite's messages name tables/columns only.
    """
    orig = getattr(exc, "orig", None)
    if orig is None:
        return type(exc).__name__
    pgcode = getattr(orig, "pgcode", None)
    if pgcode is not None or type(orig).__module__.startswith("psycopg"):
        return f"{type(exc).__name__} ({type(orig).__name__}, SQLSTATE {pgcode or '?'})"
    if type(orig).__module__.startswith("sqlite3"):
        return f"{type(exc).__name__} ({str(orig).splitlines()[0][:200] if str(orig) else type(orig).__name__})"
    return f"{type(exc).__name__} ({type(orig).__name__})"


def get_engine(url: str) -> Engine:
    """A process-wide cached engine for ``url`` (one pool per URL)."""
    with _engines_lock:
        eng = _engines.get(url)
        if eng is None:
            eng = _engines[url] = make_engine(url)
        return eng


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["url"] = url
    return cfg


def migrate(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` (default: the newest)."""
    from alembic import command

    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # several processes (serve, worker) may start at once: migrate one at a time
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(4242001)")
            cfg = alembic_config(url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    finally:
        engine.dispose()


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url, create=False)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
