"""Pipeline units against real SQLite and PostgreSQL and real brokers (embedded SQLite, Redis).

Job rows, dispatch claims (exactly once across dispatchers), the lease reaper, waiting
for a model, priors from SQL, the Celery configuration and the metrics endpoint.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

from echonode.config import load_settings
from echonode.store import db
from echonode.store import interpretations, jobs
from echonode.store.jobs import JobDispatch
from echonode.store import status as store_status
from echonode.store.models import AnalysisJob, Instance, Patient, Series, Study, utcnow


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'echonode.sqlite3'}"
    else:
        url = request.getfixturevalue("pg_url")
    db.migrate(url)
    yield url
    with db._engines_lock:
        eng = db._engines.pop(url, None)
    if eng is not None:
        eng.dispose()


def settings_for(tmp_path, db_url, **queue):
    return load_settings(env={}, overrides={
        "data_dir": str(tmp_path / "data"), "database_url": db_url,
        "queue": queue, "stable": {"poll_s": 0.2}, "metrics": {"port": 0},
    })


def make_job(Session, n: int, *, patient="P1", issuer="", date="20240101", state="queued") -> int:
    with Session.begin() as s:
        pat = s.query(Patient).filter_by(patient_id=patient, issuer=issuer).one_or_none()
        if pat is None:
            pat = Patient(patient_id=patient, issuer=issuer)
            s.add(pat)
            s.flush()
        st = Study(study_instance_uid=f"1.2.826.0.1.3680043.10.1.{n}", patient_pk=pat.id, study_date=date,
                   state="queued")
        s.add(st)
        s.flush()
        se = Series(series_instance_uid=f"1.2.826.0.1.3680043.10.2.{n}", study_pk=st.id, modality="US")
        s.add(se)
        s.flush()
        s.add(Instance(sop_instance_uid=f"1.2.826.0.1.3680043.10.3.{n}", series_pk=se.id, study_pk=st.id,
                       sop_class_uid="1.2.840.10008.5.1.4.1.1.3.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
                       number_of_frames=40, path=f"instances/x/{n}.dcm", size=10, sha256="0" * 64,
                       decision="analyse", reason="test"))
        job = AnalysisJob(study_pk=st.id, study_instance_uid=st.study_instance_uid, study_version=1, state=state)
        s.add(job)
        s.flush()
        return job.id


def job_state(Session, job_id):
    with Session() as s:
        j = s.get(AnalysisJob, job_id)
        return j.state, j.attempts, j.error


# --------------------------------------------------------------------------- job rows

def test_job_transitions_are_conditional(db_url):
    Session = db.session_factory(db.get_engine(db_url))
    jid = make_job(Session, 1)
    with Session.begin() as s:
        lease = jobs.start_job(s, jid, "w1")
    assert lease and len(lease) == 32
    with Session.begin() as s:
        assert not jobs.start_job(s, jid, "w2"), "a running job must not be claimed twice"
    with Session.begin() as s:
        assert not jobs.finish_job(s, jid, "w1"), "a worker name is not a lease"
        assert not jobs.finish_job(s, jid, "0" * 32), "only the owner's lease may finish"
        assert jobs.finish_job(s, jid, lease)
    assert job_state(Session, jid)[:2] == ("done", 1)
    with Session.begin() as s:
        assert not jobs.start_job(s, jid, "w3"), "a done job is never re-run by a re-delivered message"

    ctx_id = make_job(Session, 2)
    with Session() as s:
        ctx = jobs.job_context(s, ctx_id)
    assert ctx.study_instance_uid.endswith(".2") and len(ctx.clips) == 1
    assert ctx.patient_key == interpretations.patient_key("P1", "") and "P1" not in ctx.patient_key


def test_reaper_requeues_then_fails(db_url):
    Session = db.session_factory(db.get_engine(db_url))
    jid = make_job(Session, 1)
    with Session.begin() as s:
        assert jobs.start_job(s, jid, "w1")
    with Session.begin() as s:   # fresh heartbeat: nothing to reap
        assert jobs.reap_stale_jobs(s, lease_s=60, max_attempts=2) == ([], [])
    old = utcnow() - dt.timedelta(seconds=600)
    with Session.begin() as s:
        s.query(AnalysisJob).filter_by(id=jid).update({"updated_at": old})
        s.query(JobDispatch).filter_by(job_id=jid).update({"heartbeat_at": old})
    with Session.begin() as s:
        assert jobs.reap_stale_jobs(s, lease_s=60, max_attempts=2) == ([jid], [])
    state, attempts, err = job_state(Session, jid)
    assert state == "queued" and attempts == 1 and "stopped" in err
    with Session.begin() as s:
        assert jobs.start_job(s, jid, "w2")
        s.query(AnalysisJob).filter_by(id=jid).update({"updated_at": old})
        s.query(JobDispatch).filter_by(job_id=jid).update({"heartbeat_at": old})
    with Session.begin() as s:
        assert jobs.reap_stale_jobs(s, lease_s=60, max_attempts=2) == ([], [jid])
    state, attempts, err = job_state(Session, jid)
    assert state == "failed" and attempts == 2 and "max_attempts=2" in err


def test_stale_lease_changes_nothing(db_url):
    """A worker paused past its lease resumes after the reaper gave the job to another:
    its heartbeat, finish and fail are refused, the takeover's are not."""
    Session = db.session_factory(db.get_engine(db_url))
    jid = make_job(Session, 1)
    with Session.begin() as s:
        stale = jobs.start_job(s, jid, "w1")
    old = utcnow() - dt.timedelta(seconds=600)
    with Session.begin() as s:
        s.query(AnalysisJob).filter_by(id=jid).update({"updated_at": old})
        s.query(JobDispatch).filter_by(job_id=jid).update({"heartbeat_at": old})
    with Session.begin() as s:
        assert jobs.reap_stale_jobs(s, lease_s=60, max_attempts=3) == ([jid], [])
    with Session.begin() as s:   # the stale worker resumes before the job is taken again
        assert not jobs.heartbeat(s, jid, stale)
        assert not jobs.fail_job(s, jid, "boom", stale), "a stale lease must not fail the queued job"
        assert not jobs.owns(s, jid, stale)
    assert job_state(Session, jid)[0] == "queued"
    with Session.begin() as s:
        fresh = jobs.start_job(s, jid, "w2")
    with Session.begin() as s:
        assert not jobs.heartbeat(s, jid, stale) and jobs.heartbeat(s, jid, fresh)
        assert not jobs.finish_job(s, jid, stale) and not jobs.fail_job(s, jid, "boom", stale)
        assert jobs.finish_job(s, jid, fresh)
    assert job_state(Session, jid)[0] == "done"


def test_transient_failure_requeues_with_backoff_then_fails_by_time(db_url):
    Session = db.session_factory(db.get_engine(db_url))
    jid = make_job(Session, 1)
    with Session.begin() as s:
        lease = jobs.start_job(s, jid, "w1")
    with Session.begin() as s:
        assert jobs.retry_transient(s, jid, lease, "OperationalError", retry_for_s=3600, backoff_s=30,
                                    backoff_max_s=300) == "queued"
    state, attempts, err = job_state(Session, jid)
    assert state == "queued" and attempts == 0 and "transient" in err, "a transient failure spends no attempt"
    with Session.begin() as s:
        assert not jobs.start_job(s, jid, "w2"), "not before the backoff"
        assert jid not in [j for j, _ in jobs.jobs_to_dispatch(s, redispatch_after_s=60)]
        s.query(JobDispatch).filter_by(job_id=jid).update({"retry_at": utcnow() - dt.timedelta(seconds=1)})
    with Session.begin() as s:
        assert jid in [j for j, _ in jobs.jobs_to_dispatch(s, redispatch_after_s=60)]
        lease = jobs.start_job(s, jid, "w2")
    with Session.begin() as s:   # failing for longer than retry_for_s: permanent now
        s.query(JobDispatch).filter_by(job_id=jid).update({"failing_since": utcnow() - dt.timedelta(seconds=4000)})
    with Session.begin() as s:
        assert jobs.retry_transient(s, jid, lease, "OperationalError", retry_for_s=3600, backoff_s=30,
                                    backoff_max_s=300) == "failed"
    state, _, err = job_state(Session, jid)
    assert state == "failed" and "queue.retry_for_s" in err


def test_transient_classes():
    from sqlalchemy.exc import OperationalError

    from echonode.analysis import AnalysisError
    from echonode.pipeline.tasks import is_transient

    assert is_transient(OperationalError("SELECT 1", {}, Exception("server closed the connection")))
    assert is_transient(ConnectionRefusedError()) and is_transient(TimeoutError())
    import redis.exceptions
    assert is_transient(redis.exceptions.ConnectionError("down"))
    assert not is_transient(AnalysisError("no clip of the study could be decoded"))
    assert not is_transient(ValueError("an SR that cannot be built"))


def test_priors_same_patient_earlier_same_model(db_url):
    Session = db.session_factory(db.get_engine(db_url))
    me = interpretations.patient_key("P1", "ISS")
    other = interpretations.patient_key("P1", "OTHER")   # same PatientID, another issuer: another patient
    v = np.arange(8, dtype=np.float32)
    with Session.begin() as s:
        interpretations.save_study_embedding(s, "1.1", me, "20200101", "A" * 64, v)
        interpretations.save_study_embedding(s, "1.2", me, "20220101", "A" * 64, v + 1)
        interpretations.save_study_embedding(s, "1.3", me, "20220101", "B" * 64, v)      # other weights
        interpretations.save_study_embedding(s, "1.4", other, "20210101", "A" * 64, v)   # other patient
        interpretations.save_study_embedding(s, "1.5", me, "20250101", "A" * 64, v)      # later study
        interpretations.save_study_embedding(s, "1.2", me, "20220101", "A" * 64, v + 2)  # re-run replaces
    with Session() as s:
        pri = interpretations.prior_embeddings(s, me, "1.9", "20240101", "A" * 64)
    assert [p.study_instance_uid for p in pri] == ["1.2", "1.1"]
    np.testing.assert_array_equal(pri[0].embedding, v + 2)
    assert pri[0].study_date == "20220101"


def test_save_interpretation_idempotent(db_url, tmp_path):
    from echonode.interpretation import Interpretation, ModelInfo, TaskResult

    Session = db.session_factory(db.get_engine(db_url))
    jid = make_job(Session, 1)
    interp = Interpretation(study_instance_uid="1.2.826.0.1.3680043.10.1.1",
                            model=ModelInfo("demo", "tiny", "c" * 64, "clip-bpe", "0.1.0", demo=True),
                            clips=(), tasks={"ejection_fraction": TaskResult("ejection_fraction", "LVEF", "regression",
                                                                               "m", value=55.0)})
    with Session.begin() as s:
        a = interpretations.save_interpretation(s, jid, interp)
    with Session.begin() as s:
        b = interpretations.save_interpretation(s, jid, interp)
    assert a == b
    with Session() as s:
        recent = store_status.recent_results(s)
        assert len(recent) == 1 and recent[0]["lvef"] == 55.0 and recent[0]["demo"] is True
        assert interpretations.latest_interpretation(s, interp.study_instance_uid)["banner"].startswith("DEMO MODEL")


# --------------------------------------------------------------------------- dispatch

class _Choice:
    def __init__(self, ok):
        self.available, self.message = ok, ("model x" if ok else
                                             "no EchoCLIP model installed: `echonode models import`")


@pytest.mark.parametrize("broker", ["embedded", "redis", "filesystem"])
def test_dispatch_exactly_once_across_dispatchers(db_url, tmp_path, broker, request, monkeypatch):
    from echonode.pipeline import modelsel
    from echonode.pipeline.celery_app import make_app, queue_depths
    from echonode.pipeline.service import Dispatcher

    broker_url = {"redis": lambda: request.getfixturevalue("redis_url"), "embedded": lambda: "",
                  "filesystem": lambda: "filesystem://"}[broker]()
    settings = settings_for(tmp_path, db_url, broker_url=broker_url)
    Session = db.session_factory(db.get_engine(db_url))
    jobs = [make_job(Session, i) for i in range(6)]
    monkeypatch.setattr(modelsel, "choose_models", lambda s, **k: _Choice(True))
    apps = [make_app(settings, with_tasks=False) for _ in range(3)]
    dispatchers = [Dispatcher(settings, Session, a, who=f"node{i}") for i, a in enumerate(apps)]
    barrier = threading.Barrier(len(dispatchers))
    sent = []

    def go(d):
        barrier.wait()
        sent.append(d.tick()["sent"])
        sent.append(d.tick()["sent"])   # a second pass (a restart) sends nothing new

    threads = [threading.Thread(target=go, args=(d,)) for d in dispatchers]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert sum(sent) == len(jobs), sent
    assert queue_depths(settings, apps[0])["analyze"] == len(jobs)
    with Session() as s:
        rows = s.query(JobDispatch).all()
        assert sorted(r.job_id for r in rows) == jobs and all(r.dispatches == 1 for r in rows)
    for a in apps:
        a.close()


def test_waiting_model_then_released(db_url, tmp_path, monkeypatch, caplog):
    from echonode.pipeline import modelsel
    from echonode.pipeline.celery_app import make_app
    from echonode.pipeline.service import Dispatcher

    settings = settings_for(tmp_path, db_url)
    Session = db.session_factory(db.get_engine(db_url))
    jid = make_job(Session, 1)
    # the real model selection with an empty models dir and demo not allowed
    choice = modelsel.choose_models(settings)
    assert not choice.available and "echonode models import" in choice.message
    assert "allow_demo_model" in choice.message
    app = make_app(settings, with_tasks=False)
    d = Dispatcher(settings, Session, app)
    with caplog.at_level("WARNING", logger="echonode.pipeline"):
        out = d.tick()
    assert out["waiting_model"] == 1 and out["sent"] == 0
    state, _, err = job_state(Session, jid)
    assert state == "waiting_model" and "echonode models import" in err
    assert any("echonode models import" in r.getMessage() for r in caplog.records)
    with Session() as s:
        assert "echonode models import" in store_status.waiting_model_message(s)
    from echonode.commands.status import collect_status
    from echonode.pipeline.statusinfo import format_pipeline
    status = collect_status(settings)
    assert status["jobs"]["waiting_model"] == 1 and "echonode models import" in status["waiting_model"]
    assert any(line.startswith("WAITING FOR A MODEL: ") for line in format_pipeline(status))
    monkeypatch.setattr(modelsel, "choose_models", lambda s, **k: _Choice(True))
    out = d.tick() if d.model_available(force=True) else None
    assert out["released"] == 1 and out["sent"] == 1
    assert job_state(Session, jid)[0] == "queued"
    app.close()


def test_demo_model_needs_explicit_opt_in(tmp_path):
    from echonode.pipeline import modelsel

    base = load_settings(env={}, overrides={"data_dir": str(tmp_path)})
    assert base.model.allow_demo_model is False
    assert not modelsel.choose_models(base).available
    assert (modelsel.DEMO_MODEL_DIR / "echonode.json").is_file(), "the demo model is shipped in the package"
    demo = modelsel.choose_models(base.replace(model=__import__("dataclasses").replace(base.model,
                                                                                      allow_demo_model=True)))
    assert demo.available and demo.demo and "NOT FOR CLINICAL USE" in demo.message


# --------------------------------------------------------------------------- celery config

def test_celery_long_task_settings(tmp_path):
    from echonode.pipeline.celery_app import broker_kind, make_app

    s = load_settings(env={}, overrides={"data_dir": str(tmp_path)})
    app = make_app(s)
    c = app.conf
    assert s.broker.startswith("sqla+sqlite:///") and broker_kind(s.broker) == "sqla"
    assert c.task_acks_late and c.task_reject_on_worker_lost and c.worker_prefetch_multiplier == 1
    assert c.task_routes["echonode.analyse_study"]["queue"] == "analyze"
    assert c.task_routes["echonode.deliver"]["queue"] == "deliver"
    assert "echonode.analyse_study" in app.tasks and "echonode.deliver" in app.tasks
    r = load_settings(env={}, overrides={"data_dir": str(tmp_path),
                                         "queue": {"broker_url": "redis://127.0.0.1:6379/3",
                                                   "visibility_timeout_s": 9000}})
    assert make_app(r, with_tasks=False).conf.broker_transport_options == {"visibility_timeout": 9000}
    app.close()


# --------------------------------------------------------------------------- metrics

def test_metrics_and_health(db_url, tmp_path):
    from echonode.pipeline.metrics import REGISTRY, MetricsServer

    Session = db.session_factory(db.get_engine(db_url))
    jid = make_job(Session, 1)
    with Session.begin() as s:
        jobs.finish_job(s, jid, jobs.start_job(s, jid, "w"))
    REGISTRY.inc("echonode_deliveries_total", outcome="delivered")

    class _SCP:
        totals = {"associations": 3, "rejected": 1, "stored": 7, "failures": 2}
    from echonode.pipeline.metrics import scp_lines
    srv = MetricsServer("127.0.0.1", 0, Session, extra=lambda: scp_lines(_SCP())).start()
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/metrics", timeout=10).read().decode()
        assert 'echonode_jobs{state="done"} 1' in body
        assert "echonode_job_duration_seconds_count 1" in body
        assert "echonode_instances_stored 1" in body
        assert 'echonode_associations_total{result="accepted"} 3' in body
        assert 'echonode_instances_received_total{outcome="failed"} 2' in body
        assert 'echonode_deliveries_total{outcome="delivered"}' in body
        names = [ln.split()[2] for ln in body.splitlines() if ln.startswith("# TYPE")]
        assert len(names) == len(set(names)), "each metric family declared once"
        assert json.loads(urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/healthz", timeout=10).read()) \
            == {"status": "ok", "reasons": []}
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/nope", timeout=10)
    finally:
        srv.stop()


def test_worker_command_usage_errors(tmp_path, monkeypatch, capsys):
    from echonode.cli import main

    monkeypatch.setenv("ECHONODE_DATA_DIR", str(tmp_path))
    assert main(["worker", "--queues", "analyse"]) == 2
    assert "unknown queue" in capsys.readouterr().err
    assert main(["worker", "--device", "tpu:0"]) == 2
    assert "--device must be" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["worker", "--help"])
    assert exc.value.code == 0 and "--queues" in capsys.readouterr().out


def test_embedded_worker_is_restarted_after_kill9(tmp_path):
    """serve's embedded worker (the real `echonode worker` child) comes back after kill -9."""
    import os
    import signal
    import time

    from echonode.pipeline.service import EmbeddedWorker

    settings = load_settings(env={}, overrides={"data_dir": str(tmp_path / "data")})
    db.migrate(settings.db_url)
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'data_dir = "{tmp_path / "data"}"\n[metrics]\nenabled = false\n')
    w = EmbeddedWorker(settings, config_path=str(cfg), queues="deliver")
    w.start()
    try:
        deadline = time.monotonic() + 60
        while (w.proc is None or w.proc.poll() is not None) and time.monotonic() < deadline:
            time.sleep(0.1)
        first = w.proc.pid
        os.kill(first, signal.SIGKILL)
        while (w.restarts < 1 or w.proc.pid == first or w.proc.poll() is not None) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert w.restarts == 1 and w.proc.pid != first and w.proc.poll() is None
    finally:
        w.stop(timeout=20)
    assert w.proc.poll() is not None, "stopped with serve"


def test_lost_message_is_sent_again(db_url, tmp_path, monkeypatch):
    """A worker that died after taking the message but before starting the job: once the
    analyze queue is empty and lease_s passed, the dispatcher sends the job again."""
    from echonode.pipeline import modelsel
    from echonode.pipeline.celery_app import make_app, queue_depths
    from echonode.pipeline.service import Dispatcher

    settings = settings_for(tmp_path, db_url, lease_s=30)
    Session = db.session_factory(db.get_engine(db_url))
    jid = make_job(Session, 1)
    monkeypatch.setattr(modelsel, "choose_models", lambda s, **k: _Choice(True))
    app = make_app(settings, with_tasks=False)
    d = Dispatcher(settings, Session, app)
    assert d.tick()["sent"] == 1
    assert d.tick()["sent"] == 0, "a message waiting in the queue is not duplicated"
    with app.connection_for_write() as conn:       # a worker takes the message and dies
        conn.default_channel.queue_purge("analyze")
    assert queue_depths(settings, app)["analyze"] == 0
    assert d.tick()["sent"] == 0, "not before lease_s"
    with Session.begin() as s:
        s.query(JobDispatch).filter_by(job_id=jid).update(
            {"dispatched_at": utcnow() - dt.timedelta(seconds=60)})
    assert d.tick()["sent"] == 1
    assert queue_depths(settings, app)["analyze"] == 1
    with Session() as s:
        assert s.get(JobDispatch, jid).dispatches == 2
    app.close()
