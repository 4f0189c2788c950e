"""Audit trail (DICOM PS3.15 Annex A.5, IHE ATNA): who sent what, what was sent where.

Call sites use one line::

    from echonode import audit
    audit.record(session_or_factory, audit.instance_received(result, calling_ae=..., peer=...))

:func:`record` stores the event in SQL (``echonode.store.audit``, append-only). With a
``Session`` it only adds the row, so it commits together with the caller's own change;
with a session factory it commits on its own. A background :class:`AuditSender` (started
by ``echonode serve``) sends waiting rows to the syslog repository ``[audit] url``;
one-shot commands call :func:`flush`.

Recording never raises into the caller's work path (a failed audit write is logged,
without patient data, and counted); audit messages themselves never reach a log.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Optional

from echonode.audit.events import *  # noqa: F401,F403 - the event builders are the API
from echonode.audit.events import Event, configure, context  # noqa: F401
from echonode.audit.message import to_xml

LOG = logging.getLogger("echonode.audit")

_wakers: list[threading.Event] = []
failed_writes = 0


def record(target: Any, event: Optional[Event]) -> Optional[int]:
    """Store ``event``; returns the row id (None if a Session target was given or on failure).

    ``target``: a SQLAlchemy Session (row added, caller commits) or a session factory."""
    global failed_writes
    if event is None or target is None:
        return None
    try:
        from sqlalchemy.orm import Session

        from echonode.store import audit as store
        msg = event.message
        fields = dict(occurred_at=event.occurred_at, event=event.name, event_id=msg.event_id.code,
                      action=msg.action, outcome=msg.outcome, message=to_xml(msg),
                      study_uid=event.study_uid, patient_key=event.patient_key, summary=event.summary)
        if isinstance(target, Session):
            store.insert(target, **fields)
            _wake()
            return None
        with target() as s:
            row = store.insert(s, **fields)
            s.commit()
            rid = row.id
        _wake()
        return rid
    except Exception as exc:  # never fail the audited work because of its audit record
        failed_writes += 1
        from echonode.store.db import describe_error
        LOG.error("could not record audit event %s: %s", event.name, describe_error(exc))
        return None


def _wake() -> None:
    for w in list(_wakers):
        w.set()


def start_sender(settings: Any, session_factory: Any, engine: Any = None):
    """The background sender for ``serve`` (None when no repository is configured)."""
    if not settings.audit.url:
        return None
    from echonode.audit.sender import AuditSender
    s = AuditSender(settings, session_factory, engine).start()
    _wakers.append(s.wake)
    return s


def flush(settings: Any, session_factory: Any, engine: Any = None) -> int:
    from echonode.audit.sender import flush as _flush
    return _flush(settings, session_factory, engine)
