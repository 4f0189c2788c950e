"""Issue 14, result side, with real parts: ``echonode serve`` + workers, Orthanc on its
default configuration (``OverwriteInstances = false``: it keeps the first copy of a UID),
DCMTK as the cart, Redis and PostgreSQL in the production shape.

* a clip that arrives after the result was delivered: a new study version, an SR of its
  own that Orthanc stores next to the first and that names it as its predecessor;
* a worker paused (SIGSTOP) past ``queue.lease_s`` and resumed (SIGCONT) after another
  took its job over: exactly one SR, the job done, the resumed worker quiet;
* Orthanc down for longer than the old count-bounded retry budget: everything delivered
  once it is back, no duplicates; ``/healthz`` degrades during the outage and recovers.

Tiny random-weight bundles stand in for EchoCLIP (plumbing, not accuracy).
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import time
import urllib.error
import urllib.request

import pydicom
import pytest

from tests.fixtures.interp import dciodvfy
from tests.fixtures.node import _free_port, storescu_ts_flag
from tests.fixtures.pipeline import wait_for

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


def _config(orthanc, tiny_bundle, **over):
    cfg = {
        "stable": {"delay_s": 1.0, "poll_s": 0.3},
        "queue": {"lease_s": 4.0, "heartbeat_s": 0.5},
        "model": {"clip_model": str(tiny_bundle.path), "promptcam_tasks": []},
        "delivery": {"destinations": [{"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1",
                                       "port": orthanc.dicom_port}],
                     "backoff_initial_s": 0.5, "backoff_max_s": 1.0},
    }
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    return cfg


def _srs(orthanc, study_uid):
    if not orthanc.lookup(study_uid, "Study"):
        return []
    return [i for i in orthanc.study_instances(study_uid) if i["SOPClassUID"] == SR_CLASS]


def _sr(orthanc, sop_uid):
    return pydicom.dcmread(io.BytesIO(orthanc.fetch_instance(sop_uid)))


def _outbox(db_url):
    from echonode.store import db
    from echonode.store.outbox import OutboxRow

    with db.session_factory(db.get_engine(db_url))() as s:
        return [(r.sop_instance_uid, r.kind, r.state, r.attempts) for r in s.query(OutboxRow)]


def _jobs(db_url):
    from echonode.store import db
    from echonode.store.models import AnalysisJob

    with db.session_factory(db.get_engine(db_url))() as s:
        return [(j.study_version, j.state, j.attempts, j.error) for j in s.query(AnalysisJob).order_by(AnalysisJob.id)]


def _texts(ds):
    """Every TEXT value anywhere in an SR's content tree."""
    for item in ds.get("ContentSequence", []):
        if "TextValue" in item:
            yield str(item.TextValue)
        yield from _texts(item)


def _healthz(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_late_clip_gives_a_new_sr_that_names_its_predecessor(node_factory, orthanc, tiny_bundle, phantom_factory,
                                                             tmp_path):
    node = node_factory(_config(orthanc, tiny_bundle, queue={"embedded_worker": True})).start()
    db_url = node.settings.db_url
    study_uid, files = phantom_factory(patient_id="LATE1", study_date="20240105", seed=31, n_clips=2)
    node.storescu(files[:1], storescu_ts_flag(files[0]), check=True)
    first = wait_for(lambda: _srs(orthanc, study_uid) or None, 90, f"the first SR\n{node.log_text()[-3000:]}")
    wait_for(lambda: all(r[2] == "delivered" for r in _outbox(db_url)) and _outbox(db_url), 30, "delivered")
    assert len(first) == 1
    v1_uid = first[0]["SOPInstanceUID"]

    # the late clip: the study changes after its result reached the PACS
    node.storescu(files[1:], storescu_ts_flag(files[1]), check=True)
    both = wait_for(lambda: (lambda s: s if len(s) == 2 else None)(_srs(orthanc, study_uid)), 90,
                    f"the SR of study version 2\n{node.log_text()[-3000:]}")
    v2_uid = next(i["SOPInstanceUID"] for i in both if i["SOPInstanceUID"] != v1_uid)
    v2 = _sr(orthanc, v2_uid)
    pred = v2.PredecessorDocumentsSequence[0]
    assert pred.StudyInstanceUID == study_uid
    ref = pred.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == v1_uid and ref.ReferencedSOPClassUID == SR_CLASS
    assert pred.ReferencedSeriesSequence[0].SeriesInstanceUID == _sr(orthanc, v1_uid).SeriesInstanceUID
    text = " ".join(_texts(v2))
    assert "version 2 of the study: 2 clip(s)" in text and f"replaces the result SR {v1_uid}" in text
    assert "PredecessorDocumentsSequence" not in _sr(orthanc, v1_uid), "the first version replaces nothing"
    assert [(v, st) for v, st, _, _ in _jobs(db_url)] == [(1, "done"), (2, "done")]
    rows = _outbox(db_url)
    assert all(r[2] == "delivered" for r in rows) and len({r[0] for r in rows}) == len(rows)
    path = tmp_path / "v2.dcm"
    path.write_bytes(orthanc.fetch_instance(v2_uid))
    errors, _ = dciodvfy(path)
    assert errors == [], errors

    # the same version analysed again gives the same UIDs (idempotent): Orthanc gains nothing
    from echonode.store import db, jobs
    from echonode.store.models import AnalysisJob
    n = orthanc.count_instances()
    with db.session_factory(db.get_engine(db_url)).begin() as s:
        job = s.query(AnalysisJob).filter_by(study_version=2).one()
        job.state = "queued"
        jobs.reset_dispatch(s, [job.id])
    wait_for(lambda: _jobs(db_url)[1][1:3] == ("done", 2), 60, f"the re-run\n{node.log_text()[-3000:]}")
    wait_for(lambda: all(r[2] == "delivered" for r in _outbox(db_url)), 30, "the re-run delivered")
    assert sorted(_outbox(db_url)) == sorted(rows) or {r[0] for r in _outbox(db_url)} == {r[0] for r in rows}
    assert orthanc.count_instances() == n and len(_srs(orthanc, study_uid)) == 2
    assert node.stop() == 0


@pytest.mark.postgres
@pytest.mark.redis
def test_worker_paused_past_its_lease_stops_quietly(pg_url, redis_url, node_factory, worker_factory, orthanc,
                                                    tiny_bundle, phantom_factory):
    cfg = _config(orthanc, tiny_bundle, queue={"embedded_worker": False, "broker_url": redis_url,
                                               "visibility_timeout_s": 3600})
    node = node_factory(cfg, database_url=pg_url).start()
    w1 = worker_factory(node).start()
    w2 = worker_factory(node).start()
    study_uid, files = phantom_factory(patient_id="STOP1", study_date="20240106", seed=41, n_clips=3, n_frames=60)
    # w2 sits out the first dispatch: only w1 can take the job
    os.kill(w2.proc.pid, signal.SIGSTOP)
    node.storescu(files, storescu_ts_flag(files[0]), check=True)
    wait_for(lambda: _jobs(pg_url) and _jobs(pg_url)[0][1] == "running", 90,
             f"the job to run\n{w1.log_text()[-3000:]}", interval=0.05)
    os.kill(w1.proc.pid, signal.SIGSTOP)        # paused mid-analysis: its heartbeat stops too
    os.kill(w2.proc.pid, signal.SIGCONT)
    try:
        wait_for(lambda: _jobs(pg_url)[0][1] == "done", 90,
                 f"the takeover to finish\n{w2.log_text()[-3000:]}\n{node.log_text()[-2000:]}")
        assert "re-queued" in node.log_text()
    finally:
        os.kill(w1.proc.pid, signal.SIGCONT)
    wait_for(lambda: "taken over by another worker" in w1.log_text() or "lease lost" in w1.log_text(), 60,
             f"the resumed worker to notice\n{w1.log_text()[-3000:]}")
    time.sleep(2.0)                             # whatever it would still do, it has done now
    (version, state, attempts, error), = _jobs(pg_url)
    assert state == "done" and attempts == 2 and error is None
    assert not re.search(r"job \d+ failed", w1.log_text() + w2.log_text()), "no failure was recorded"
    wait_for(lambda: _outbox(pg_url) and all(r[2] == "delivered" for r in _outbox(pg_url)), 30, "delivered")
    assert len(_srs(orthanc, study_uid)) == 1, "exactly one SR in the PACS"
    assert len(_outbox(pg_url)) == len({r[0] for r in _outbox(pg_url)})
    w1.stop(10)
    w2.stop(10)


def test_pacs_outage_longer_than_the_old_budget(node_factory, orthanc, tiny_bundle, phantom_factory):
    metrics_port = _free_port()
    # the old policy scaled down: 8 attempts from 0.5 s with a 1 s cap are spent in ~7 s;
    # the outage lasts longer, the time bound (delivery.retry_for_s) does not run out
    node = node_factory(_config(orthanc, tiny_bundle, queue={"embedded_worker": True},
                                delivery={"retry_for_s": 120.0, "alert_after_s": 3.0},
                                metrics={"enabled": True, "port": metrics_port})).start()
    db_url = node.settings.db_url

    def healthz_up():
        try:
            return _healthz(metrics_port)
        except urllib.error.URLError:   # the metrics endpoint starts with the pipeline, after DICOM
            return None
    assert wait_for(healthz_up, 30, "the metrics endpoint")[0] == 200
    orthanc.stop()
    study_uid, files = phantom_factory(patient_id="OUT1", study_date="20240107", seed=51)
    node.storescu(files, storescu_ts_flag(files[0]), check=True)
    wait_for(lambda: _outbox(db_url) and min(r[3] for r in _outbox(db_url)) > 8, 60,
             f"more failed attempts than the old budget\n{node.log_text()[-3000:]}")
    code, body = _healthz(metrics_port)
    assert code == 503 and body["status"] == "degraded", body
    assert any("oldest undelivered" in r for r in body["reasons"]) and body["delivery"]["dead"] == 0
    status = node.status()
    assert status["delivery"]["ok"] is False and status["delivery"]["undelivered"] == len(_outbox(db_url))
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    assert "echonode_delivery_alert 1" in metrics
    assert all(r[2] in ("pending", "sending") for r in _outbox(db_url)), "nothing dead-lettered"

    orthanc.start()
    wait_for(lambda: all(r[2] == "delivered" for r in _outbox(db_url)), 60,
             f"delivery after the outage\n{node.log_text()[-3000:]}")
    rows = _outbox(db_url)
    assert orthanc.count_instances() == len(rows), "each object once in the PACS"
    assert len(_srs(orthanc, study_uid)) == 1
    code, body = _healthz(metrics_port)
    assert code == 200 and body["status"] == "ok" and body["delivery"]["undelivered"] == 0, body
    assert node.status()["delivery"]["ok"] is True
    assert node.stop() == 0


# --------------------------------------------------------------------------- pure parts

def test_result_uids_per_study_version():
    from echonode.dicom.result_uids import result_uid

    study, w = "1.2.826.0.1.3680043.10.9.1", "ab" * 32
    v1 = result_uid(study, w, "0.1.0", "sr", study_version=1)
    assert v1 == result_uid(study, w, "0.1.0", "sr", study_version=1), "same version: same UID"
    assert v1 != result_uid(study, w, "0.1.0", "sr", study_version=2), "a new version: a new object"
    assert result_uid(study, w, "0.1.0", "sr") == result_uid(study, w, "0.1.0", "sr", study_version=0)
    assert v1 != result_uid(study, w, "0.1.0", "sr")
    with pytest.raises(ValueError):
        result_uid(study, w, "0.1.0", "sr", study_version=-1)


def test_outbox_gives_up_by_time_not_by_count(tmp_path):
    import datetime as dt

    from echonode.store import db
    from echonode.store import outbox as ob

    url = f"sqlite:///{tmp_path / 'o.sqlite3'}"
    db.migrate(url)
    Session = db.session_factory(db.make_engine(url))
    t0 = dt.datetime(2030, 1, 1)
    with Session() as s:
        (rid,) = ob.add(s, [ob.OutboxObject("/x.dcm", "1.2.3.4", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.3")], ["pacs"],
                        now=t0)
        policy = {"max_attempts": 0, "backoff_initial_s": 5.0, "backoff_max_s": 600.0, "retry_for_s": 86400.0}
        now = t0
        for _ in range(100):        # far more than the old 8 attempts, spread over 16 h
            now += dt.timedelta(minutes=10)
            assert ob.mark_failed(s, rid, "association refused", now=now, **policy) == ob.PENDING
        row = s.get(ob.OutboxRow, rid)
        assert (row.next_attempt_at - now).total_seconds() == 600.0, "backoff capped at backoff_max_s"
        assert ob.backlog(s, now=now).undelivered == 1 and ob.backlog(s, now=now).dead == 0
        assert ob.mark_failed(s, rid, "association refused", now=t0 + dt.timedelta(hours=24, minutes=11),
                              **policy) == ob.DEAD, "dead once failing for retry_for_s"
        assert ob.backlog(s).dead == 1
        assert ob.retry(s) == 1 and s.get(ob.OutboxRow, rid).failing_since is None
        assert ob.mark_failed(s, rid, "x", now=t0 + dt.timedelta(days=3), **{**policy, "max_attempts": 1}) == ob.DEAD


def test_delivery_settings_are_validated():
    from echonode.config import ConfigError, load_settings

    s = load_settings(env={})
    assert (s.delivery.retry_for_s, s.delivery.backoff_max_s, s.delivery.max_attempts) == (86400.0, 600.0, 0)
    with pytest.raises(ConfigError, match="delivery.retry_for_s"):
        load_settings(env={}, overrides={"delivery": {"retry_for_s": 0}})
    with pytest.raises(ConfigError, match="delivery.alert_after_s"):
        load_settings(env={}, overrides={"delivery": {"alert_after_s": -1}})
    with pytest.raises(ConfigError, match="queue.retry_for_s"):
        load_settings(env={}, overrides={"queue": {"retry_for_s": 0}})


def test_predecessor_is_the_last_published_earlier_version(tmp_path):
    import dataclasses

    from echonode.interpretation import Interpretation, ModelInfo
    from echonode.store import db, interpretations

    url = f"sqlite:///{tmp_path / 'i.sqlite3'}"
    db.migrate(url)
    Session = db.session_factory(db.make_engine(url))
    base = Interpretation(study_instance_uid="1.2.3", model=ModelInfo("demo", "tiny", "c" * 64, "clip-bpe", "0.1.0"),
                          clips=(), tasks={})
    with Session.begin() as s:
        for v, uids in ((1, ("1.9.1", "1.9.10")), (2, None), (3, ("1.9.3", "1.9.30"))):   # v2 superseded: no SR
            interpretations.save_interpretation(s, None, dataclasses.replace(base, study_version=v), uids)
    with Session() as s:
        assert interpretations.previous_result(s, "1.2.3", 1) is None
        assert interpretations.previous_result(s, "1.2.3", 3).sop_instance_uid == "1.9.1"
        p = interpretations.previous_result(s, "1.2.3", 4)
        assert (p.study_version, p.sop_instance_uid, p.series_instance_uid) == (3, "1.9.3", "1.9.30")
        assert interpretations.later_result_exists(s, "1.2.3", 2) and not interpretations.later_result_exists(s, "1.2.3", 3)
        assert interpretations.previous_result(s, "9.9", 5) is None
