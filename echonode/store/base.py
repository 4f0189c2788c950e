"""SQLAlchemy declarative base shared by every table of echonode.

``store/`` is the only package that writes SQL. Table modules:

* ``store/models.py``           patients, studies, series, instances, stable-study state, jobs
* ``store/index.py``            the ingest index: recording instances, stable studies → jobs
* ``store/jobs.py``             the job state machine and its dispatch bookkeeping
* ``store/interpretations.py``  interpretations and EchoCLIP-R study embeddings
* ``store/outbox.py``           the outbox (results waiting for delivery)
* ``store/status.py``           read-only queries for status, metrics and the demo
* ``store/audit.py``            audit events (where present)

All tables hang off this one ``Base.metadata`` so Alembic sees one schema.
"""

from __future__ import annotations

from sqlalchemy import MetaData
from sqlalchemy.orm import DeclarativeBase

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
