"""Shared pytest fixtures: the test data in tests/data, free ports, real PostgreSQL and Redis.

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


# Real-world DICOM and the EchoCLIP release files live inside the repository (provenance and
# licences in tests/data/*/PROVENANCE.md), so a fresh clone runs the tests without anything else.
# Only the tests read them: nothing under echonode/ or train/ does, and the package ships none.
DATA = ROOT / "tests" / "data"
REALWORLD = DATA / "realworld"
ECHOCLIP_DATA = DATA / "echoclip"

PG_ADMIN_URL = os.environ.get("ECHONODE_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("ECHONODE_TEST_REDIS", "redis://127.0.0.1:6379/0")


def _present(path: Path) -> Path:
    if not path.is_dir():
        pytest.fail(f"test data missing at {path} (it is part of the repository: check the clone)")
    return path


@pytest.fixture(scope="session")
def realworld_dir() -> Path:
    """Real-world ultrasound and SR files: us_multiframe/, us_singleframe/, sr/."""
    return _present(REALWORLD)


@pytest.fixture(scope="session")
def echoclip_data() -> Path:
    """EchoCLIP's released data files (MIT): vocabulary, prompts, example report and video."""
    return _present(ECHOCLIP_DATA)


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
