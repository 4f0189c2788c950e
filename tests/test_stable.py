"""Stable-study detection and analysis jobs, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from echonode.pipeline.stable import StableScheduler
from echonode.store import db
from echonode.store.index import stabilise_studies
from echonode.store.models import AnalysisJob, Study, utcnow
from tests.fixtures.ingest import store, us_dataset

pytestmark = pytest.mark.timeout(120)


def later(seconds: float) -> dt.datetime:
    return utcnow() + dt.timedelta(seconds=seconds)


def studies(spool):
    with spool.sessions() as s:
        return {st.study_instance_uid: st for st in s.scalars(select(Study))}


def jobs(spool):
    with spool.sessions() as s:
        return list(s.scalars(select(AnalysisJob).order_by(AnalysisJob.id)))


def test_stable_after_delay_job_once_and_new_version(spool):
    clip_study, stills_study = generate_uid(), generate_uid()
    assert store(spool, us_dataset(study=clip_study, frames=10)).ok
    assert store(spool, us_dataset(study=stills_study, frames=1)).ok
    # not yet: delay not over
    assert stabilise_studies(spool.sessions, 5.0) == ([], 0)
    created, n = stabilise_studies(spool.sessions, 5.0, now=later(6))
    assert n == 2 and [j.study_instance_uid for j in created] == [clip_study]
    st = studies(spool)
    assert st[clip_study].state == "queued" and st[stills_study].state == "stable"
    # exactly once: further ticks create nothing
    assert stabilise_studies(spool.sessions, 5.0, now=later(60)) == ([], 0)
    [job] = jobs(spool)
    assert (job.state, job.study_version, job.attempts) == ("queued", 1, 0)

    # a late instance sends the study back to receiving with a new version …
    assert store(spool, us_dataset(study=clip_study, frames=10, seed=3)).ok
    st = studies(spool)[clip_study]
    assert (st.state, st.version) == ("receiving", 2)
    # … and, once stable again, it gets a new job for the new version
    created, _ = stabilise_studies(spool.sessions, 5.0, now=later(6))
    assert [(j.study_instance_uid, j.study_version) for j in created] == [(clip_study, 2)]
    assert [(j.study_version, j.state) for j in jobs(spool)] == [(1, "queued"), (2, "queued")]
    # an identical duplicate does not reopen the study
    ds = us_dataset(study=stills_study, frames=1, seed=9)
    assert store(spool, ds).ok and stabilise_studies(spool.sessions, 5.0, now=later(6))[1] == 1
    assert store(spool, ds).duplicate
    assert studies(spool)[stills_study].state == "stable"


def test_many_schedulers_one_job_per_study(spool, ingest_settings):
    """Four schedulers (own engines, as in four processes) race over 20 stable studies."""
    uids = [generate_uid() for _ in range(20)]
    for i, u in enumerate(uids):
        assert store(spool, us_dataset(study=u, frames=5, seed=i)).ok
    engines = [db.make_engine(ingest_settings.db_url) for _ in range(4)]
    barrier = threading.Barrier(4)
    created: list = []
    lock = threading.Lock()
    when = later(10)

    def run(engine):
        sessions = db.session_factory(engine)
        barrier.wait()
        for _ in range(3):
            got, _ = stabilise_studies(sessions, 5.0, now=when)
            with lock:
                created.extend(got)

    threads = [threading.Thread(target=run, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for e in engines:
        e.dispose()
    assert sorted(j.study_instance_uid for j in created) == sorted(uids)
    assert len(jobs(spool)) == 20
    assert all(s.state == "queued" for s in studies(spool).values())


def test_scheduler_thread_calls_back(spool, ingest_settings):
    s = ingest_settings.replace(stable=ingest_settings.stable.__class__(delay_s=0.2, poll_s=0.05))
    seen = []
    done = threading.Event()

    def on_job(job):
        seen.append(job)
        done.set()

    sched = StableScheduler(s, spool.sessions, on_job=on_job).start()
    try:
        uid = generate_uid()
        assert store(spool, us_dataset(study=uid, frames=6)).ok
        assert done.wait(10)
    finally:
        sched.stop()
    assert [j.study_instance_uid for j in seen] == [uid]
    assert studies(spool)[uid].state == "queued"
