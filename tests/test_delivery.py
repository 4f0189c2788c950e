"""Delivery to a real Orthanc: same study, retries, dead letter, re-runs, storage commitment."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import update as sa_update

from echonode.config import load_settings
from echonode.storage import open_storage
from echonode.dicom import scu
from echonode.store import db
from echonode.store import outbox as ob
from tests.fixtures.interp import make_interpretation, make_sources, publish_results


def _settings(tmp_path, dicom_port, *, commitment=False, listener_port=0, max_attempts=8, db_url=None,
              dest_name="pacs", ae="ORTHANC"):
    over = {
        "data_dir": str(tmp_path / "data"),
        "node": {"ae_title": "ECHONODE", "port": listener_port or 11112, "host": "127.0.0.1",
                 "dimse_timeout_s": 10, "acse_timeout_s": 10, "network_timeout_s": 10},
        "delivery": {"destinations": [{"name": dest_name, "ae_title": ae, "host": "127.0.0.1",
                                       "port": dicom_port, "storage_commitment": commitment}],
                     "max_attempts": max_attempts, "backoff_initial_s": 5, "backoff_max_s": 60,
                     "commitment_timeout_s": 30},
    }
    if db_url:
        over["database_url"] = db_url
    return load_settings(env={}, overrides=over)


def _store(settings):
    db.migrate(settings.db_url)
    engine = db.make_engine(settings.db_url)
    return engine, db.session_factory(engine)


@pytest.fixture(scope="module")
def sources(realworld_dir):
    return make_sources(realworld_dir)


def _rows(sf):
    with sf() as s:
        return sorted((r.as_dict() for r in ob.list_rows(s, limit=1000)), key=lambda d: d["id"])


def _row(sf, kind):
    """The one outbox row of ``kind`` (a result set without overlays has one "sr" and one "page")."""
    (row,) = [r for r in _rows(sf) if r["kind"] == kind]
    return row


def _kinds(sf):
    return sorted(r["kind"] for r in _rows(sf))


def test_delivered_into_the_same_study_and_rerun_replaces(orthanc, sources, tmp_path):
    settings = _settings(tmp_path, orthanc.dicom_port)
    engine, sf = _store(settings)
    interp = make_interpretation(sources)
    with sf() as s:
        paths = publish_results(settings, s, interp, sources)
    assert len(paths) == 4   # SR, key-results page, two overlays
    for p in paths:  # files under results/<study uid>/ before any send
        assert p.parent == settings.results_path / interp.study_instance_uid and p.is_file()
    assert {r["state"] for r in _rows(sf)} == {"pending"}
    assert _kinds(sf) == ["page", "sc", "sc", "sr"]
    local_uids = sorted(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths)

    summary = scu.deliver_pending(settings, sf)
    assert (summary.claimed, summary.delivered, summary.dead, summary.retrying) == (4, 4, 0, 0)
    got = orthanc.study_instances(interp.study_instance_uid)
    assert sorted(i["Modality"] for i in got) == ["OT", "OT", "OT", "SR"]
    assert sorted(i["SOPInstanceUID"] for i in got) == local_uids
    assert {i["StudyInstanceUID"] for i in got} == {interp.study_instance_uid}
    sr_path = paths[0]
    sr_local = pydicom.dcmread(sr_path)
    sr_remote = [i for i in got if i["Modality"] == "SR"][0]
    assert sr_remote["SOPInstanceUID"] == sr_local.SOPInstanceUID
    fetched = pydicom.dcmread(__import__("io").BytesIO(orthanc.fetch_instance(sr_local.SOPInstanceUID)))
    assert fetched.PatientID == sources[0].PatientID
    assert all(r["state"] == "delivered" and r["last_status"] == "0x0000" for r in _rows(sf))

    # a re-run of the same model: same UIDs, the outbox row is reset, Orthanc keeps one copy
    again = make_interpretation(sources)
    with sf() as s:
        paths2 = publish_results(settings, s, again, sources)
    assert paths2 == paths
    assert len(_rows(sf)) == 4 and {r["state"] for r in _rows(sf)} == {"pending"}
    summary = scu.deliver_pending(settings, sf)
    assert summary.delivered == 4
    got2 = orthanc.study_instances(interp.study_instance_uid)
    assert sorted(i["SOPInstanceUID"] for i in got2) == local_uids
    assert orthanc.count_instances() == 4
    engine.dispose()


def test_orthanc_down_retries_with_backoff_then_delivers(orthanc, sources, tmp_path, pg_url):
    settings = _settings(tmp_path, orthanc.dicom_port, db_url=pg_url)
    engine, sf = _store(settings)
    interp = make_interpretation(sources, promptcams=False)
    with sf() as s:
        publish_results(settings, s, interp, sources)
    orthanc.stop()
    t0 = dt.datetime(2030, 1, 1, 12, 0, 0)
    summary = scu.deliver_pending(settings, sf, now=t0)
    assert _kinds(sf) == ["page", "sr"]   # no overlays: the SR and the key-results page
    assert (summary.claimed, summary.delivered, summary.retrying) == (2, 0, 2)
    for row in _rows(sf):
        assert row["state"] == "pending" and row["attempts"] == 1
        assert row["next_attempt_at"] == "2030-01-01T12:00:05Z"  # backoff_initial_s
        assert "cannot connect" in row["last_error"] or "association" in row["last_error"]
    # not due yet: nothing is tried
    assert scu.deliver_pending(settings, sf, now=t0 + dt.timedelta(seconds=4)).claimed == 0
    # second failure doubles the delay
    scu.deliver_pending(settings, sf, now=t0 + dt.timedelta(seconds=5))
    for row in _rows(sf):
        assert row["attempts"] == 2 and row["next_attempt_at"] == "2030-01-01T12:00:15Z"
    orthanc.start()
    summary = scu.deliver_pending(settings, sf, now=t0 + dt.timedelta(seconds=15))
    assert summary.delivered == 2
    for row in _rows(sf):
        assert row["state"] == "delivered" and row["attempts"] == 3
    assert sorted(i["Modality"] for i in orthanc.study_instances(interp.study_instance_uid)) == ["OT", "SR"]
    engine.dispose()


def test_dead_letter_and_outbox_cli(orthanc, sources, tmp_path, capsys):
    from echonode.cli import main

    settings = _settings(tmp_path, orthanc.dicom_port, max_attempts=2)
    cfg = tmp_path / "echonode.toml"
    cfg.write_text(
        f'data_dir = "{settings.data_dir}"\n'
        '[node]\nae_title = "ECHONODE"\nhost = "127.0.0.1"\n'
        '[delivery]\nmax_attempts = 2\nbackoff_initial_s = 0.0\n'
        f'[[delivery.destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n')
    engine, sf = _store(settings)
    interp = make_interpretation(sources, promptcams=False)
    with sf() as s:
        publish_results(settings, s, interp, sources)
    orthanc.stop()
    capsys.readouterr()
    assert main(["outbox", "send", "--config", str(cfg), "--json"]) == 0
    assert main(["outbox", "send", "--config", str(cfg), "--json"]) == 1  # now dead
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1])["outbox"]["dead"] == 2   # the SR and the key-results page
    assert main(["outbox", "list", "--config", str(cfg), "--json", "--state", "dead"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [json.loads(line) for line in lines]
    assert sorted(r["kind"] for r in rows) == ["page", "sr"]
    assert all(r["state"] == "dead" and r["attempts"] == 2 for r in rows)
    for line in lines:
        assert "PatientName" not in line and sources[0].PatientID not in line  # no PHI in listings
    assert main(["outbox", "retry", "--config", str(cfg), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"retried": 2}
    orthanc.start()
    assert main(["outbox", "send", "--config", str(cfg)]) == 0
    assert "delivered 2" in capsys.readouterr().out
    assert main(["outbox", "purge", "--config", str(cfg), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"purged": 2}
    assert _rows(sf) == []
    assert main(["outbox", "--config", str(cfg)]) == 2
    engine.dispose()


def test_storage_commitment_with_orthanc(orthanc, sources, tmp_path):
    settings = _settings(tmp_path, orthanc.dicom_port, commitment=True, listener_port=orthanc.commitment_port)
    engine, sf = _store(settings)
    interp = make_interpretation(sources)
    with sf() as s:
        publish_results(settings, s, interp, sources)
    with scu.CommitmentListener(settings, sf):
        summary = scu.deliver_pending(settings, sf)
        assert (summary.claimed, summary.committing, summary.delivered) == (4, 4, 0)   # SR, page, 2 overlays
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if {r["state"] for r in _rows(sf)} == {"delivered"}:
                break
            time.sleep(0.1)
    rows = _rows(sf)
    assert {r["state"] for r in rows} == {"delivered"}, rows
    assert len({r["transaction_uid"] for r in rows}) == 1 and rows[0]["transaction_uid"]
    assert all(r["delivered_at"] for r in rows)
    assert len(orthanc.study_instances(interp.study_instance_uid)) == 4
    engine.dispose()


def test_commitment_without_report_times_out_and_is_resent(orthanc, sources, tmp_path):
    """No listener for the report: rows wait in 'committing', then are sent again."""
    settings = _settings(tmp_path, orthanc.dicom_port, commitment=True, listener_port=orthanc.commitment_port)
    engine, sf = _store(settings)
    interp = make_interpretation(sources, promptcams=False)
    with sf() as s:
        publish_results(settings, s, interp, sources)
    t0 = dt.datetime(2030, 1, 1, 12, 0, 0)
    assert scu.deliver_pending(settings, sf, now=t0).committing == 2   # the SR and the page
    assert {r["state"] for r in _rows(sf)} == {"committing"}
    summary = scu.deliver_pending(settings, sf, now=t0 + dt.timedelta(seconds=31))
    assert summary.expired_commitments == 2
    for row in _rows(sf):
        assert "no storage commitment report" in row["last_error"]
    engine.dispose()


@pytest.fixture
def status_scp(port):
    """A real pynetdicom Storage SCP answering a chosen status per SOP class."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    answers = {}

    def on_store(event):
        return answers.get(event.request.AffectedSOPClassUID, 0x0000)

    ae = AE(ae_title="STATUSSCP")
    ae.supported_contexts = AllStoragePresentationContexts
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield port, answers
    finally:
        server.shutdown()


def test_failure_and_warning_statuses_are_recorded(status_scp, sources, tmp_path):
    port, answers = status_scp
    answers["1.2.840.10008.5.1.4.1.1.88.34"] = 0xA700   # SR: out of resources (failure)
    answers["1.2.840.10008.5.1.4.1.1.7"] = 0xB000       # SC: coercion of data elements (warning)
    settings = _settings(tmp_path, port, ae="STATUSSCP")
    engine, sf = _store(settings)
    interp = make_interpretation(sources)
    with sf() as s:
        publish_results(settings, s, interp, sources)
    summary = scu.deliver_pending(settings, sf)
    assert (summary.delivered, summary.warnings, summary.retrying) == (3, 3, 1)
    assert _kinds(sf) == ["page", "sc", "sc", "sr"]
    sr = _row(sf, "sr")
    scs = [r for r in _rows(sf) if r["kind"] in ("sc", "page")]   # both Secondary Capture
    assert sr["state"] == "pending" and sr["last_status"] == "0xA700"
    assert "0xA700" in sr["last_error"]
    assert all(r["state"] == "delivered" and r["last_status"] == "0xB000" for r in scs)
    assert all("warning status 0xB000" in r["last_error"] for r in scs)
    engine.dispose()


def test_enqueue_validates_and_writes_under_results(tmp_path, sources):
    settings = _settings(tmp_path, 104)
    engine, sf = _store(settings)
    interp = make_interpretation(sources, promptcams=False)
    from echonode.dicom.sr import build_sr
    ds = build_sr(interp, sources)
    with sf() as s:
        with pytest.raises(scu.DeliveryError, match="store"):
            scu.enqueue(s, [ds], settings.delivery.destinations)
        ids = scu.enqueue(s, [ds], settings.delivery.destinations, store=open_storage(settings))
    assert len(ids) == 1
    path = settings.results_path / interp.study_instance_uid / f"{ds.SOPInstanceUID}.dcm"
    assert path.is_file()
    bad = pydicom.dcmread(path)
    bad.StudyInstanceUID = "1.2.3/../../etc"
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        scu.write_results(open_storage(settings), [bad])
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    with sf() as s, pytest.raises(scu.DeliveryError, match="not a readable DICOM file"):
        scu.enqueue(s, [junk], ["pacs"], store=open_storage(settings))
    engine.dispose()


def test_expired_lease_is_claimed_once(pg_url):
    """Two deliverers race for a 'sending' row whose lease expired (its worker died): on
    PostgreSQL the loser's UPDATE used to match too (state is still 'sending' after the
    winner's claim), so the object was sent twice. The lease is part of the check."""
    db.migrate(pg_url)
    engine = db.make_engine(pg_url)
    sf = db.session_factory(engine)
    now = ob.utcnow()
    with sf() as s:
        ob.add(s, [ob.OutboxObject(path="/x.dcm", sop_instance_uid="1.2.3", sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                                   study_instance_uid="1.2", kind="sc")], ["pacs"], now=now)
        s.execute(sa_update(ob.OutboxRow).values(state=ob.SENDING, lease_until=now - dt.timedelta(seconds=1)))
        s.commit()
    a, b = sf(), sf()
    real, calls, won_by_b = a.execute, [], []

    def a_execute(stmt, *args, **kw):  # A has read the candidates; B claims before A's UPDATE
        calls.append(stmt)
        if len(calls) == 2:
            won_by_b.extend(r.id for r in ob.claim_due(b, now=now))
        return real(stmt, *args, **kw)

    a.execute = a_execute
    try:
        got_a = ob.claim_due(a, now=now)
        assert len(won_by_b) == 1 and got_a == []
    finally:
        a.close()
        b.close()
        engine.dispose()


def test_config_before_the_outbox_action_is_used(tmp_path, monkeypatch, capsys):
    """`echonode outbox --config FILE list` used to drop FILE (the action's own --config
    default overwrote it) and act on ./echonode-data instead."""
    from echonode.cli import main

    monkeypatch.chdir(tmp_path)
    for k in ("ECHONODE_CONFIG", "ECHONODE_DATA_DIR", "ECHONODE_DATABASE_URL"):
        monkeypatch.delenv(k, raising=False)
    bad = tmp_path / "bad.toml"
    bad.write_text("node = [broken\n")
    assert main(["outbox", "--config", str(bad), "list"]) == 3
    assert main(["outbox", "list", "--config", str(bad)]) == 3
    good = tmp_path / "good.toml"
    good.write_text(f'data_dir = "{tmp_path / "configured"}"\n')
    capsys.readouterr()
    # a read-only command never creates nor migrates the database: it says where it looked
    assert main(["outbox", "--config", str(good), "list", "--json"]) == 1
    err = capsys.readouterr().err
    assert "no database yet" in err and str(tmp_path / "configured") in err, err
    assert not (tmp_path / "configured").exists() and not (tmp_path / "echonode-data").exists()
    db.migrate(f"sqlite:///{tmp_path / 'configured' / 'echonode.sqlite3'}")
    assert main(["outbox", "--config", str(good), "list", "--json"]) == 0
    capsys.readouterr()


def test_status_never_migrates(tmp_path, capsys):
    """`echonode status` on a database that is behind says so, and leaves it as it is."""
    from echonode.cli import main

    data = tmp_path / "data"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'data_dir = "{data}"\n')
    assert main(["status", "--config", str(cfg)]) == 1
    assert "no database yet" in capsys.readouterr().err and not data.exists()
    url = f"sqlite:///{data / 'echonode.sqlite3'}"
    db.migrate(url, "0001_ingest")
    assert main(["status", "--config", str(cfg)]) == 1
    assert "not migrated yet" in capsys.readouterr().err
    assert db.current_revision(url).startswith("0001"), "status did not migrate"
    db.migrate(url)
    assert main(["status", "--config", str(cfg), "--json"]) == 0
    capsys.readouterr()
    # the database file holds patient data: 0640, its directory 0750
    assert (data / "echonode.sqlite3").stat().st_mode & 0o777 == 0o640
    assert data.stat().st_mode & 0o777 == 0o750


def test_backoff_delay():
    assert ob.backoff_delay(0, 5, 900) == 0
    assert [ob.backoff_delay(n, 5, 900) for n in (1, 2, 3, 4)] == [5, 10, 20, 40]
    assert ob.backoff_delay(20, 5, 900) == 900


def test_commitment_failure_report_sends_again(orthanc, sources, tmp_path):
    """Orthanc reports an instance it does not hold as failed: the row goes back to
    pending with the failure reason (N-ACTION sent here for an object never stored)."""
    from pynetdicom import AE

    settings = _settings(tmp_path, orthanc.dicom_port, commitment=True, listener_port=orthanc.commitment_port)
    engine, sf = _store(settings)
    interp = make_interpretation(sources, promptcams=False)
    with sf() as s:
        publish_results(settings, s, interp, sources)
        (row,) = [r for r in ob.claim_due(s) if r.kind == "sr"]
        tx = pydicom.uid.generate_uid()
        ob.mark_committing(s, [row.id], tx)
    req = pydicom.Dataset()
    req.TransactionUID = tx
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = row.sop_class_uid
    item.ReferencedSOPInstanceUID = row.sop_instance_uid
    req.ReferencedSOPSequence = [item]
    with scu.CommitmentListener(settings, sf):
        ae = AE(ae_title="ECHONODE")
        ae.add_requested_context(scu.STORAGE_COMMITMENT_PUSH)
        assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title="ORTHANC")
        assert assoc.is_established
        status, _ = assoc.send_n_action(req, 1, scu.STORAGE_COMMITMENT_PUSH, scu.STORAGE_COMMITMENT_INSTANCE)
        assoc.release()
        assert status.Status == 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _row(sf, "sr")["state"] == "committing":
            time.sleep(0.1)
    r = _row(sf, "sr")
    assert r["state"] == "pending"
    assert r["last_error"].startswith("storage commitment failed (reason 0x")
    engine.dispose()


def test_mutual_tls_delivery(orthanc_tls, sources, tmp_path):
    """Orthanc with DICOM TLS and required client certificates: our certificate gets the
    SR through; without it the handshake fails and the row waits for a retry."""
    pki = orthanc_tls.pki
    interp = make_interpretation(sources, promptcams=False)
    for with_cert in (False, True):
        tls = {"enabled": True, "ca": pki["ca"]}
        if with_cert:
            tls.update(cert=pki["client_cert"], key=pki["client_key"])
        settings = load_settings(env={}, overrides={
            "data_dir": str(tmp_path / f"data{int(with_cert)}"),
            "node": {"ae_title": "ECHONODE", "dimse_timeout_s": 10, "acse_timeout_s": 10, "network_timeout_s": 10},
            "delivery": {"destinations": [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                                           "port": orthanc_tls.dicom_port, "tls": tls}]}})
        engine, sf = _store(settings)
        with sf() as s:
            publish_results(settings, s, interp, sources)
        summary = scu.deliver_pending(settings, sf)
        rows = _rows(sf)
        assert _kinds(sf) == ["page", "sr"]
        if with_cert:
            assert summary.delivered == 2 and {r["state"] for r in rows} == {"delivered"}
        else:
            assert summary.delivered == 0 and all(r["state"] == "pending" and r["attempts"] == 1 for r in rows)
        engine.dispose()
    assert sorted(i["Modality"] for i in orthanc_tls.study_instances(interp.study_instance_uid)) == ["OT", "SR"]


def test_node_scp_receives_commitment_reports(orthanc, sources, tmp_path):
    """In production the node's own SCP (echonode serve) takes Orthanc's N-EVENT-REPORT."""
    from echonode.dicom.scp import EchoSCP
    from echonode.dicom.spool import Spool

    settings = _settings(tmp_path, orthanc.dicom_port, commitment=True, listener_port=orthanc.commitment_port)
    engine, sf = _store(settings)
    scp = EchoSCP(settings, Spool(settings, sf))
    scp.start()
    try:
        interp = make_interpretation(sources, promptcams=False)
        with sf() as s:
            publish_results(settings, s, interp, sources)
        assert scu.deliver_pending(settings, sf).committing == 2   # the SR and the page
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and {r["state"] for r in _rows(sf)} != {"delivered"}:
            time.sleep(0.1)
        assert {r["state"] for r in _rows(sf)} == {"delivered"}
    finally:
        scp.stop()
        engine.dispose()
