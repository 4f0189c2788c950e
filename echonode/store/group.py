"""Group commit: concurrent writers of one process share one transaction and one COMMIT.

Used for what is written once per received instance (``store.index.record_instance``,
the audit rows of ``store.audit.record``): with several associations storing at once,
their rows reach the disk with one synchronous COMMIT instead of one each, and SQLite
writers of this process queue here (woken at once) instead of on the database lock
(where the busy handler sleeps between tries).
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections import deque
from typing import Any


class GroupCommit:
    """Concurrent writers on one session factory share one transaction and one COMMIT.

    A synchronous COMMIT costs an fsync (SQLite WAL, ``synchronous=FULL``) or a WAL flush
    (PostgreSQL), and concurrent SQLite writers otherwise queue on the database lock with
    the busy handler's sleeps. Here callers queue in the process instead: the first in
    line leads, takes everyone waiting behind it (up to ``max_batch``), runs their
    statements in one session, awaits their ``wait``s, commits once and hands each its
    result; then the next in line leads. Nobody gets a result before the COMMIT that made
    it durable. When the shared transaction fails, each job runs again in a transaction of
    its own (``job.alone()``), so one bad record fails only itself; a job whose own file
    step failed (``job.final_error``) gets that error instead. A batch of one runs
    ``job.alone()`` directly.

    A job has ``statements(session) -> (result, wait or None)``, ``alone() -> result`` and
    ``final_error``; it must not call :meth:`run` itself (it would wait behind itself)."""

    def __init__(self, sessions, max_batch: int = 32):
        self.sessions = sessions
        self.max_batch = max_batch
        self._cond = threading.Condition()
        self._queue: deque[_Waiter] = deque()
        self._leading = threading.local()
        # for the log and the tests: jobs done, transactions that committed them, largest batch
        self.jobs = self.commits = self.largest = 0

    def waiting(self) -> int:
        """Jobs queued or being committed now."""
        with self._cond:
            return len(self._queue)

    def summary(self) -> str:
        return f"{self.jobs} writes in {self.commits} commits (largest group {self.largest})"

    def run(self, job):
        if getattr(self._leading, "on", False):
            raise RuntimeError("a group-commit job may not start another one")
        me = _Waiter(job)
        with self._cond:
            self._queue.append(me)
            while not me.done and self._queue[0] is not me:
                self._cond.wait()
            batch = [] if me.done else list(itertools.islice(self._queue, self.max_batch))
        if batch:  # first in line: lead this batch (we stay at the front until it is done)
            self._leading.on = True
            commits = 0
            try:
                commits = self._lead(batch)
            finally:
                self._leading.on = False
                with self._cond:
                    self.jobs += len(batch)
                    self.commits += commits
                    self.largest = max(self.largest, len(batch))
                    for w in batch:
                        self._queue.popleft()
                        if not w.settled:  # the leader was interrupted (BaseException)
                            w.result, w.error = None, RuntimeError("group commit interrupted")
                        w.done = True
                    self._cond.notify_all()
        if me.error is not None:
            raise me.error
        return me.result

    def _lead(self, batch: list["_Waiter"]) -> int:
        """Settle every job of ``batch``; returns the number of transactions used."""
        if len(batch) > 1:
            try:
                with self.sessions() as session, session.begin():
                    waits = []
                    for w in batch:
                        w.result, wait = w.job.statements(session)
                        waits.append(wait)
                    for wait in waits:
                        if wait is not None:
                            wait()
            except Exception:
                pass  # each job alone, below
            else:
                for w in batch:
                    w.settled = True
                return 1
        for w in batch:
            w.result = None
            if w.job.final_error is not None:
                w.error = w.job.final_error
            else:
                try:
                    w.result = w.job.alone()
                except Exception as exc:
                    w.error = exc
            w.settled = True
        return len(batch)


class _Waiter:
    __slots__ = ("job", "result", "error", "settled", "done")

    def __init__(self, job):
        self.job, self.result, self.error = job, None, None
        self.settled = False  # result or error is final (set by the leader)
        self.done = False     # handed back (set under the lock, after the COMMIT)


_group_commits: "weakref.WeakKeyDictionary[Any, GroupCommit]" = weakref.WeakKeyDictionary()
_group_commits_lock = threading.Lock()


def group_commit(sessions) -> GroupCommit:
    """The process's :class:`GroupCommit` for the session factory ``sessions``."""
    with _group_commits_lock:
        try:
            gc = _group_commits.get(sessions)
            if gc is None:
                gc = _group_commits[sessions] = GroupCommit(sessions)
        except TypeError:  # a factory that takes no weak reference: no sharing, same semantics
            gc = GroupCommit(sessions)
        return gc
