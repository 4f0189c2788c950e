"""Priors from a real Orthanc: C-FIND + C-GET / C-MOVE, QIDO-RS + WADO-RS, issuer check,
C-MOVE refused, backfill killed with kill -9, STOW-RS delivery (issue 17)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.fixtures.orthanc import OrthancServer, _free_port
from tests.fixtures.pipeline import phantom_study, uid

ROOT = Path(__file__).resolve().parents[1]
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
ISSUER = "HOSP-A"
PID = "PRI0001"
NODE_AE = "ECHONODE"


def _pacs(tmp_path, scp_port: int, *, allow_move: bool = True) -> OrthancServer:
    if not Path(DICOMWEB_PLUGIN).exists():
        pytest.fail(f"Orthanc DICOMweb plugin not found at {DICOMWEB_PLUGIN} (Debian package orthanc-dicomweb)")
    server = OrthancServer(tmp_path / "pacs", extra_config={
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False},
        "DicomModalities": {"echonode": {"AET": NODE_AE, "Host": "127.0.0.1", "Port": scp_port,
                                         "AllowEcho": True, "AllowFind": True, "AllowGet": True,
                                         "AllowMove": allow_move, "AllowStore": True}},
        "DicomAlwaysAllowFind": False, "DicomAlwaysAllowGet": False, "DicomAlwaysAllowMove": False,
    })
    return server.start()


def _upload(pacs: OrthancServer, files, issuer: str) -> None:
    for f in files:
        ds = pydicom.dcmread(f)
        ds.IssuerOfPatientID = issuer
        ds.save_as(f, enforce_file_format=True)
        pacs.post("/instances", Path(f).read_bytes())


def _settings(tmp_path, tiny_bundle, tiny_bundle_r, sources, **priors):
    from echonode.config import load_settings

    return load_settings(env={}, overrides={
        "data_dir": str(tmp_path / "node"),
        "node": {"ae_title": NODE_AE, "host": "127.0.0.1", "port": 0},
        "model": {"clip_model": str(tiny_bundle.path), "r_model": str(tiny_bundle_r.path), "frames": 4},
        "priors": {"enabled": True, "sources": sources, "timeout_s": 60, **priors},
    })


def _sessions(settings):
    from echonode.store import db
    db.migrate(settings.db_url)
    return db.session_factory(db.get_engine(settings.db_url))


@pytest.fixture(scope="module")
def interpreter_for():
    cache = {}

    def get(settings):
        from echonode.priors import load_interpreter
        key = (settings.model.clip_model, settings.model.r_model)
        if key not in cache:
            cache[key] = load_interpreter(settings)
        return cache[key]
    return get


def _instances(world, study_uid):
    from types import SimpleNamespace
    return [SimpleNamespace(sop_instance_uid=i["SOPInstanceUID"]) for i in world["pacs"].study_instances(study_uid)]


def _embeddings(sessions, study_uid):
    from sqlalchemy import select

    from echonode.store.interpretations import StudyEmbedding
    with sessions() as s:
        return s.execute(select(StudyEmbedding).where(StudyEmbedding.study_instance_uid == study_uid)).scalars().all()


@pytest.fixture
def world(tmp_path, tiny_bundle, tiny_bundle_r):
    """Orthanc (DIMSE Q/R + DICOMweb) holding a patient's earlier study (issuer HOSP-A), an
    earlier study of the same PatientID under another issuer, and the node's SCP."""
    from echonode.dicom.scp import EchoSCP
    from echonode.dicom.spool import Spool

    scp_port = _free_port()
    pacs = _pacs(tmp_path, scp_port)
    prior_uid, files = phantom_study(tmp_path / "ph", patient_id=PID, study_date="20240105", seed=11, n_clips=2,
                                     n_frames=8, size=96, label="prior")
    _upload(pacs, files, ISSUER)
    other_uid, ofiles = phantom_study(tmp_path / "ph", patient_id=PID, study_date="20240301", seed=12, n_clips=1,
                                      n_frames=8, size=96, label="other-issuer")
    _upload(pacs, ofiles, "HOSP-B")
    # an earlier study of the patient without any A4C clip (a PLAX clip only)
    plax_uid, pfiles = phantom_study(tmp_path / "ph", patient_id=PID, study_date="20231001", seed=14, n_clips=1,
                                     n_frames=8, size=96, label="plax")
    for f in pfiles:
        ds = pydicom.dcmread(f)
        del ds.ViewCodeSequence
        ds.SeriesDescription = "PLAX"
        ds.save_as(f, enforce_file_format=True)
    _upload(pacs, pfiles, ISSUER)
    later_uid, lfiles = phantom_study(tmp_path / "ph", patient_id=PID, study_date="20250601", seed=13, n_clips=1,
                                      n_frames=8, size=96, label="later")
    _upload(pacs, lfiles, ISSUER)
    sources = [{"name": "pacs-get", "kind": "dimse", "ae_title": "ORTHANC", "host": "127.0.0.1",
                "port": pacs.dicom_port, "retrieve": "get", "timeout_s": 20}]
    settings = _settings(tmp_path, tiny_bundle, tiny_bundle_r, sources)
    settings = settings.replace(node=dataclasses.replace(settings.node, port=scp_port))
    sessions = _sessions(settings)
    scp = EchoSCP(settings, Spool(settings, sessions))
    scp.start()
    try:
        yield dict(pacs=pacs, settings=settings, sessions=sessions, prior=prior_uid, other=other_uid, plax=plax_uid,
                   later=later_uid, tmp=tmp_path, scp_port=scp_port)
    finally:
        scp.stop(drain_s=1)
        pacs.stop()


def _with_source(settings, **changes):
    import dataclasses
    src = dataclasses.replace(settings.priors.sources[0], **changes)
    return settings.replace(priors=dataclasses.replace(settings.priors, sources=(src,)))


def _run(settings, sessions, interpreter, current_uid="2.25.999", study_date="20250101"):
    from echonode.priors import fetch_and_embed_priors
    return fetch_and_embed_priors(settings, sessions, interpreter, study_uid=current_uid, patient_id=PID,
                                  issuer=ISSUER, study_date=study_date)


@pytest.mark.parametrize("retrieve,match_at_pacs", [("get", True), ("move", False)])
def test_prior_found_retrieved_embedded_once(world, interpreter_for, retrieve, match_at_pacs):
    from echonode.store import priors as ledger
    from echonode.store.interpretations import patient_key, prior_embeddings

    settings = _with_source(world["settings"], retrieve=retrieve, match_issuer_at_pacs=match_at_pacs)
    sessions, interp = world["sessions"], interpreter_for(world["settings"])
    out = _run(settings, sessions, interp)
    assert [u.study_instance_uid for u in out.used] == [world["prior"]], out.statements
    assert out.used[0].clips == 2 and out.used[0].fetched_now and out.used[0].study_date == "20240105"
    # the other issuer's study (same PatientID), the later study and the one without A4C clip are not used
    assert "pacs-get: study of 2023-10-01 has no A4C clip" in out.statements, out.statements
    assert _embeddings(sessions, world["plax"]) == []
    assert _embeddings(sessions, world["other"]) == [] and _embeddings(sessions, world["later"]) == []
    rows = _embeddings(sessions, world["prior"])
    assert len(rows) == 1 and rows[0].model_sha256 == interp.r.info.weights_sha256
    # the stored embedding is the Interpreter's study embedding of the same clips
    from echonode.priors import load_prior_clips
    ph_files = sorted((world["tmp"] / "ph").glob(f"{world['prior']}-*.dcm"))
    inputs, _ = load_prior_clips(settings, ph_files)
    ref = interp.study_embedding(inputs)
    got = np.frombuffer(rows[0].vector, dtype="<f4")
    assert np.allclose(got, ref, atol=1e-5)
    # the analysis' own lookup now finds it for the current study
    with sessions() as s:
        pri = prior_embeddings(s, patient_key(PID, ISSUER), "2.25.999", "20250101", interp.r.info.weights_sha256)
    assert [p.study_instance_uid for p in pri] == [world["prior"]]
    assert "2024-01-05 from pacs-get" in out.summary()
    # pixels purged (keep_pixels = false) from our folder; the C-MOVE copies are the node's spool
    assert not any((settings.priors_path / "fetch").glob("*/*.dcm")) if (settings.priors_path / "fetch").exists() else True
    if not match_at_pacs:  # the PACS answered the other issuer's study; the node said why it is not used
        assert any("another patient or issuer" in s for s in out.statements), out.statements
    if retrieve == "move":  # moved through the node's own C-STORE SCP into its spool and index
        with sessions() as s:
            from echonode.store import priors as pl
            assert len(pl.instance_paths(s, [r.sop_instance_uid for r in _instances(world, world["prior"])])) == 2
    # fetched once per weights checksum: a second analysis uses the stored embedding
    out2 = _run(settings, sessions, interp)
    assert [u.study_instance_uid for u in out2.used] == [world["prior"]] and not out2.used[0].fetched_now
    with sessions() as s:
        e = ledger.get(s, world["prior"], interp.r.info.weights_sha256)
    assert e.state == ledger.EMBEDDED and e.attempts == 1


def test_dicomweb_qido_wado_only(world, interpreter_for):
    settings = world["settings"]
    import dataclasses

    from echonode.config import PriorSource
    # the issuer only asked back (not matched by the PACS): the node itself drops the other issuer's study
    src = PriorSource(name="pacs-web", kind="dicomweb", url=world["pacs"].url + "/dicom-web", timeout_s=20,
                      match_issuer_at_pacs=False)
    settings = settings.replace(priors=dataclasses.replace(settings.priors, sources=(src,)))
    out = _run(settings, world["sessions"], interpreter_for(settings))
    assert [u.study_instance_uid for u in out.used] == [world["prior"]], out.statements
    assert out.used[0].source == "pacs-web" and out.used[0].clips == 2
    assert any("another patient or issuer" in s for s in out.statements)
    rows = _embeddings(world["sessions"], world["prior"])
    assert len(rows) == 1
    # only the frames the model uses were asked for (WADO-RS frames), and the embedding is the
    # one of the whole clips decoded locally with the same frame sampling
    from echonode.priors import load_prior_clips
    assert len(out.fetched) == 1 and len(out.fetched[0].presampled) == 2   # both clips by frame retrieval
    inputs, _ = load_prior_clips(settings, sorted((world["tmp"] / "ph").glob(f"{world['prior']}-*.dcm")))
    ref = interpreter_for(settings).study_embedding(inputs)
    assert np.allclose(np.frombuffer(rows[0].vector, dtype="<f4"), ref, atol=1e-4)
    assert all(len(c.ref.frames_used) == 4 for c in inputs)  # model.frames = 4 of the 8 stored
    # what the analysis does next: the priors lookup it already has finds the retrieved prior,
    # and the Interpretation (which the SR renders) compares the new study with it, dated
    from echonode.interpret.engine import PriorEmbedding
    from echonode.store.interpretations import patient_key, prior_embeddings
    it = interpreter_for(settings)
    cur_uid, cur_files = phantom_study(world["tmp"] / "cur", patient_id=PID, study_date="20250101", seed=51,
                                       n_clips=1, n_frames=8, size=96, label="current")
    cur_inputs, _ = load_prior_clips(settings, cur_files)
    with world["sessions"]() as s:
        rows = prior_embeddings(s, patient_key(PID, ISSUER), cur_uid, "20250101", it.r.info.weights_sha256)
    interp, _ = it.interpret_with_embedding(cur_uid, cur_inputs, [
        PriorEmbedding(study_instance_uid=r.study_instance_uid, study_date=r.study_date, embedding=r.embedding,
                       weights_sha256=r.model_sha256) for r in rows])
    assert [(p.study_instance_uid, p.study_date) for p in interp.longitudinal.priors] == [(world["prior"], "20240105")]
    assert -1.0 <= interp.longitudinal.priors[0].similarity <= 1.0


def test_wado_frames_file_holds_only_sampled_frames(world, tmp_path):
    from echonode.dicom import web
    from echonode.priors import _wado_frames

    client = web.DicomWebClient(web.WebTarget(world["pacs"].url + "/dicom-web"))
    inst = world["pacs"].study_instances(world["prior"])[0]
    path = _wado_frames(world["settings"], client, world["prior"], inst["SeriesInstanceUID"],
                        inst["SOPInstanceUID"], tmp_path / "f")
    ds = pydicom.dcmread(path)
    assert int(ds.NumberOfFrames) == 4 and ds.SOPInstanceUID == inst["SOPInstanceUID"]
    from echonode.dicom.frames import load_clip
    orig = world["tmp"] / "ph" / f"{world['prior']}-0.dcm"
    if pydicom.dcmread(orig, stop_before_pixels=True).SOPInstanceUID != inst["SOPInstanceUID"]:
        orig = world["tmp"] / "ph" / f"{world['prior']}-1.dcm"
    full = load_clip(orig, indices=[0, 2, 4, 6]).frames
    assert np.array_equal(load_clip(path).frames, full)


def test_move_refused_falls_back_to_get(tmp_path, tiny_bundle, tiny_bundle_r, interpreter_for):
    pacs = _pacs(tmp_path, _free_port(), allow_move=False)
    try:
        prior_uid, files = phantom_study(tmp_path / "ph", patient_id=PID, study_date="20230101", seed=21,
                                         n_clips=1, n_frames=8, size=96, label="refused")
        _upload(pacs, files, ISSUER)
        settings = _settings(tmp_path, tiny_bundle, tiny_bundle_r, [
            {"name": "strict", "kind": "dimse", "ae_title": "ORTHANC", "host": "127.0.0.1",
             "port": pacs.dicom_port, "retrieve": "move", "timeout_s": 20}])
        sessions = _sessions(settings)
        out = _run(settings, sessions, interpreter_for(settings))
        assert any("C-MOVE refused" in s for s in out.statements), out.statements
        assert [u.study_instance_uid for u in out.used] == [prior_uid]
    finally:
        pacs.stop()


def test_pacs_down_and_timeout_never_hang(tmp_path, tiny_bundle, tiny_bundle_r, interpreter_for):
    import socket
    # a port that accepts TCP but never speaks DICOM: the whole wait is bounded by priors.timeout_s
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(5)
    try:
        settings = _settings(tmp_path, tiny_bundle, tiny_bundle_r, [
            {"name": "silent", "kind": "dimse", "ae_title": "X", "host": "127.0.0.1",
             "port": silent.getsockname()[1], "timeout_s": 30}], timeout_s=2)
        sessions = _sessions(settings)
        t0 = time.monotonic()
        out = _run(settings, sessions, interpreter_for(settings))
        assert time.monotonic() - t0 < 10
        assert out.timed_out and out.used == []
        assert out.summary().startswith("Priors not available:") and "did not answer within 2 s" in out.summary()
    finally:
        silent.close()
    closed = _free_port()
    settings = _settings(tmp_path, tiny_bundle, tiny_bundle_r, [
        {"name": "down", "kind": "dimse", "ae_title": "X", "host": "127.0.0.1", "port": closed, "timeout_s": 3}])
    out = _run(settings, _sessions(settings), interpreter_for(settings))
    assert out.used == [] and any(s.startswith("down: ") for s in out.statements), out.statements
    assert PID not in out.summary()


def test_stow_rs_delivery_lands_in_same_study(tmp_path):
    """A destination kind = "dicomweb": outbox rows are sent by STOW-RS and land in the study."""
    from echonode.config import load_settings
    from echonode.dicom import scu
    from echonode.storage import open_storage
    from echonode.store import outbox as ob

    pacs = _pacs(tmp_path, _free_port())
    try:
        study_uid, files = phantom_study(tmp_path / "ph", patient_id="STOW1", study_date="20240505", seed=31,
                                         n_clips=1, n_frames=4, size=64, label="stow")
        _upload(pacs, files, ISSUER)
        before = len(pacs.study_instances(study_uid))
        # a result object of the same study (an SR-like SC copy with a new SOP Instance UID)
        ds = pydicom.dcmread(files[0])
        ds.SOPInstanceUID = uid("stow-result")
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = uid("stow-series")
        settings = load_settings(env={}, overrides={
            "data_dir": str(tmp_path / "node"),
            "delivery": {"destinations": [{"name": "web", "kind": "dicomweb", "url": pacs.url + "/dicom-web",
                                           "auth": "none"}], "backoff_initial_s": 0},
        })
        sessions = _sessions(settings)
        objs = scu.write_results(open_storage(settings), [ds])
        with sessions() as s:
            scu.enqueue(s, objs, settings.delivery.destinations)
            s.commit()
        summary = scu.deliver_pending(settings, sessions)
        assert summary.delivered == 1 and summary.retrying == 0, summary
        inst = pacs.study_instances(study_uid)
        assert len(inst) == before + 1 and str(ds.SOPInstanceUID) in {i["SOPInstanceUID"] for i in inst}
        with sessions() as s:
            rows = ob.list_rows(s)
        assert [r.state for r in rows] == [ob.DELIVERED]
        # a PACS that is down: the row is retried later, not lost
        pacs.stop()
        ds.SOPInstanceUID = uid("stow-result-2")
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        objs = scu.write_results(open_storage(settings), [ds])
        with sessions() as s:
            scu.enqueue(s, objs, settings.delivery.destinations)
            s.commit()
        summary = scu.deliver_pending(settings, sessions)
        assert summary.delivered == 0 and summary.retrying == 1
        pacs.start()
        time.sleep(0.1)
        summary = scu.deliver_pending(settings, sessions)
        assert summary.delivered == 1, summary
        assert str(ds.SOPInstanceUID) in {i["SOPInstanceUID"] for i in pacs.study_instances(study_uid)}
    finally:
        pacs.stop()


def test_config_validation_names_the_key():
    from echonode.config import ConfigError, load_settings

    def bad(over, match):
        with pytest.raises(ConfigError, match=match):
            load_settings(env={}, overrides=over)

    bad({"priors": {"sources": [{"name": "p", "kind": "dimse", "ae_title": "A", "host": "h", "port": 1,
                                 "retrieve": "push"}]}}, r"priors.sources\[name='p'\].retrieve")
    bad({"priors": {"sources": [{"name": "w", "kind": "dicomweb", "url": "ftp://x"}]}}, r"\.url")
    bad({"priors": {"sources": [{"name": "w", "kind": "dicomweb", "url": "https://x", "auth": "bearer"}]}},
        r"\.token: required")
    bad({"priors": {"timeout_s": 0}}, r"priors.timeout_s")
    bad({"delivery": {"destinations": [{"name": "d", "kind": "dicomweb", "url": "https://x", "auth": "basic"}]}},
        r"delivery.destinations\[name='d'\].username")
    bad({"delivery": {"destinations": [{"name": "d"}]}}, r"ae_title, host and port are required")
    ok = load_settings(env={"ECHONODE_PRIORS__TIMEOUT_S": "7"})
    assert ok.priors.timeout_s == 7.0 and ok.priors.keep_pixels is False


def test_multipart_reader_bounds(tmp_path):
    import io

    from echonode.dicom.web import DicomWebError, read_multipart

    ct = 'multipart/related; type="application/dicom"; boundary="b0"'
    body = b"pre\r\n--b0\r\nContent-Type: application/dicom\r\n\r\nAAAA\r\n--b0\r\n\r\nBB\r\n--b0--\r\n"
    files = list(read_multipart(io.BytesIO(body), ct, tmp_path / "ok", max_bytes=10))
    assert [f.read_bytes() for f in files] == [b"AAAA", b"BB"]
    with pytest.raises(DicomWebError, match="larger than 3 bytes"):
        list(read_multipart(io.BytesIO(body), ct, tmp_path / "big", max_bytes=3))
    assert list((tmp_path / "big").iterdir()) == []   # the partial part is removed
    with pytest.raises(DicomWebError, match="more than 1 part"):
        list(read_multipart(io.BytesIO(body), ct, tmp_path / "n", max_bytes=10, max_parts=1))
    with pytest.raises(DicomWebError, match="truncated"):
        list(read_multipart(io.BytesIO(body[:40]), ct, tmp_path / "t", max_bytes=10))
    with pytest.raises(DicomWebError, match="part header longer"):
        list(read_multipart(io.BytesIO(b"--b0\r\n" + b"X" * 20000), ct, tmp_path / "h", max_bytes=10))
    with pytest.raises(DicomWebError, match="no boundary in the first"):
        list(read_multipart(io.BytesIO(b"Y" * 300000), ct, tmp_path / "p", max_bytes=10))


def test_dicomweb_tls_and_basic_auth(tmp_path, tiny_bundle, tiny_bundle_r, interpreter_for):
    """Orthanc's DICOMweb with basic auth behind TLS (socat with a test CA: Orthanc 1.10's own
    HTTPS crashes on this system's OpenSSL): STOW-RS delivery and QIDO/WADO priors work with
    the CA and the password; a wrong password or an unknown CA is refused and retried, not lost."""
    import shutil as sh

    from echonode.config import load_settings
    from echonode.dicom import scu
    from echonode.storage import open_storage
    from echonode.store import outbox as ob
    from tests.fixtures.orthanc import make_test_pki

    if sh.which("socat") is None:
        pytest.fail("socat is not installed (Debian package socat)")
    pki = make_test_pki(tmp_path / "pki")
    both = tmp_path / "pki" / "server-both.pem"
    both.write_text(Path(pki["server_key"]).read_text() + Path(pki["server_cert"]).read_text())
    server = OrthancServer(tmp_path / "pacs-auth", extra_config={
        "Plugins": [DICOMWEB_PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "AuthenticationEnabled": True, "RegisteredUsers": {"echonode": "s3cret"}})
    import base64
    import urllib.request
    auth = {"Authorization": "Basic " + base64.b64encode(b"echonode:s3cret").decode()}
    server.get = lambda path, raw=False: (lambda d: d if raw else json.loads(d))(urllib.request.urlopen(
        urllib.request.Request(server.url + path, headers=auth), timeout=10).read())
    server.post = lambda path, body: json.loads(urllib.request.urlopen(urllib.request.Request(
        server.url + path, data=body if isinstance(body, bytes) else json.dumps(body).encode()
        if not isinstance(body, str) else body.encode(), method="POST", headers=auth), timeout=10).read() or b"null")
    server.start()
    tls_port = _free_port()
    proxy = subprocess.Popen(["socat", f"OPENSSL-LISTEN:{tls_port},bind=127.0.0.1,reuseaddr,fork,cert={both},verify=0",
                              f"TCP:127.0.0.1:{server.http_port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"https://127.0.0.1:{tls_port}/dicom-web"
    try:
        from tests.fixtures.pipeline import wait_for
        import socket
        wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", tls_port)) == 0, 10, "socat TLS port")
        prior_uid, files = phantom_study(tmp_path / "ph", patient_id=PID, study_date="20220202", seed=41, n_clips=1,
                                         n_frames=8, size=96, label="tls")
        for f in files:
            ds = pydicom.dcmread(f)
            ds.IssuerOfPatientID = ISSUER
            ds.save_as(f, enforce_file_format=True)
        settings = load_settings(env={}, overrides={
            "data_dir": str(tmp_path / "node"),
            "delivery": {"backoff_initial_s": 0, "destinations": [
                {"name": "good", "kind": "dicomweb", "url": url, "auth": "basic", "username": "echonode",
                 "password": "s3cret", "ca_file": pki["ca"]},
                {"name": "badpw", "kind": "dicomweb", "url": url, "auth": "basic", "username": "echonode",
                 "password": "wrong", "ca_file": pki["ca"]},
                {"name": "noca", "kind": "dicomweb", "url": url, "auth": "basic", "username": "echonode",
                 "password": "s3cret"}]}})
        sessions = _sessions(settings)
        with sessions() as s:
            scu.enqueue(s, [files[0]], settings.delivery.destinations, store=open_storage(settings))
        summary = scu.deliver_pending(settings, sessions)
        assert summary.delivered == 1 and summary.retrying == 2, summary
        with sessions() as s:
            rows = {r.destination: r for r in ob.list_rows(s)}
        assert rows["good"].state == ob.DELIVERED
        assert "HTTP 401" in rows["badpw"].last_error and rows["badpw"].state == ob.PENDING
        assert "TLS" in rows["noca"].last_error and rows["noca"].state == ob.PENDING
        assert len(server.study_instances(prior_uid)) == 1
        # the delivered instance is the patient's prior: found and embedded over HTTPS + basic auth
        psettings = _settings(tmp_path, tiny_bundle, tiny_bundle_r, [
            {"name": "tls", "kind": "dicomweb", "url": url, "auth": "basic", "username": "echonode",
             "password": "s3cret", "ca_file": pki["ca"]}])
        out = _run(psettings, _sessions(psettings), interpreter_for(psettings))
        assert [u.study_instance_uid for u in out.used] == [prior_uid], out.statements
    finally:
        proxy.terminate()
        proxy.wait(5)
        server.stop()


def test_backfill_window_and_rate_parsing():
    import datetime as dt

    from echonode.commands.priors import _rate
    from echonode.priors import in_window, parse_window

    w = parse_window("19:00-06:00")
    assert in_window(w, dt.datetime(2026, 1, 1, 23, 0)) and in_window(w, dt.datetime(2026, 1, 1, 5, 59))
    assert not in_window(w, dt.datetime(2026, 1, 1, 12, 0)) and not in_window(w, dt.datetime(2026, 1, 1, 6, 0))
    day = parse_window("08:00-17:30")
    assert in_window(day, dt.datetime(2026, 1, 1, 8, 0)) and not in_window(day, dt.datetime(2026, 1, 1, 17, 30))
    assert parse_window("") is None and in_window(None)
    with pytest.raises(ValueError, match="--window"):
        parse_window("7pm-6am")
    assert _rate("30/min") == 30.0 and _rate("2.5") == 2.5 and _rate(None) is None
    with pytest.raises(SystemExit):
        _rate("fast")


def test_partial_answers_are_said(world, interpreter_for):
    """More studies than priors.max_results: the first ones are used and the outcome says the list was partial."""
    settings = world["settings"]
    settings = settings.replace(priors=dataclasses.replace(settings.priors, max_results=1))
    out = _run(settings, world["sessions"], interpreter_for(settings))
    assert any("partial study list (more than 1 answers" in s for s in out.statements), out.statements
    assert len(out.used) + sum("no A4C clip" in s for s in out.statements) == 1


def _moved(store, tmp_path, n: int) -> dict[str, str]:
    """``n`` instances placed in the node's store as a C-MOVE through its SCP places them."""
    import hashlib

    keys = {}
    for i in range(n):
        sop = f"2.25.{700 + i}"
        src = tmp_path / f"src-{i}.dcm"
        src.write_bytes(b"DICM" * 100 + bytes([i]))
        key = f"instances/2.25.1/2.25.2/{sop}.dcm"
        wait = store.put_new(key, src, hashlib.sha256(src.read_bytes()).hexdigest())
        if wait is not None:
            wait()
        keys[sop] = key
    return keys


def test_moved_instance_missing_from_the_local_store_is_skipped(tmp_path):
    """One moved instance gone from the data directory: the others are used, the count said."""
    from echonode.config import load_settings
    from echonode.priors import _local_copies
    from echonode.storage import open_storage

    settings = load_settings(env={}, overrides={"data_dir": str(tmp_path / "node")})
    store = open_storage(settings)
    keys = _moved(store, tmp_path, 3)
    store.delete(keys["2.25.701"])
    files, missing = _local_copies(settings, keys, tmp_path / "fetch")
    assert missing == 1
    assert files == [store.local_path(keys["2.25.700"]), store.local_path(keys["2.25.702"])]


def test_moved_instance_missing_from_object_storage_is_skipped(tmp_path, monkeypatch):
    """Real SeaweedFS: a missing object is skipped and counted; a store that cannot be reached
    is StorageUnavailable (transient), not a missing instance."""
    from echonode.config import load_settings
    from echonode.priors import _local_copies
    from echonode.sandbox import LocalS3
    from echonode.storage import StorageUnavailable, open_storage

    s3 = LocalS3(tmp_path / "s3")
    try:
        env = s3.env()
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_EC2_METADATA_DISABLED"):
            monkeypatch.setenv(var, env[var])
        settings = load_settings(env={**env, "ECHONODE_STORAGE__TIMEOUT_S": "5"},
                                 overrides={"data_dir": str(tmp_path / "node")})
        store = open_storage(settings)
        keys = _moved(store, tmp_path, 3)
        store.delete(keys["2.25.701"])
        files, missing = _local_copies(settings, keys, tmp_path / "fetch")
        assert missing == 1
        assert [f.name for f in files] == ["2.25.700.dcm", "2.25.702.dcm"]
        assert files[1].read_bytes() == (tmp_path / "src-2.dcm").read_bytes()
        s3.stop()
        with pytest.raises(StorageUnavailable):
            _local_copies(settings, keys, tmp_path / "fetch2")
    finally:
        s3.stop()
