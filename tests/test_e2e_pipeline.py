"""End to end with real components: DCMTK storescu → ``echonode serve`` → Celery worker →
SR + overlays → Orthanc (checked through its REST API).

* embedded: serve alone (SQLite, the embedded SQLite broker, its own worker child);
  a phantom study and a real ultrasound clip from the real-world fixtures; the site's
  task catalogue (``model.tasks_file``) recodes one task and the delivered SRs carry
  the site's code;
* production shape: serve + a separate ``echonode worker``, Redis and PostgreSQL;
  kill -9 of the worker during an analysis, a new worker, the study reported exactly
  once; a second study of the same patient is compared with the first (SR names it).

Tiny random-weight bundles stand in for EchoCLIP / EchoCLIP-R (plumbing, not accuracy).
"""

from __future__ import annotations

import io
import json
import re
import urllib.request

import pydicom
import pytest

from tests.fixtures.node import _free_port, storescu_ts_flag
from tests.fixtures.pipeline import wait_for

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
REAL_CLIP = "us_multiframe/pydicom__examples_ybr_color.dcm"


def _config(orthanc, tiny_bundle, tiny_bundle_r, **queue):
    return {
        "stable": {"delay_s": 1.5, "poll_s": 0.3},
        "queue": {"lease_s": 5.0, "heartbeat_s": 1.0, **queue},
        "model": {"clip_model": str(tiny_bundle.path), "r_model": str(tiny_bundle_r.path),
                  "promptcam_tasks": ["pacemaker"]},
        "delivery": {"destinations": [{"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1",
                                       "port": orthanc.dicom_port}],
                     "backoff_initial_s": 1.0, "backoff_max_s": 5.0},
    }


def _results(orthanc, study_uid):
    inst = orthanc.study_instances(study_uid) if orthanc.lookup(study_uid, "Study") else []
    return ([i for i in inst if i["SOPClassUID"] == SR_CLASS],
            [i for i in inst if i["SOPClassUID"].startswith(SC_PREFIX)])


def _codes(ds):
    """Every coded entry (concept names and values) anywhere in an SR's content tree."""
    for item in ds.get("ContentSequence", []):
        for key in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
            yield from item.get(key, [])
        yield from _codes(item)


def _job_rows(db_url):
    from echonode.store import db
    from echonode.store.models import AnalysisJob

    with db.session_factory(db.get_engine(db_url))() as s:
        return {j.study_instance_uid: (j.state, j.attempts, j.error) for j in s.query(AnalysisJob)}


SITE_CODE = ("SITEPM42", "99ECHONODE", "Pacemaker lead (site code)")


def test_embedded_serve_phantom_and_real_clip(node_factory, orthanc, tiny_bundle, tiny_bundle_r, phantom_factory,
                                              realworld_dir, tmp_path):
    metrics_port = _free_port()
    cfg = _config(orthanc, tiny_bundle, tiny_bundle_r, embedded_worker=True)
    cfg["metrics"] = {"enabled": True, "port": metrics_port}
    site = tmp_path / "site-tasks.toml"       # the site codes one task its own way
    site.write_text("[tasks.pacemaker]\nprivate_code = " + json.dumps(list(SITE_CODE)) + "\n")
    cfg["model"]["tasks_file"] = str(site)
    node = node_factory(cfg).start()
    assert node.settings.broker.startswith("sqla+sqlite:///"), "embedded broker: no Redis"
    phantom_uid, files = phantom_factory(patient_id="E2E1", study_date="20240105", seed=11)
    real = realworld_dir / REAL_CLIP
    real_uid = str(pydicom.dcmread(real, stop_before_pixels=True).StudyInstanceUID)
    node.storescu(files, storescu_ts_flag(files[0]), check=True)   # as a cart sends: JPEG baseline
    node.storescu([real], storescu_ts_flag(real), check=True)

    for uid in (phantom_uid, real_uid):
        sr, sc = wait_for(lambda: (lambda r: r if r[0] and r[1] else None)(_results(orthanc, uid)), 180,
                          f"SR and overlay of study {uid} in Orthanc\n{node.log_text()[-3000:]}")
        assert len(sr) == 1 and len(sc) >= 1
        ds = pydicom.dcmread(io.BytesIO(orthanc.fetch_instance(sr[0]["SOPInstanceUID"])))
        assert ds.StudyInstanceUID == uid, "the SR lands in the analysed study"
        assert "EchoCLIP" in str(ds.ContentSequence) or "echonode" in str(ds)
        codes = {(c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning) for c in _codes(ds)}
        assert SITE_CODE in codes, "the node's SR carries the site catalogue's code"
        assert ("PACER-LEAD", "99ECHONODE", "Pacemaker or ICD lead") not in codes, "not the built-in one"
    assert "embedded worker started" in node.log_text()

    status = node.status()
    done = {r["study_instance_uid"] for r in status["recent_results"]}
    assert {phantom_uid, real_uid} <= done
    assert status["jobs"]["done"] == 2 and status["queue"]["broker"] == "sqla"
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    assert 'echonode_jobs{state="done"} 2' in body
    # one send per job, plus one per resend of a message that looked lost (the worker had taken
    # it but not started the job within queue.lease_s: a slow start on a loaded machine); a
    # resend decided while the worker starts the job is not sent (the job is no longer queued)
    sends = re.findall(r"job (\d+) sent to queue analyze \(job-\d+-(\d+)\)", node.log_text())
    assert len({job for job, _ in sends}) == 2 and sorted(n for _, n in sends)[:2] == ["1", "1"], sends
    assert f"\nechonode_jobs_dispatched_total {len(sends)}\n" in body, body
    assert 'echonode_instances_received_total{outcome="stored"} 2' in body
    assert 'echonode_outbox{state="delivered"}' in body   # delivery outcomes, from SQL (any worker)
    assert urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/healthz", timeout=10).status == 200
    assert node.stop() == 0


@pytest.mark.postgres
@pytest.mark.redis
def test_production_shape_kill9_and_prior(pg_url, redis_url, node_factory, worker_factory, orthanc, tiny_bundle,
                                          tiny_bundle_r, phantom_factory):
    # pg_url / redis_url first: set up before, torn down after the processes that use them
    cfg = _config(orthanc, tiny_bundle, tiny_bundle_r, embedded_worker=False, broker_url=redis_url,
                  visibility_timeout_s=3600)
    node = node_factory(cfg, database_url=pg_url).start()
    assert node.settings.broker.startswith("redis://")
    w1 = worker_factory(node).start()

    first_uid, f1 = phantom_factory(patient_id="E2E2", study_date="20230301", seed=21, n_clips=2, n_frames=40)
    node.storescu(f1, storescu_ts_flag(f1[0]), check=True)
    # kill -9 the worker while it analyses the study
    wait_for(lambda: _job_rows(pg_url).get(first_uid, ("",))[0] == "running", 120,
             f"the job to run\n{w1.log_text()[-3000:]}\n{node.log_text()[-2000:]}", interval=0.05)
    w1.kill9()
    assert _job_rows(pg_url)[first_uid][0] == "running"
    w2 = worker_factory(node).start()
    wait_for(lambda: _job_rows(pg_url)[first_uid][0] == "done", 120,
             f"the re-queued job to finish\n{w2.log_text()[-3000:]}\n{node.log_text()[-3000:]}")
    state, attempts, _ = _job_rows(pg_url)[first_uid]
    assert attempts == 2, "one lost attempt, one successful"
    assert "re-queued" in node.log_text()
    sr, _ = wait_for(lambda: (lambda r: r if r[0] else None)(_results(orthanc, first_uid)), 60,
                     "the SR in Orthanc")

    # a second study of the same patient, a year later: compared with the first
    second_uid, f2 = phantom_factory(patient_id="E2E2", study_date="20240301", seed=22)
    node.storescu(f2, storescu_ts_flag(f2[0]), check=True)
    sr2, _ = wait_for(lambda: (lambda r: r if r[0] else None)(_results(orthanc, second_uid)), 120,
                      f"the second SR in Orthanc\n{w2.log_text()[-3000:]}")
    ds = pydicom.dcmread(io.BytesIO(orthanc.fetch_instance(sr2[0]["SOPInstanceUID"])))
    assert first_uid in str(ds.ContentSequence), "the SR names the prior study"

    # exactly once: one SR per study in Orthanc, after everything settled
    assert len(_results(orthanc, first_uid)[0]) == 1 and len(_results(orthanc, second_uid)[0]) == 1
    status = node.status()
    assert status["jobs"]["done"] == 2 and status["queue"]["broker"] == "redis"
    assert json.dumps(status)  # serialisable
    w2.stop()
    assert node.stop() == 0
