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
from echonode.audit.events import Event, context  # noqa: F401
from echonode.audit.message import to_xml

LOG = logging.getLogger("echonode.audit")

_wakers: list[threading.Event] = []
failed_writes = 0
_settings: Any = None
_recorded = False


def configure(settings: Any):  # noqa: F811 - wraps events.configure to remember the settings
    """Set who reports events (AE title, AuditSourceID) and remember the settings for :func:`flush_at_exit`."""
    global _settings
    from echonode.audit import events as _events
    _settings = settings
    return _events.configure(settings)


def record(target: Any, event: Any) -> Optional[int]:
    """Store ``event`` (an Event or a list of them); returns the (last) row id, or None when
    a Session target was given or on failure.

    ``target``: a SQLAlchemy Session (rows added, the caller commits) or a session factory."""
    global failed_writes
    if event is None or target is None:
        return None
    global _recorded
    _recorded = True
    if isinstance(event, (list, tuple)):
        rid = None
        for e in event:
            rid = record(target, e)
        return rid
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
        if hasattr(target, "db_url"):  # Settings: one-shot commands that hold no session
            target = _factory_for(target)
        rid = store.record(target, **fields)
        _wake()
        return rid
    except Exception as exc:  # never fail the audited work because of its audit record
        failed_writes += 1
        from echonode.store.db import describe_error
        LOG.error("could not record audit event %s: %s", event.name, describe_error(exc))
        return None


_factories: dict = {}


def _factory_for(settings: Any):
    """A session factory on the settings' database, migrated once per process."""
    from echonode.store import db
    url = settings.db_url
    if url not in _factories:
        settings.data_path.mkdir(parents=True, exist_ok=True)
        db.migrate(url)
        _factories[url] = db.session_factory(db.get_engine(url))
    return _factories[url]


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


def stop(session_factory: Any, sender: Any = None, what: str = "serve") -> None:
    """Record the application stop, then let the sender deliver what is waiting and stop."""
    record(session_factory, application_stop(what))  # noqa: F405
    if sender is not None:
        sender.stop()
        try:
            _wakers.remove(sender.wake)
        except ValueError:
            pass


def flush_at_exit() -> int:
    """For one-shot commands: if this process recorded events and a repository is
    configured, send what is waiting (skipped when a running node holds the sender lock)."""
    if not _recorded or _settings is None or not _settings.audit.url:
        return 0
    from echonode.store import db
    engine = db.make_engine(_settings.db_url)
    try:
        return flush(_settings, db.session_factory(engine), engine)
    except Exception as exc:
        LOG.error("audit flush failed: %s", type(exc).__name__)
        return 0
    finally:
        engine.dispose()


