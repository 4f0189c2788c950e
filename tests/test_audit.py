"""Audit trail (issue 16): PS3.15 A.5 messages, append-only SQL, syslog to a real rsyslog.

* every builder's message validates against the A.5.1.1 schema (lxml RELAX NG), and the
  validator refuses a broken message;
* the SQL trail refuses UPDATE (trigger) on SQLite and PostgreSQL; retention deletes and is
  itself audited;
* a real rsyslog over TCP is stopped while events happen and started again: every message
  arrives exactly once and the outage itself is audited; UDP and mutual TLS deliver too, and
  a TLS repository that refuses our certificate keeps the messages waiting;
* end to end: DCMTK storescu -> echonode serve -> Orthanc with phantom patients of known
  names, IDs and birth dates, the repository down in the middle: the audited association,
  store and delivery events match what happened, an unknown calling AE is audited with the
  reason, every message reached rsyslog once and validates, and no log line of any process
  carries those identifiers;
* DICOM TLS on the SCP: the peer certificate subject is audited, a rogue certificate and
  plain TCP are audited as failed node authentication with the TLS reason;
* delivery to Orthanc with storage commitment, a dead letter, and `outbox retry`.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace as NS

import pydicom
import pytest
from sqlalchemy import text

from echonode import audit
from echonode.audit.schema import errors as schema_errors
from echonode.config import load_settings
from tests.fixtures.interp import publish_results
from tests.fixtures.node import ROOT, send_raw, storescu_ts_flag
from tests.fixtures.orthanc import make_test_pki
from tests.fixtures.pipeline import wait_for
from tests.fixtures.rsyslog import Rsyslog

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


def _settings(tmp_path, **over):
    base = {"data_dir": str(tmp_path / "data"), "node": {"ae_title": "ECHONODE"}}
    for k, v in over.items():
        base[k] = v
    return load_settings(env={}, overrides=base)


def _store(settings):
    from echonode.store import db
    settings.data_path.mkdir(parents=True, exist_ok=True)
    db.migrate(settings.db_url)
    engine = db.make_engine(settings.db_url)
    return engine, db.session_factory(engine)


def _all_events():
    """One event of every kind the node records."""
    pat = audit.PatientRef("PID-1", "HOSP", "DOE^JANE")
    stored = NS(status=0, reason="stored", sop_instance_uid="1.2.3.4", study_instance_uid="1.2.3", path=None,
                quarantine=None, replaced=False, duplicate=False)
    refused = NS(status=0xA900, reason="SOP Instance UID differs", sop_instance_uid="", study_instance_uid="",
                 path=None, quarantine=Path("/q/x.dcm"), replaced=False, duplicate=False)
    row = NS(sop_instance_uid="1.2.3.9", sop_class_uid=SR_CLASS, study_instance_uid="1.2.3", destination="pacs",
             path=None)
    return [
        audit.application_start(), audit.application_stop(), audit.configuration_loaded(load_settings(env={})),
        audit.association("CART", "ECHONODE", "127.0.0.1", 40000, accepted=True, tls_subject="CN=cart"),
        audit.association("EVIL", "ECHONODE", "10.0.0.9", 40001, accepted=False, reason="not in node.allowed"),
        audit.association_closed("CART", "ECHONODE", "127.0.0.1:40000", stored=2, failures=1, statuses={0xA900: 1}),
        audit.node_authentication_failed("10.0.0.9", "certificate verify failed"),
        audit.instance_received(stored, calling_ae="CART", peer="127.0.0.1:40000", called_ae="ECHONODE",
                                sop_class_uid="1.2.840.10008.5.1.4.1.1.3.1"),
        audit.instance_received(refused, calling_ae="CART", peer="127.0.0.1:40000"),
        audit.study_analysed("1.2.3", [("1.2.840.10008.5.1.4.1.1.3.1", "1.2.3.4")], model="echo-clip",
                             weights_sha256="a" * 64, patient=pat),
        audit.result_created("1.2.3", [(SR_CLASS, "1.2.3.9")], model="echo-clip", patient=pat),
        audit.result_sent(row, NS(ae_title="ORTHANC", host="127.0.0.1"), state="delivered", status=0,
                          commitment="committed"),
        audit.result_sent(row, None, state="dead", status=0xA700, error="C-STORE failed"),
        audit.export("training-manifest", "/tmp/m.csv", [("1.2.3", pat), ("1.2.4", None)], count=3),
        audit.model_installed("echo-clip", "/models/echo-clip", "b" * 64, source="w.bin"),
        audit.outbox_admin("retry", count=1, ids=[4], states=["dead"]),
        audit.outbox_admin("purge", count=2, states=["delivered"]),
        audit.audit_log_used("R", count=5, query="list --study 1.2.3"),
        audit.audit_log_used("D", count=5, query="retention"),
        audit.repository_failing("tcp://127.0.0.1:1", "ConnectionRefusedError"),
        audit.repository_restored("tcp://127.0.0.1:1", 3),
    ]


# --------------------------------------------------------------------------- messages and schema

def test_every_event_validates_and_the_validator_refuses_broken_messages():
    events = _all_events()
    codes = set()
    for ev in events:
        xml = audit.to_xml(ev.message)
        assert schema_errors(xml) == [], (ev.name, schema_errors(xml))
        assert "\n" not in xml
        codes.add(ev.message.event_id.code)
    assert codes == {"110100", "110101", "110103", "110104", "110106", "110113", "110114"}
    # the schema is really applied: no EventID, or an outcome outside 0/4/8/12, is refused
    good = audit.to_xml(events[0].message)
    assert schema_errors(good.replace('EventOutcomeIndicator="0"', 'EventOutcomeIndicator="3"'))
    no_id = good.split("<EventID ")[0] + good.split("/>", 1)[1]
    assert schema_errors(no_id)
    # the patient is named in the message (by design), never in the PHI-free summary
    ev = events[9]
    assert "PID-1^^^HOSP" in audit.to_xml(ev.message) and "DOE^JANE" in audit.to_xml(ev.message)
    assert "PID-1" not in json.dumps(ev.summary) and "DOE" not in json.dumps(ev.summary)
    assert ev.patient_key and ev.patient_key not in ("PID-1",)


def test_bad_audit_url_is_a_configuration_error(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ECHONODE_DATA_DIR": str(tmp_path), "ECHONODE_AUDIT__URL": "http://x"}
    p = subprocess.run([sys.executable, "-m", "echonode", "audit", "list"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 3 and "audit.url" in p.stderr


# --------------------------------------------------------------------------- SQL trail

@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_trail_is_append_only_and_retention_is_audited(tmp_path, backend, request):
    over = {"database_url": request.getfixturevalue("pg_url")} if backend == "postgres" else {}
    settings = _settings(tmp_path, **over)
    engine, sf = _store(settings)
    from echonode.store import audit as store
    ids = [audit.record(sf, ev) for ev in _all_events()[:4]]
    assert all(isinstance(i, int) for i in ids)
    with pytest.raises(Exception):
        with sf() as s:
            s.execute(text("UPDATE audit_events SET event = 'x' WHERE id = :i"), {"i": ids[0]})
            s.commit()
    with sf() as s:
        assert s.get(store.AuditEventRow, ids[0]).event == "application-start"
        old = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) + dt.timedelta(seconds=1)
        # nothing was sent yet: retention keeps unsent events unless told otherwise
        assert store.retention(s, old) == 0
        store.mark_sent(s, ids[:2])
        assert store.retention(s, old) == 2
        assert store.retention(s, old, include_unsent=True) == 2
    # the command is audited (and never reuses an id: the ids are the syslog sequenceId)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ECHONODE_DATA_DIR": str(settings.data_path)}
    if over:
        env["ECHONODE_DATABASE_URL"] = over["database_url"]
    p = subprocess.run([sys.executable, "-m", "echonode", "audit", "retention", "--older-than", "0", "--json"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    with sf() as s:
        rows = store.query(s)
    assert [r.event for r in rows] == ["audit-retention"] and rows[0].id > max(ids)
    assert rows[0].action == "D"
    if backend == "sqlite":
        assert stat.S_IMODE(os.stat(settings.data_path / "echonode.sqlite3").st_mode) == 0o640
    engine.dispose()


# --------------------------------------------------------------------------- syslog to rsyslog

def _sender(settings, sf, engine):
    from echonode.audit.sender import AuditSender
    return AuditSender(settings, sf, engine)


def _db_messages(sf):
    from echonode.store import audit as store
    with sf() as s:
        return {r.id: r for r in store.query(s, limit=100000)}


def test_repository_down_then_back_every_message_arrives_once(tmp_path):
    rs = Rsyslog(tmp_path / "rsyslog", "tcp").start()
    settings = _settings(tmp_path, audit={"url": rs.url, "poll_s": 0.1, "retry_initial_s": 0.2, "retry_max_s": 0.5})
    engine, sf = _store(settings)
    sender = audit.start_sender(settings, sf, engine)
    try:
        for ev in _all_events()[:5]:
            audit.record(sf, ev)
        wait_for(lambda: len(rs.records()) >= 5, 30, "first messages at rsyslog")
        rs.stop()
        for ev in _all_events()[5:15]:
            audit.record(sf, ev)
        wait_for(lambda: any(r.event == "audit-repository-failing" for r in _db_messages(sf).values()), 30,
                 "the outage recorded as an audit event")
        time.sleep(1.0)  # several retries against the stopped repository
        assert len(rs.records()) == 5
        rs.start()
        wait_for(lambda: any(r.event == "audit-repository-restored" for r in _db_messages(sf).values())
                 and len(rs.records()) >= len(_db_messages(sf)), 60, "all messages after the restart")
    finally:
        audit.stop(sf, sender)
        rs.stop()
    db_rows = _db_messages(sf)
    got = rs.records()
    counts = collections.Counter(r.seq for r in got)
    assert set(counts) == set(db_rows), "every recorded event reached the repository"
    assert max(counts.values()) == 1, f"duplicates: {[k for k, v in counts.items() if v > 1]}"
    for r in got:
        assert r.msg == db_rows[r.seq].message
        assert schema_errors(r.msg) == []
    assert sum(1 for r in db_rows.values() if r.event == "audit-repository-failing") == 1, "one event per outage"
    engine.dispose()


@pytest.mark.parametrize("proto", ["udp", "tls"])
def test_udp_and_mutual_tls_transports(tmp_path, proto):
    pki = make_test_pki(tmp_path / "pki") if proto == "tls" else None
    rs = Rsyslog(tmp_path / "rsyslog", proto, pki=pki).start()
    tls = {"ca": pki["ca"], "cert": pki["client_cert"], "key": pki["client_key"]} if pki else {}
    settings = _settings(tmp_path, audit={"url": rs.url, **tls})
    engine, sf = _store(settings)
    try:
        for ev in _all_events():
            audit.record(sf, ev)
        n = audit.flush(settings, sf, engine)
        assert n == len(_all_events())
        wait_for(lambda: len(rs.records()) >= n, 20, f"{proto} messages at rsyslog")
        if proto == "tls":
            # a client without a certificate is refused: its messages wait, the failure is audited
            bare = _settings(tmp_path, audit={"url": rs.url, "ca": pki["ca"]})
            audit.record(sf, audit.application_stop())
            assert audit.flush(bare, sf, engine) == 0
            with sf() as s:
                from echonode.store import audit as store
                assert store.pending_count(s) == 2   # the stop and the repository-failing alert
    finally:
        rs.stop()
    got = rs.records()
    assert sorted(r.seq for r in got) == sorted(_db_messages(sf))[:n]
    assert all(schema_errors(r.msg) == [] for r in got)
    engine.dispose()


# --------------------------------------------------------------------------- end to end

PATIENTS = (  # (name, ID, birth date): values that appear nowhere else
    ("QUIMBYX^ZELDAROSE", "PHIQ7X39", "19370429"),
    ("VANTERPOOLX^OSGOODINE", "PHIK8W25", "19520917"),
)


def _phantom(folder: Path, i: int) -> tuple[str, Path]:
    from echonode.phantom import make_clip, write_dicom
    from tests.fixtures.pipeline import uid

    name, pid, birth = PATIENTS[i]
    study = uid("audit", i, "study")
    f = write_dicom(folder / f"audit-{i}.dcm", make_clip(100 + i, n_frames=24, rows=160, cols=160),
                    patient_id=pid, patient_name=name, birth_date=birth, sex="O", study_uid=study,
                    series_uid=uid("audit", i, "series"), sop_uid=uid("audit", i, "sop"), study_date="20240301",
                    accession=f"ACC{i}")
    return study, f


def _phi_values() -> list[str]:
    out = []
    for name, pid, birth in PATIENTS:
        out += [name, *name.split("^"), pid, birth, f"{birth[:4]}-{birth[4:6]}-{birth[6:]}"]
    return out


def test_node_end_to_end_counts_rejection_outage_and_no_phi_in_logs(node_factory, orthanc, tiny_bundle,
                                                                     tiny_bundle_r, tmp_path):
    rs = Rsyslog(tmp_path / "rsyslog", "tcp").start()
    cfg = {
        "log_level": "DEBUG",  # the most verbose logs are scanned for patient data
        "node": {"allow_any_calling_ae": False, "allowed": [{"ae_title": "CART"}, {"ae_title": "ECHOSCU"}]},
        "stable": {"delay_s": 1.0, "poll_s": 0.3},
        "queue": {"embedded_worker": True, "lease_s": 30.0, "heartbeat_s": 2.0},
        "model": {"clip_model": str(tiny_bundle.path), "r_model": str(tiny_bundle_r.path),
                  "promptcam_tasks": ["pacemaker"]},
        "delivery": {"destinations": [{"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1",
                                       "port": orthanc.dicom_port}],
                     "backoff_initial_s": 1.0, "backoff_max_s": 5.0},
        "audit": {"url": rs.url, "poll_s": 0.2, "retry_initial_s": 0.3, "retry_max_s": 1.0},
    }
    node = node_factory(cfg).start()   # one C-ECHO association from ECHOSCU
    settings = node.settings
    from echonode.store import db
    from echonode.store import outbox as ob
    sf = db.session_factory(db.get_engine(settings.db_url))
    studies = [_phantom(tmp_path / "phantoms", i) for i in range(2)]
    client_logs = []

    def delivered(study):
        return (lambda inst: inst if any(i["SOPClassUID"] == SR_CLASS for i in inst) else None)(
            orthanc.study_instances(study) if orthanc.lookup(study, "Study") else [])

    def events():
        return list(_db_messages(sf).values())

    try:
        res = node.storescu([studies[0][1]], storescu_ts_flag(studies[0][1]), calling_ae="CART", check=True)
        client_logs += [res.stdout, res.stderr]
        wait_for(lambda: delivered(studies[0][0]), 240, f"results of study 1 in Orthanc\n{node.log_text()[-3000:]}")
        wait_for(lambda: len(rs.records()) >= len(events()) - 2, 30, "audit messages of study 1 at rsyslog")

        rs.stop()   # the audit repository goes down; the node keeps working and keeps the messages
        rej = subprocess.run(["/usr/bin/echoscu", "-aet", "INTRUDER", "-aec", "ECHONODE", "127.0.0.1",
                              str(node.port)], capture_output=True, text=True, timeout=30)
        client_logs += [rej.stdout, rej.stderr]
        assert rej.returncode != 0, "an unknown calling AE is rejected"
        res = node.storescu([studies[1][1]], storescu_ts_flag(studies[1][1]), calling_ae="CART", check=True)
        client_logs += [res.stdout, res.stderr]
        # a dataset whose SOP Instance UID differs from the request: refused and quarantined
        bad = tmp_path / "mismatch.dcm"
        ds = pydicom.dcmread(studies[1][1])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID + ".9"
        ds.save_as(bad)
        assert send_raw(node.port, [bad], calling_ae="CART") == [0xA900]
        wait_for(lambda: delivered(studies[1][0]), 240, f"results of study 2 in Orthanc\n{node.log_text()[-3000:]}")
        wait_for(lambda: any(e.event == "audit-repository-failing" for e in events()), 30, "the outage audited")
        rs.start()
        wait_for(lambda: any(e.event == "audit-repository-restored" for e in events()), 60, "the repository back")
    finally:
        assert node.stop() == 0
    # serve's last flush sent the stop event too
    wait_for(lambda: len(rs.records()) >= len(events()), 30, "every audit message at rsyslog")
    rs.stop()

    rows = events()
    got = rs.records()
    counts = collections.Counter(r.seq for r in got)
    assert set(counts) == {r.id for r in rows} and max(counts.values()) == 1, "each message exactly once"
    by_id = {r.id: r for r in rows}
    for r in got:
        assert r.msg == by_id[r.seq].message and schema_errors(r.msg) == [], r.seq
    n = collections.Counter(r.event for r in rows)

    # what the test did: 1 C-ECHO (fixture start), 2 storescu and 1 raw C-STORE associations
    # accepted, 1 rejected
    assert n["association-accepted"] == 4 and n["association-closed"] == 4
    assert n["association-rejected"] == 1
    acc = [json.loads(r.summary) for r in rows if r.event == "association-accepted"]
    assert sorted(a["calling_ae"] for a in acc) == ["CART", "CART", "CART", "ECHOSCU"]
    assert {a["called_ae"] for a in acc} == {"ECHONODE"} and all(a["peer"].startswith("127.0.0.1:") for a in acc)
    rejected = next(r for r in rows if r.event == "association-rejected")
    assert json.loads(rejected.summary)["calling_ae"] == "INTRUDER"
    assert "not in node.allowed" in json.loads(rejected.summary)["reason"]
    assert "INTRUDER" in rejected.message and "not in node.allowed" in rejected.message
    closed = [json.loads(r.summary) for r in rows if r.event == "association-closed"]
    assert sorted((c["stored"], c["failures"]) for c in closed) == [(0, 0), (0, 1), (1, 0), (1, 0)]
    assert [c["statuses"] for c in closed if c["failures"]] == ["0xA900x1"]
    # two instances stored, each audited with its study, series, SOP UIDs and patient key;
    # the mismatching one audited as quarantined with its status
    stored = [r for r in rows if r.event == "instance-stored"]
    assert len(stored) == 2 and not n["instance-refused"] and n["instance-quarantined"] == 1
    quarantined = next(r for r in rows if r.event == "instance-quarantined")
    assert json.loads(quarantined.summary)["status"] == "0xA900" and 'EventOutcomeIndicator="4"' in quarantined.message
    assert {r.study_instance_uid for r in stored} == {s for s, _ in studies}
    assert all(json.loads(r.summary)["series_instance_uid"] and r.patient_key for r in stored)
    assert n["study-analysed"] == 2 and n["result-created"] == 2
    # every delivered result object (what Orthanc holds) has one delivery event, none dead
    in_orthanc = sum(len(orthanc.study_instances(s)) for s, _ in studies)
    with sf() as s:
        outbox_delivered = ob.counts(s)["delivered"]
    assert n["result-delivered"] == in_orthanc == outbox_delivered and not n["result-dead-lettered"]
    assert n["application-start"] == 1 and n["application-stop"] == 1 and n["configuration-loaded"] == 1
    assert n["audit-repository-failing"] == 1 and n["audit-repository-restored"] == 1
    # the audit messages name the patients (by design of PS3.15) ...
    pid_msgs = [r for r in rows if PATIENTS[0][1] in r.message]
    assert {r.event for r in pid_msgs} >= {"instance-stored", "study-analysed", "result-created", "result-delivered"}

    # ... and the export of them is restricted
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "audit-export.xml"
    cli = [sys.executable, "-m", "echonode"]
    exp = subprocess.run([*cli, "audit", "export", "--config", str(node.settings_path), "--out", str(out),
                          "--study", studies[0][0]], env=env, capture_output=True, text=True, timeout=60)
    assert exp.returncode == 0, exp.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o640 and PATIENTS[0][1] in out.read_text()
    lst = subprocess.run([*cli, "audit", "list", "--config", str(node.settings_path), "--patient-key",
                          stored[0].patient_key, "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert lst.returncode == 0, lst.stderr
    listed = [json.loads(line) for line in lst.stdout.splitlines()]
    assert listed and all(d["patient_key"] == stored[0].patient_key for d in listed)
    client_logs += [exp.stdout, exp.stderr, lst.stdout, lst.stderr]

    # no log line of any process carries the patients' names, IDs or birth dates
    logs = {"echonode serve + worker": node.log_text(), "rsyslogd": rs.log_path.read_text(errors="replace"),
            "orthanc": orthanc.log_tail(100000), "clients (storescu, echoscu, echonode audit)": "\n".join(client_logs)}
    for who, textlog in logs.items():
        for value in _phi_values():
            assert value not in textlog, f"{value!r} in the log of {who}"
    assert "DEBUG" in logs["echonode serve + worker"] and "association" in logs["echonode serve + worker"]


def test_tls_peers_audited_with_subject_and_refused_certificates_with_reason(node_factory, tmp_path):
    """Mutual DICOM TLS on the SCP: a trusted cart's association names its certificate
    subject; a certificate from another CA, and plain TCP, are audited as failed node
    authentication with the TLS reason."""
    pki = make_test_pki(tmp_path / "pki")
    d = Path(pki["ca"]).parent
    run = lambda *a: subprocess.run(["openssl", *a], cwd=d, check=True, capture_output=True, timeout=60)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue-ca.key", "-out", "rogue-ca.pem",
        "-days", "2", "-subj", "/CN=rogue CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "rogue.key", "-out", "rogue.csr", "-subj", "/CN=rogue")
    run("x509", "-req", "-in", "rogue.csr", "-CA", "rogue-ca.pem", "-CAkey", "rogue-ca.key", "-CAcreateserial",
        "-out", "rogue.pem", "-days", "2", "-extfile", "ext.cnf")
    node = node_factory({"node": {"tls": {"enabled": True, "cert": pki["server_cert"], "key": pki["server_key"],
                                          "ca": pki["ca"], "require_client_cert": True}}})
    trusted = ["+tls", pki["client_key"], pki["client_cert"], "+cf", pki["ca"]]
    node.start(echo_extra=trusted)
    assert node.echo(extra=["+tls", str(d / "rogue.key"), str(d / "rogue.pem"), "+cf", pki["ca"]]) != 0
    assert node.echo() != 0   # plain TCP to the TLS port
    settings = node.settings
    from echonode.store import db
    sf = db.session_factory(db.get_engine(settings.db_url))
    rows = wait_for(lambda: (lambda r: r if len([e for e in r if e.event == "node-authentication-failed"]) >= 2
                             else None)(list(_db_messages(sf).values())), 20, "two failed TLS handshakes audited")
    node.stop()
    accepted = [json.loads(r.summary) for r in rows if r.event == "association-accepted"]
    assert accepted and all(a["tls_subject"] == "commonName=echonode test client" for a in accepted)
    failed = [r for r in rows if r.event == "node-authentication-failed"]
    reasons = [json.loads(r.summary)["reason"] for r in failed]
    assert all(r.startswith("TLS handshake failed: ") and len(r) > len("TLS handshake failed: ") for r in reasons)
    assert any("CERTIFICATE" in r.upper() for r in reasons), reasons
    assert all(schema_errors(r.message) == [] and "110126" in r.message for r in failed)


def test_delivery_commitment_dead_letter_and_outbox_admin_audited(orthanc, realworld_dir, tmp_path):
    """Results to a real Orthanc with storage commitment: one delivery event per object with
    the commitment outcome and the destination; Orthanc down with one attempt allowed: one
    dead-letter event per object; `outbox retry` is audited with its row count."""
    from echonode.cli import main
    from echonode.dicom import scu
    from echonode.store import audit as store
    from tests.fixtures.interp import make_interpretation, make_sources

    sources = make_sources(realworld_dir)
    settings = _settings(tmp_path, node={"ae_title": "ECHONODE", "host": "127.0.0.1",
                                         "port": orthanc.commitment_port},
                         delivery={"destinations": [{"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1",
                                                     "port": orthanc.dicom_port, "storage_commitment": True}],
                                   "max_attempts": 1, "backoff_initial_s": 0.0})
    audit.configure(settings)
    engine, sf = _store(settings)
    interp = make_interpretation(sources)
    with sf() as s:
        paths = publish_results(settings, s, interp, sources)
    with scu.CommitmentListener(settings, sf):
        scu.deliver_pending(settings, sf)
        wait_for(lambda: len([r for r in _db_messages(sf).values() if r.event == "result-delivered"]) == len(paths),
                 30, "a delivery event per committed object")
    delivered = [r for r in _db_messages(sf).values() if r.event == "result-delivered"]
    assert {json.loads(r.summary)["commitment"] for r in delivered} == {"committed"}
    assert all(f'UserID="{orthanc.aet}"' in r.message and 'csd-code="110152"' in r.message for r in delivered)
    assert all(schema_errors(r.message) == [] for r in delivered)
    assert {json.loads(r.summary)["sop_instance_uid"] for r in delivered} == {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}

    with sf() as s:   # the same results again (a re-run), now with Orthanc down
        publish_results(settings, s, interp, sources)
    orthanc.stop()
    scu.deliver_pending(settings, sf)
    dead = [r for r in _db_messages(sf).values() if r.event == "result-dead-lettered"]
    assert len(dead) == len(paths) and all('EventOutcomeIndicator="8"' in r.message for r in dead)
    assert all(orthanc.aet in json.loads(r.summary)["error"] for r in dead)

    cfg = tmp_path / "echonode.toml"
    cfg.write_text(f'data_dir = "{settings.data_dir}"\n[node]\nae_title = "ECHONODE"\n')
    assert main(["outbox", "retry", "--config", str(cfg), "--json"]) == 0
    with sf() as s:
        (retry,) = store.query(s, events=["outbox-retry"])
    assert json.loads(retry.summary)["rows"] == len(paths) and retry.event_id == "110113"
    assert 'csd-code="110132"' in retry.message
    engine.dispose()
    audit.configure(load_settings(env={}))   # leave the process-wide reporter as it was


def test_model_import_and_training_export_audited(tiny_bundle, tmp_path, monkeypatch, capsys):
    """`models import` (then again with --force) and the manifest export of `train --from-db`
    are audit events naming the weights and the exported studies."""
    from echonode.cli import main
    from echonode.store import audit as store
    from tests.fixtures.pipeline import ingest, phantom_study

    monkeypatch.delenv("ECHONODE_CONFIG", raising=False)
    monkeypatch.setenv("ECHONODE_DATA_DIR", str(tmp_path / "data"))
    argv = ["models", "import", "--name", "mine", "--architecture", "tiny", "--weights", str(tiny_bundle.weights_path)]
    assert main(argv) == 0 and main([*argv, "--force"]) == 0
    settings = _settings(tmp_path)
    engine, sf = _store(settings)
    # a study with the PACS report (a text SR) in the index, as train --from-db needs
    from pydicom.dataset import FileMetaDataset
    from tests.test_train_fromdb import text_sr
    study, files = phantom_study(tmp_path / "ph", patient_id="EXP1", study_date="20240102", seed=5)
    sr = text_sr(pydicom.dcmread(files[0], stop_before_pixels=True), ["NORMAL LEFT VENTRICULAR SIZE."])
    sr.file_meta = FileMetaDataset()
    sr.file_meta.MediaStorageSOPClassUID, sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPClassUID, sr.SOPInstanceUID
    sr.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    sr.save_as(tmp_path / "ph" / "report.dcm", enforce_file_format=True)
    ingest(settings, [*files, tmp_path / "ph" / "report.dcm"])
    from train.fromdb import export_manifest
    exp = export_manifest(settings, tmp_path / "m.csv")
    rc = main(["train", "--from-db", "--out", str(tmp_path / "train"), "--architecture", "tiny", "--epochs", "1",
               "--batch-size", "2", "--max-minutes", "0.05", "--demo"])
    capsys.readouterr()
    with sf() as s:
        models = store.query(s, events=["model-installed", "model-changed"])
        exports = store.query(s, events=["export"])
    assert [m.event for m in models] == ["model-installed", "model-changed"]
    assert all(tiny_bundle.weights_sha256 == json.loads(m.summary)["sha256"] for m in models)
    assert all(schema_errors(m.message) == [] and 'csd-code="110131"' in m.message for m in models)
    assert len(exports) == 1, f"train --from-db rc={rc}"
    e = exports[0]
    assert e.event_id == "110106" and json.loads(e.summary)["count"] == len(exp.rows)
    assert exp.rows and {r["study_uid"] for r in exp.rows} == {study} and study in e.message
    assert json.loads(e.summary)["studies"] == 1
    assert schema_errors(e.message) == []
    engine.dispose()
