"""Priors from the PACS through the real node (issue 17, acceptance): Orthanc holds the
patient's earlier study; the new study comes from the cart (DCMTK storescu) to
``echonode serve`` (embedded worker, SQLite); the worker asks Orthanc for the priors before
the comparison. The SR the node delivers back to Orthanc names the prior with its date and
similarity, and the prior's EchoCLIP-R embedding is in SQL.

* C-GET;
* C-MOVE to the node's own AE: the moved prior arrives through the node's C-STORE SCP and
  gets no analysis job (nor SR) of its own;
* a PACS that is down: the job ends done and the SR says that priors were not available.

Tiny random-weight bundles stand in for EchoCLIP / EchoCLIP-R (plumbing, not accuracy).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest

from echonode.pipeline.modelsel import choose_models
from echonode.store import priors as ledger
from tests.fixtures.node import _free_port, storescu_ts_flag
from tests.fixtures.orthanc import OrthancServer
from tests.fixtures.pipeline import wait_for

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
ISSUER = "HOSP-A"
NODE_AE = "ECHONODE"


def _pacs(tmp_path, node_port: int) -> OrthancServer:
    """Orthanc that knows the node's AE (C-MOVE destination; C-FIND / C-GET allowed from it)."""
    return OrthancServer(tmp_path / "pacs", extra_config={
        "DicomModalities": {"echonode": {"AET": NODE_AE, "Host": "127.0.0.1", "Port": node_port,
                                         "AllowEcho": True, "AllowFind": True, "AllowGet": True,
                                         "AllowMove": True, "AllowStore": True}},
        "DicomAlwaysAllowFind": False, "DicomAlwaysAllowGet": False, "DicomAlwaysAllowMove": False,
    }).start()


def _with_issuer(files, issuer=ISSUER):
    for f in files:
        ds = pydicom.dcmread(f)
        ds.IssuerOfPatientID = issuer
        ds.save_as(f, enforce_file_format=True)
    return files


def _start_node(node_factory, node_port, pacs, tiny_bundle, tiny_bundle_r, source):
    cfg = {
        "node": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": node_port, "min_free_mb": 1},
        "stable": {"delay_s": 1.5, "poll_s": 0.3},
        "queue": {"embedded_worker": True, "lease_s": 30.0, "heartbeat_s": 1.0},
        "model": {"clip_model": str(tiny_bundle.path), "r_model": str(tiny_bundle_r.path), "frames": 4,
                  "promptcam_tasks": []},
        "priors": {"enabled": True, "timeout_s": 30, "sources": [source]},
        "delivery": {"destinations": [{"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1",
                                       "port": pacs.dicom_port}],
                     "backoff_initial_s": 1.0, "backoff_max_s": 5.0},
    }
    return node_factory(cfg).start()


def _source(pacs, retrieve="get", port=None):
    return {"name": "pacs", "kind": "dimse", "ae_title": pacs.aet, "host": "127.0.0.1",
            "port": port or pacs.dicom_port, "retrieve": retrieve, "timeout_s": 10}


def _sessions(node):
    from echonode.store import db
    return db.session_factory(db.get_engine(node.settings.db_url))


def _jobs(node):
    from echonode.store.models import AnalysisJob
    with _sessions(node)() as s:
        return {j.study_instance_uid: (j.state, j.error) for j in s.query(AnalysisJob)}


def _embeddings(node):
    from echonode.store.interpretations import StudyEmbedding
    with _sessions(node)() as s:
        return {(e.study_instance_uid, e.model_sha256): (e.study_date, np.frombuffer(e.vector, dtype="<f4").copy())
                for e in s.query(StudyEmbedding)}


def _study_state(node, study_uid):
    from echonode.store.models import Study
    with _sessions(node)() as s:
        st = s.query(Study).filter(Study.study_instance_uid == study_uid).one_or_none()
        return st.state if st is not None else None


def _srs(pacs, study_uid):
    if not pacs.lookup(study_uid, "Study"):
        return []
    return [i for i in pacs.study_instances(study_uid) if i["SOPClassUID"] == SR_CLASS]


def _delivered_sr(pacs, node, study_uid):
    srs = wait_for(lambda: _srs(pacs, study_uid), 120,
                   f"the SR of the new study in Orthanc\n{node.log_text()[-4000:]}")
    assert len(srs) == 1
    return pydicom.dcmread(io.BytesIO(pacs.fetch_instance(srs[0]["SOPInstanceUID"])))


def _items(ds):
    """Every content item of an SR's tree, depth first."""
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _items(item)


def _texts(ds, meaning):
    return [str(i.TextValue) for i in _items(ds) if i.ValueType == "TEXT"
            and i.ConceptNameCodeSequence[0].CodeMeaning == meaning]


def _nums(ds, meaning):
    return [float(i.MeasuredValueSequence[0].NumericValue) for i in _items(ds) if i.ValueType == "NUM"
            and i.ConceptNameCodeSequence[0].CodeMeaning == meaning]


def _scenario(tmp_path, node_factory, phantom_factory, tiny_bundle, tiny_bundle_r, retrieve):
    node_port = _free_port()
    pacs = _pacs(tmp_path, node_port)
    try:
        pid = f"PRE2E{retrieve.upper()}"
        prior_uid, pfiles = phantom_factory(patient_id=pid, study_date="20240105", seed=31, n_clips=2, n_frames=8,
                                            size=96, label=f"prior-{retrieve}")
        for f in _with_issuer(pfiles):
            pacs.post("/instances", Path(f).read_bytes())
        node = _start_node(node_factory, node_port, pacs, tiny_bundle, tiny_bundle_r, _source(pacs, retrieve))
        new_uid, nfiles = phantom_factory(patient_id=pid, study_date="20250301", seed=32, n_clips=1, n_frames=8,
                                          size=96, label=f"new-{retrieve}")
        node.storescu(_with_issuer(nfiles), storescu_ts_flag(nfiles[0]), check=True)   # the cart
        ds = _delivered_sr(pacs, node, new_uid)

        # the longitudinal group names the prior from Orthanc, its date and similarity
        prior_notes = _texts(ds, "Prior study compared")
        assert len(prior_notes) == 1 and prior_notes[0].startswith(f"prior study {prior_uid} of 2024-01-05: similarity")
        uids = [str(i.UID) for i in _items(ds) if i.ValueType == "UIDREF"]
        assert prior_uid in uids
        # the prior's Study Date (in the longitudinal group and the key findings)
        assert {str(i.Date) for i in _items(ds) if i.ValueType == "DATE"} == {"20240105"}
        # the processing notes (warnings) say where the prior came from
        notes = _texts(ds, "Processing note")
        assert any(n.startswith("Prior studies used: 2024-01-05 from pacs.") for n in notes), notes

        # both study embeddings are in SQL, and the SR's similarity is their cosine
        sha = choose_models(node.settings, verify=False).r.weights_sha256
        emb = _embeddings(node)
        assert emb[(prior_uid, sha)][0] == "20240105", "the prior's embedding, for the installed EchoCLIP-R"
        a, b = emb[(prior_uid, sha)][1], emb[(new_uid, sha)][1]
        cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        sim = set(_nums(ds, "Embedding similarity with prior study"))   # group and key findings
        assert len(sim) == 1
        sim = sim.pop()
        assert sim == pytest.approx(cos, abs=1e-4)
        assert f"similarity {sim:.3f}" in prior_notes[0]
        with _sessions(node)() as s:
            e = ledger.get(s, prior_uid, sha)
        assert e.state == ledger.EMBEDDED and e.source == "pacs" and e.clips == 2

        jobs = _jobs(node)
        assert jobs[new_uid][0] == "done"
        return node, pacs, prior_uid, new_uid
    except BaseException:
        pacs.stop()
        raise


def test_prior_by_c_get_named_in_sr(tmp_path, node_factory, phantom_factory, tiny_bundle, tiny_bundle_r):
    node, pacs, prior_uid, new_uid = _scenario(tmp_path, node_factory, phantom_factory, tiny_bundle,
                                               tiny_bundle_r, "get")
    try:
        assert set(_jobs(node)) == {new_uid}
        # the cart sends to the PACS too: the study the node analysed is now also in Orthanc. The
        # next study's priors are both; the node's own one is not fetched again (no ledger row)
        for i in sorted((tmp_path / "phantoms").glob(f"{new_uid}-*.dcm")):
            pacs.post("/instances", i.read_bytes())
        third_uid, tfiles = phantom_factory(patient_id="PRE2EGET", study_date="20250901", seed=33, n_clips=1,
                                            n_frames=8, size=96, label="third-get")
        node.storescu(_with_issuer(tfiles), storescu_ts_flag(tfiles[0]), check=True)
        ds = _delivered_sr(pacs, node, third_uid)
        notes = _texts(ds, "Processing note")
        assert any(n.startswith("Prior studies used: 2025-03-01 from this node, 2024-01-05 from pacs.")
                   for n in notes), notes
        compared = _texts(ds, "Prior study compared")
        assert [c.split(":")[0] for c in compared] == [f"prior study {new_uid} of 2025-03-01",
                                                       f"prior study {prior_uid} of 2024-01-05"]
        sha = choose_models(node.settings, verify=False).r.weights_sha256
        with _sessions(node)() as s:
            assert ledger.get(s, new_uid, sha) is None, "the node's own study is not a PACS prior"
            assert ledger.get(s, prior_uid, sha).attempts == 1, "the PACS prior was fetched once"
        assert set(_jobs(node)) == {new_uid, third_uid}
        assert node.stop() == 0
        assert "PRE2EGET" not in node.log_text(), "no patient identifier in the node's log"
    finally:
        pacs.stop()


def test_prior_by_c_move_gets_no_job_of_its_own(tmp_path, node_factory, phantom_factory, tiny_bundle,
                                                tiny_bundle_r):
    node, pacs, prior_uid, new_uid = _scenario(tmp_path, node_factory, phantom_factory, tiny_bundle,
                                               tiny_bundle_r, "move")
    try:
        from echonode.store.models import Study
        with _sessions(node)() as s:   # the moved prior is in the node's index (received by its SCP) ...
            assert s.query(Study).filter(Study.study_instance_uid == prior_uid).count() == 1
        # ... and stays without a job of its own after it became stable
        from echonode.store.models import STUDY_STABLE
        wait_for(lambda: _study_state(node, prior_uid) == STUDY_STABLE, 30, "the moved prior to become stable")
        assert set(_jobs(node)) == {new_uid}, _jobs(node)
        assert _srs(pacs, prior_uid) == [], "no SR for the prior"
        assert "C-MOVE refused" not in node.log_text()
        assert node.stop() == 0
    finally:
        pacs.stop()


def test_pacs_down_analysis_goes_on(tmp_path, node_factory, phantom_factory, tiny_bundle, tiny_bundle_r):
    node_port = _free_port()
    pacs = _pacs(tmp_path, node_port)   # receives the results; the priors source is a closed port
    try:
        down_port = _free_port()
        node = _start_node(node_factory, node_port, pacs, tiny_bundle, tiny_bundle_r,
                           _source(pacs, "get", port=down_port))
        new_uid, nfiles = phantom_factory(patient_id="PRE2EDOWN", study_date="20250301", seed=41, n_clips=1,
                                          n_frames=8, size=96, label="down")
        node.storescu(_with_issuer(nfiles), storescu_ts_flag(nfiles[0]), check=True)
        ds = _delivered_sr(pacs, node, new_uid)
        notes = _texts(ds, "Processing note")
        assert [n for n in notes if n.startswith("Priors not available: pacs:")
                and f"ORTHANC@127.0.0.1:{down_port}" in n], notes
        assert _texts(ds, "Prior study compared") == []
        assert _jobs(node)[new_uid][0] == "done"
        assert node.stop() == 0
    finally:
        pacs.stop()


def test_stable_prior_without_job_but_received_study_keeps_its_versions(tmp_path):
    """In-process (real spool, SQLite): a study that is only a prior gets no job when it becomes
    stable; a study the node received and analysed that is also in the priors ledger (e.g.
    fetched again for new EchoCLIP-R weights) still gets a job for a new version from the cart."""
    from echonode.config import load_settings
    from echonode.store import db
    from echonode.store.interpretations import patient_key
    from tests.fixtures.pipeline import ingest, phantom_study

    settings = load_settings(env={}, overrides={"data_dir": str(tmp_path / "node")})
    db.migrate(settings.db_url)
    sessions = db.session_factory(db.get_engine(settings.db_url))
    own_uid, own = phantom_study(tmp_path / "ph", patient_id="STAB1", study_date="20240101", seed=51, n_clips=2,
                                 n_frames=4, size=64, label="own")
    assert len(ingest(settings, own[:1])) == 1, "received from the cart: analysed"
    prior_uid, prior = phantom_study(tmp_path / "ph", patient_id="STAB1", study_date="20230101", seed=52,
                                     n_frames=4, size=64, label="prior")
    for uid_ in (own_uid, prior_uid):   # both in the ledger, as priors fetched for some weights
        with sessions() as s:
            assert ledger.claim(s, uid_, "f" * 64, patient_key=patient_key("STAB1", ""), study_date="20230101",
                                source="pacs", owner="test", lease_s=60)
            s.commit()
    assert ingest(settings, prior) == [], "a prior alone: no job"
    assert len(ingest(settings, own[1:])) == 1, "a new version of a received study: analysed again"


def test_prior_held_by_another_analysis_is_stated(tmp_path, tiny_bundle, tiny_bundle_r, phantom_factory):
    """Two analyses of one patient at once: the prior claimed by the other one is not reported
    as 'no earlier echo study'; once the other has embedded it, it is used without a fetch."""
    from echonode.config import load_settings
    from echonode.priors import fetch_and_embed_priors, load_interpreter
    from echonode.store import db
    from echonode.store.interpretations import patient_key

    pacs = _pacs(tmp_path, _free_port())
    try:
        prior_uid, pfiles = phantom_factory(patient_id="PRHELD", study_date="20240105", seed=61, n_frames=4,
                                            size=64, label="held")
        for f in _with_issuer(pfiles):
            pacs.post("/instances", Path(f).read_bytes())
        settings = load_settings(env={}, overrides={
            "data_dir": str(tmp_path / "node"), "node": {"ae_title": NODE_AE},
            "model": {"clip_model": str(tiny_bundle.path), "r_model": str(tiny_bundle_r.path), "frames": 4},
            "priors": {"enabled": True, "timeout_s": 30, "sources": [_source(pacs)]}})
        db.migrate(settings.db_url)
        sessions = db.session_factory(db.get_engine(settings.db_url))
        interp = load_interpreter(settings)
        sha = interp.r.info.weights_sha256
        with sessions() as s:   # another worker (alive: its lease runs) is retrieving the prior
            assert ledger.claim(s, prior_uid, sha, patient_key=patient_key("PRHELD", ISSUER), study_date="20240105",
                                source="pacs", owner="otherhost:1:1", lease_s=600)

        def run():
            return fetch_and_embed_priors(settings, sessions, interp, study_uid="2.25.7", patient_id="PRHELD",
                                          issuer=ISSUER, study_date="20250101")
        out = run()
        assert out.used == [] and out.summary() == ("Priors not available: pacs: study of 2024-01-05 is being "
                                                    "retrieved by another analysis."), out.summary()
        with sessions() as s:   # the other worker finishes
            assert ledger.mark_embedded(s, prior_uid, sha, "otherhost:1:1", 1)
            s.commit()
        out = run()
        assert [(u.study_instance_uid, u.source, u.fetched_now) for u in out.used] == [(prior_uid, "pacs", False)]
    finally:
        pacs.stop()
