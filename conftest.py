"""Shared pytest fixtures: paths to ../shared, free ports, real PostgreSQL and Redis.

Fixture modules live in ``tests/fixtures/*.py`` (one per area: dcmtk, orthanc, models, ...)
and are loaded automatically below, so each area owns its own file.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent

pytest_plugins = sorted(
    f"tests.fixtures.{p.stem}" for p in (ROOT / "tests" / "fixtures").glob("*.py") if p.stem != "__init__"
)


def _shared_dir() -> Path:
    env = os.environ.get("ECHONODE_SHARED")
    if env:
        return Path(env)
    for cand in (ROOT.parent / "shared", ROOT / "shared"):
        if cand.is_dir():
            return cand
    return ROOT.parent / "shared"


SHARED = _shared_dir()
REALWORLD = SHARED / "data" / "realworld"
ECHOCLIP_DATA = SHARED / "data" / "echoclip"

PG_ADMIN_URL = os.environ.get("ECHONODE_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("ECHONODE_TEST_REDIS", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"shared data not found at {SHARED}; set ECHONODE_SHARED")
    return SHARED


@pytest.fixture(scope="session")
def realworld_dir(shared_dir) -> Path:
    return shared_dir / "data" / "realworld"


@pytest.fixture(scope="session")
def echoclip_data(shared_dir) -> Path:
    return shared_dir / "data" / "echoclip"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def pg_url():
    """A fresh, empty PostgreSQL database on 127.0.0.1:5432, dropped afterwards."""
    sqlalchemy = pytest.importorskip("sqlalchemy")
    name = "echonode_test_" + uuid.uuid4().hex[:12]
    admin = sqlalchemy.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
        admin.dispose()


@pytest.fixture
def redis_url():
    """A Redis database number of its own on 127.0.0.1:6379, flushed before and after."""
    redis = pytest.importorskip("redis")
    db = 1 + (os.getpid() % 14)
    url = REDIS_URL.rsplit("/", 1)[0] + f"/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()
