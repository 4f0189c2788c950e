"""The background sender: audit rows waiting in SQL go to the syslog repository, once each.

One sender per database sends (an advisory lock on PostgreSQL, a file lock next to the
SQLite file), so two processes never send the same row. A row is marked sent (in
``audit_sent``) right after the transport accepted it. While the repository is down the
rows wait; the outage itself is recorded as an audit event (once per outage), and so is
the recovery. Messages never reach the log: only row ids and counts do.
"""

from __future__ import annotations

import fcntl
import logging
import threading
import time
from pathlib import Path
from typing import Any, Optional

from echonode.audit import syslog

LOG = logging.getLogger("echonode.audit")


class SenderLock:
    """Only one process sends for a database."""

    def __init__(self, settings: Any, engine: Any = None):
        self.settings = settings
        self.engine = engine
        self._fh = None
        self._conn = None

    def acquire(self) -> bool:
        from echonode.store.db import is_sqlite
        if is_sqlite(self.settings.db_url) or self.engine is None:
            path = Path(self.settings.data_path) / "audit-sender.lock"
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(path, "a+")
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.close()
                return False
            self._fh = fh
            return True
        from sqlalchemy import text
        conn = self.engine.connect()
        got = conn.execute(text("SELECT pg_try_advisory_lock(4242016)")).scalar()
        conn.commit()
        if not got:
            conn.close()
            return False
        self._conn = conn
        return True

    def release(self) -> None:
        if self._fh is not None:
            try:
                fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            finally:
                self._fh.close()
                self._fh = None
        if self._conn is not None:
            try:
                from sqlalchemy import text
                self._conn.execute(text("SELECT pg_advisory_unlock(4242016)"))
                self._conn.commit()
            except Exception:
                pass
            self._conn.close()
            self._conn = None


class AuditSender:
    def __init__(self, settings: Any, session_factory: Any, engine: Any = None):
        self.settings = settings
        self.sessions = session_factory
        a = settings.audit
        self.endpoint = syslog.parse_url(a.url)
        self.client = syslog.SyslogClient(self.endpoint, ca=a.ca, cert=a.cert, key=a.key, timeout_s=a.timeout_s)
        self.lock = SenderLock(settings, engine)
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.failing = False
        self.holding = False  # this process is the database's sender (holds the lock)
        self._skip: set[int] = set()
        self.sent_total = 0

    # -------------------------------------------------------------- one pass
    def send_pending(self, batch: int = 200) -> int:
        """Send everything waiting; returns how many were sent. Raises OSError when the
        repository cannot be reached (the rest stays waiting)."""
        from echonode.store import audit as store
        sent = 0
        after = 0
        while not self._stop.is_set():
            with self.sessions() as s:
                rows = [r for r in store.pending(s, limit=batch, after_id=after) if r[0] not in self._skip]
            if not rows:
                return sent
            self.client.ensure()
            done: list[int] = []
            try:
                for row_id, xml, when in rows:
                    after = row_id
                    rec = syslog.format_record(xml, seq=row_id, when=when)
                    try:
                        self.client.send(rec)
                    except syslog.MessageTooLarge as exc:
                        LOG.error("audit event %d cannot be sent: %s", row_id, exc)
                        self._skip.add(row_id)
                        continue
                    done.append(row_id)
            except OSError:
                self.client.close(linger_s=0)
                raise
            finally:
                if done:
                    with self.sessions() as s:
                        store.mark_sent(s, done)
                    sent += len(done)
                    self.sent_total += len(done)
        return sent

    def _record(self, event) -> None:
        from echonode import audit
        audit.record(self.sessions, event)

    def step(self) -> None:
        try:
            n = self.send_pending()
        except (OSError, ValueError) as exc:
            err = f"{type(exc).__name__}: {exc}"[:200]
            if not self.failing:
                self.failing = True
                LOG.error("audit repository %s unreachable (%s); audit messages wait in the database",
                          self.endpoint, err)
                from echonode.audit import events
                self._record(events.repository_failing(str(self.endpoint), err))
            raise
        if self.failing:
            self.failing = False
            LOG.warning("audit repository %s reachable again; %d waiting message(s) sent", self.endpoint, n)
            from echonode.audit import events
            self._record(events.repository_restored(str(self.endpoint), n))
            self.send_pending()
        elif n:
            LOG.debug("sent %d audit message(s)", n)

    # -------------------------------------------------------------- thread
    def _run(self) -> None:
        a = self.settings.audit
        delay = a.retry_initial_s
        while not self._stop.is_set():
            if not self.lock.acquire():
                self._stop.wait(5.0)
                continue
            self.holding = True
            try:
                while not self._stop.is_set():
                    try:
                        self.step()
                        delay = a.retry_initial_s
                        self.wake.wait(a.poll_s)
                        self.wake.clear()
                    except (OSError, ValueError):
                        self._stop.wait(delay)
                        delay = min(a.retry_max_s, delay * 2)
                    except Exception:
                        LOG.exception("audit sender error")
                        self._stop.wait(delay)
            finally:
                self.holding = False
                self.client.close()
                self.lock.release()

    def start(self) -> "AuditSender":
        self._thread = threading.Thread(target=self._run, name="audit-sender", daemon=True)
        self._thread.start()
        return self

    def stop(self, flush_s: float = 5.0) -> None:
        """Stop after one last attempt to send what is waiting (bounded by ``flush_s``)."""
        deadline = time.monotonic() + flush_s
        self.wake.set()
        if self._thread is not None:
            # let the loop pick up events recorded during shutdown
            from echonode.store import audit as store
            while time.monotonic() < deadline and not self.failing and self.holding:
                with self.sessions() as s:
                    if store.pending_count(s) <= len(self._skip):
                        break
                self.wake.set()
                time.sleep(0.1)
        self._stop.set()
        self.wake.set()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, deadline - time.monotonic()))
        self.client.close()


def flush(settings: Any, session_factory: Any, engine: Any = None, timeout_s: float = 10.0) -> int:
    """One-shot commands: send what is waiting, if no other process (serve) is the sender.
    Returns the number sent; never raises for an unreachable repository."""
    if not settings.audit.url:
        return 0
    s = AuditSender(settings, session_factory, engine)
    if not s.lock.acquire():
        return 0  # a running node sends them
    try:
        s.step()
    except (OSError, ValueError):
        pass
    finally:
        s.client.close()
        s.lock.release()
    return s.sent_total
