"""The analysis task body in-process with real pieces: phantom DICOM through the real spool,
a tiny random-weight EchoCLIP + EchoCLIP-R bundle, the real Interpreter, SR/overlay
writers and the outbox. No Celery and no PACS here (the e2e tests run the real workers into Orthanc)."""

from __future__ import annotations

import dataclasses

import pydicom

from echonode.config import Destination, load_settings
from echonode.store import interpretations, jobs, outbox
from echonode.store.models import AnalysisJob
from tests.fixtures.pipeline import ingest


def _settings(tmp_path, tiny_bundle, tiny_bundle_r, destinations=()):
    s = load_settings(env={}, overrides={
        "data_dir": str(tmp_path / "data"),
        "model": {"clip_model": str(tiny_bundle.path), "r_model": str(tiny_bundle_r.path),
                  "promptcam_tasks": ["pacemaker"]},
        "node": {"min_free_mb": 1},
    })
    if destinations:
        s = s.replace(delivery=dataclasses.replace(s.delivery, destinations=tuple(destinations)))
    return s


def _texts(ds) -> list[str]:
    """Every TEXT value anywhere in an SR's content tree."""
    out = []
    for item in ds.get("ContentSequence", []):
        if "TextValue" in item:
            out.append(str(item.TextValue))
        out += _texts(item)
    return out


def _job(Session, job_id):
    with Session() as s:
        j = s.get(AnalysisJob, job_id)
        return j.state, j.attempts, j.error


def test_analyse_idempotent_and_priors(tmp_path, tiny_bundle, tiny_bundle_r, phantom_factory):
    from echonode.pipeline.tasks import WorkerRuntime, analyse_job

    dest = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=1)   # never reached here
    settings = _settings(tmp_path, tiny_bundle, tiny_bundle_r, [dest])
    first_uid, f1 = phantom_factory(patient_id="PIPE1", study_date="20230105", seed=1, n_clips=2)
    [job1] = ingest(settings, f1)
    rt = WorkerRuntime(settings, worker_id="test-worker")
    assert analyse_job(rt, job1) == "done"
    assert _job(rt.Session, job1)[:2] == ("done", 1)
    assert analyse_job(rt, job1) == "skipped-done", "a re-delivered message is a no-op"
    results1 = sorted(p.name for p in (settings.results_path / first_uid).glob("*.dcm"))
    srs = [p for p in (settings.results_path / first_uid).glob("*.dcm")
           if pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"]
    assert len(srs) == 1 and len(results1) >= 2, results1          # SR + PromptCAM overlay
    # results hold patient data: files 0640, folders 0750 (whatever the umask)
    assert {p.stat().st_mode & 0o777 for p in (settings.results_path / first_uid).glob("*.dcm")} == {0o640}
    assert (settings.results_path / first_uid).stat().st_mode & 0o777 == 0o750
    with rt.Session() as s:
        interp = interpretations.latest_interpretation(s, first_uid)
        rows1 = outbox.due_count(s)
    assert len(interp["clips"]) == 2 and not (interp["longitudinal"] or {}).get("priors")
    assert rows1 == len(results1), "one outbox row per object and destination"

    # second study of the same patient, a year later: compared with the first, the SR names it
    second_uid, f2 = phantom_factory(patient_id="PIPE1", study_date="20240210", seed=2)
    [job2] = ingest(settings, f2)
    assert analyse_job(rt, job2) == "done"
    with rt.Session() as s:
        priors = interpretations.latest_interpretation(s, second_uid)["longitudinal"]["priors"]
    assert [(p["study_instance_uid"], p["study_date"]) for p in priors] == [(first_uid, "20230105")]
    sr2 = [pydicom.dcmread(p) for p in (settings.results_path / second_uid).glob("*.dcm")]
    sr2 = [d for d in sr2 if d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"]
    assert len(sr2) == 1 and first_uid in str(sr2[0].ContentSequence), "the SR names the prior study"

    # an operator re-run of a finished job: the same SOP Instance UIDs, the same outbox rows
    with rt.Session.begin() as s:
        s.query(AnalysisJob).filter_by(id=job1).update({"state": "failed"})
        assert jobs.retry_failed(s, [job1]) == 1
    assert analyse_job(rt, job1) == "done"
    assert sorted(p.name for p in (settings.results_path / first_uid).glob("*.dcm")) == results1
    with rt.Session() as s:
        from echonode.store.outbox import OutboxRow
        assert s.query(OutboxRow).filter_by(study_instance_uid=first_uid).count() == len(results1)
    assert rt.analyses == 3 and rt._interpreter is not None, "model loaded once and kept"


def test_no_model_waits_then_runs(tmp_path, tiny_bundle, tiny_bundle_r, phantom_factory):
    from echonode.pipeline.tasks import WorkerRuntime, analyse_job

    settings = _settings(tmp_path, tiny_bundle, tiny_bundle_r)
    missing = settings.replace(model=dataclasses.replace(settings.model, clip_model=str(tmp_path / "nothing")))
    _, files = phantom_factory(patient_id="PIPE2", study_date="20230105", seed=4)
    [job] = ingest(missing, files)
    rt = WorkerRuntime(missing, worker_id="w")
    assert analyse_job(rt, job) == "waiting_model"
    state, attempts, err = _job(rt.Session, job)
    assert state == "waiting_model" and attempts == 0 and "echonode models import" in err
    with rt.Session.begin() as s:
        assert jobs.release_waiting_model(s) == 1
    rt2 = WorkerRuntime(settings, worker_id="w2")
    assert analyse_job(rt2, job) == "done"
    assert (settings.results_path).is_dir() and any(settings.results_path.rglob("*.dcm"))


def test_undecodable_clip_fails_with_reason(tmp_path, tiny_bundle, tiny_bundle_r, phantom_factory):
    from echonode.pipeline.tasks import WorkerRuntime, analyse_job

    settings = _settings(tmp_path, tiny_bundle, tiny_bundle_r)
    _, files = phantom_factory(patient_id="PIPE3", study_date="20230105", seed=5)
    [job] = ingest(settings, files)
    rt = WorkerRuntime(settings, worker_id="w")
    with rt.Session() as s:
        ctx = jobs.job_context(s, job)
    stored = settings.data_path / ctx.clips[0].path
    data = stored.read_bytes()
    stored.write_bytes(data[: len(data) // 2])      # the stored file is damaged
    assert analyse_job(rt, job) == "failed"
    state, _, err = _job(rt.Session, job)
    assert state == "failed" and "no clip of the study could be decoded" in err


def test_one_bad_clip_is_one_bad_clip(tmp_path, tiny_bundle, tiny_bundle_r, phantom_factory):
    """A clip whose header is damaged after it was indexed (NumberOfFrames "wide": the frame
    reader refuses the header before it touches the pixels) is left out with a warning that
    names the clip and the defect, in the Interpretation and the SR; the study's other clip
    is analysed and the job is done."""
    from echonode.pipeline.tasks import WorkerRuntime, analyse_job

    settings = _settings(tmp_path, tiny_bundle, tiny_bundle_r)
    study_uid, files = phantom_factory(patient_id="PIPE4", study_date="20230105", seed=6, n_clips=2)
    [job] = ingest(settings, files)
    rt = WorkerRuntime(settings, worker_id="w")
    with rt.Session() as s:
        ctx = jobs.job_context(s, job)
    bad = ctx.clips[0]
    stored = settings.data_path / bad.path
    ds = pydicom.dcmread(stored)
    ds.NumberOfFrames = 7777
    ds.save_as(stored)
    raw = stored.read_bytes()
    assert raw.count(b"7777") == 1
    stored.write_bytes(raw.replace(b"7777", b"wide"))

    assert analyse_job(rt, job) == "done"
    with rt.Session() as s:
        interp = interpretations.latest_interpretation(s, study_uid)
    assert [c["sop_instance_uid"] for c in interp["clips"]] == [ctx.clips[1].sop_instance_uid]
    [warning] = [w for w in interp["warnings"] if "not analysed" in w]
    assert bad.sop_instance_uid in warning and "NumberOfFrames 'wide' is not an integer" in warning
    [sr] = [d for d in (pydicom.dcmread(p) for p in (settings.results_path / study_uid).glob("*.dcm"))
            if d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"]
    assert warning in _texts(sr), "the SR names the clip that was left out"
    assert bad.sop_instance_uid not in {str(r.ReferencedSOPInstanceUID)
                                        for e in sr.CurrentRequestedProcedureEvidenceSequence
                                        for se in e.ReferencedSeriesSequence for r in se.ReferencedSOPSequence}
