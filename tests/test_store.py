"""The durable spool and the SQL index, on SQLite and PostgreSQL (no network)."""

from __future__ import annotations

import hashlib
import re
import threading

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from echonode.dicom.spool import (CANNOT_UNDERSTAND, DATASET_MISMATCH, OUT_OF_RESOURCES, SUCCESS, Spool,
                                  file_meta_bytes)
from echonode.dicom.uids import UIDError, check_uid, is_valid_uid
from echonode.store import db
from echonode.store.models import Instance, InstanceHistory, Patient, Series, Study
from tests.fixtures.ingest import encode, store, us_dataset

pytestmark = pytest.mark.timeout(120)

INGEST_TABLES = {"patients", "studies", "series", "instances", "instance_history", "analysis_jobs"}


def rows(spool, model):
    with spool.sessions() as s:
        return list(s.scalars(select(model)))


def _diff_table(d):
    d = d[0] if isinstance(d, list) else d
    kind = d[0]
    if kind in ("add_column", "remove_column"):
        return d[2]
    if kind in ("add_index", "remove_index", "add_constraint", "remove_constraint"):
        return d[1].table.name
    if kind in ("add_table", "remove_table"):
        return d[1].name
    if kind.startswith("modify_"):
        return d[2]
    return None


def test_migration_matches_models(db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    db.migrate(db_url)  # idempotent
    engine = db.make_engine(db_url)
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), db.Base.metadata)
        assert MigrationContext.configure(conn).get_current_revision() is not None

    mine = [d for d in diffs if _diff_table(d) in INGEST_TABLES]
    assert mine == []
    # the check can fail: drop an index and add a column, and it sees both
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP INDEX ix_studies_state")
        conn.exec_driver_sql("ALTER TABLE instances ADD COLUMN junk INTEGER")
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), db.Base.metadata)
    engine.dispose()
    assert {d[0] for d in diffs if _diff_table(d) in INGEST_TABLES} == {"add_index", "remove_column"}


def test_uid_validation():
    assert is_valid_uid("1.2.840.10008.5.1.4.1.1.3.1")
    assert is_valid_uid("0.1.2")
    assert not is_valid_uid("1.02.3")                      # leading zero: not conformant
    assert is_valid_uid("1.02.3", strict=False)            # … but path-safe
    for bad in ("", "1..2", "../1.2", "1.2/3", "1.2 ", "1.2.a", "1." + "1" * 64, ".1", "1.", "1.2\x00"):
        assert not is_valid_uid(bad, strict=False), bad
        with pytest.raises(UIDError):
            check_uid(bad, "Study Instance UID", strict=False)


def test_store_index_duplicate_replace(spool):
    ds = us_dataset(frames=8, seed=1, SeriesDescription="A4C")
    data = encode(ds)
    r1 = store(spool, ds, data, calling_ae="CART1")
    assert r1.status == SUCCESS and not r1.duplicate
    path = spool.root / "instances" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    assert r1.path == path and path.is_file()
    blob = path.read_bytes()
    meta = file_meta_bytes(ds.SOPClassUID, ds.SOPInstanceUID, "1.2.840.10008.1.2.1")
    assert blob == meta + data                              # the bytes as received, after our file meta
    [inst] = rows(spool, Instance)
    assert inst.sha256 == hashlib.sha256(blob).hexdigest() and inst.size == len(blob)
    assert (inst.rows, inst.columns, inst.number_of_frames, inst.frame_time_ms) == (16, 16, 8, 20.0)
    assert inst.calling_ae == "CART1" and inst.transfer_syntax_uid == "1.2.840.10008.1.2.1"
    assert inst.decision == "analyse" and "SeriesDescription" in inst.reason
    [pat] = rows(spool, Patient)
    assert (pat.patient_id, pat.issuer, pat.birth_date, pat.sex) == ("PID-1", "", "19500101", "F")
    [study] = rows(spool, Study)
    assert (study.study_date, study.accession_number, study.state, study.version) == ("20240102", "ACC1", "receiving", 1)
    assert rows(spool, Series)[0].modality == "US"

    # identical bytes again: success, no second copy, no history
    r2 = store(spool, ds, data)
    assert r2.status == SUCCESS and r2.duplicate
    assert rows(spool, InstanceHistory) == []
    assert len(list(spool.storage.rglob("*.dcm"))) == 1

    # different bytes, same SOP Instance UID: the newer one is current (node.on_conflict =
    # "replace"), the first keeps its file untouched, the history names both
    ds.SeriesDescription = "A4C repeat"
    data2 = encode(ds)
    r3 = store(spool, ds, data2, calling_ae="CART2")
    assert r3.status == SUCCESS and r3.replaced
    assert path.read_bytes() == blob
    new_sha = hashlib.sha256(meta + data2).hexdigest()
    assert r3.path == path.with_name(f"{ds.SOPInstanceUID}.{new_sha[:16]}.dcm")
    assert r3.path.read_bytes() == meta + data2
    [inst] = rows(spool, Instance)
    assert inst.replaced_count == 1 and inst.sha256 == new_sha
    assert spool.root / inst.path == r3.path
    [h] = rows(spool, InstanceHistory)
    assert h.old_sha256 == hashlib.sha256(blob).hexdigest() and h.new_sha256 == inst.sha256
    assert (h.old_calling_ae, h.calling_ae) == ("CART1", "CART2")
    assert (spool.root / h.old_path, spool.root / h.new_path, h.current) == (path, r3.path, "new")
    assert len(list(spool.storage.rglob("*.dcm"))) == 2


def test_hostile_uid_never_becomes_a_path(spool, tmp_path):
    ds = us_dataset()
    ds.StudyInstanceUID = "../../../../escape"
    r = store(spool, ds)
    assert r.status == DATASET_MISMATCH and "Study Instance UID" in r.reason
    assert not list(tmp_path.rglob("escape*"))
    assert rows(spool, Instance) == []
    assert r.quarantine is not None and r.quarantine.parent == spool.quarantine_dir
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{12}\.dcm", r.quarantine.name)
    assert "Study Instance UID" in r.quarantine.with_suffix(".txt").read_text()
    assert not list(spool.incoming.iterdir())

    # the command's SOP Instance UID itself is checked before anything is written
    r = spool.store(sop_class_uid="1.2.840.10008.5.1.4.1.1.3.1", sop_instance_uid="1.2/../../x",
                    transfer_syntax_uid="1.2.840.10008.1.2.1", data=encode(us_dataset()))
    assert r.status == DATASET_MISMATCH


def test_mismatch_and_garbage_are_refused(spool):
    ds = us_dataset()
    other = generate_uid()
    r = spool.store(sop_class_uid=ds.SOPClassUID, sop_instance_uid=other,
                    transfer_syntax_uid="1.2.840.10008.1.2.1", data=encode(ds))
    assert r.status == DATASET_MISMATCH and "differs" in r.reason
    r = spool.store(sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID,
                    transfer_syntax_uid="1.2.840.10008.1.2.1", data=b"\x08\x00\x18\x00UI\xff\xff" + b"\x00" * 7)
    assert r.status in (CANNOT_UNDERSTAND, DATASET_MISMATCH)
    assert rows(spool, Instance) == []
    assert len(list(spool.quarantine_dir.glob("*.dcm"))) == 2


def test_out_of_range_integers_do_not_refuse_the_instance(spool):
    """IS values beyond 32 bits (e.g. InstanceNumber 3000000000 from a cart) used to make
    PostgreSQL's INTEGER columns fail the whole C-STORE (0xC211): index them as unknown."""
    ds = us_dataset(InstanceNumber="3000000000", SeriesNumber="-2147483649")
    r = store(spool, ds)
    assert r.status == SUCCESS, r.reason
    [inst] = rows(spool, Instance)
    assert inst.instance_number is None and rows(spool, Series)[0].series_number is None
    ds2 = us_dataset(InstanceNumber="2147483647")
    assert store(spool, ds2).status == SUCCESS
    assert {i.instance_number for i in rows(spool, Instance)} == {None, 2147483647}


def test_sql_errors_do_not_carry_parameters(db_url):
    """SQLAlchemy exception messages (which reach the logs) must not echo patient data."""
    from sqlalchemy import text

    engine = db.make_engine(db_url)
    try:
        with pytest.raises(Exception) as exc, engine.begin() as conn:
            conn.execute(text("SELECT no_such_function(:pid)"), {"pid": "DOE-JOHN-19500101"})
        assert "DOE-JOHN-19500101" not in db.describe_error(exc.value)
        if db.is_sqlite(db_url):  # PostgreSQL quotes the statement with its values itself
            assert "DOE-JOHN-19500101" not in str(exc.value)
    finally:
        engine.dispose()


def test_free_space_floor(ingest_settings):
    s = ingest_settings.replace(node=ingest_settings.node.__class__(min_free_mb=10**12))
    engine = db.make_engine(s.db_url)
    try:
        sp = Spool(s, db.session_factory(engine))
        r = store(sp, us_dataset())
        assert r.status == OUT_OF_RESOURCES
        assert not list(sp.storage.rglob("*.dcm"))
    finally:
        engine.dispose()


def test_concurrent_stores_one_study(spool):
    """8 threads store 40 instances of one new study at once: one patient, study and series."""
    study, series = generate_uid(), generate_uid()
    dss = [us_dataset(study=study, series=series, seed=i) for i in range(40)]
    results = [None] * len(dss)
    barrier = threading.Barrier(8)

    def worker(k):
        barrier.wait()
        for i in range(k, len(dss), 8):
            results[i] = store(spool, dss[i]).status

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [SUCCESS] * len(dss)
    assert len(rows(spool, Instance)) == 40
    assert len(rows(spool, Study)) == 1 and len(rows(spool, Series)) == 1 and len(rows(spool, Patient)) == 1


def test_crash_leftovers_are_cleaned(ingest_settings):
    """A partial temp file from a crash (never acknowledged) is removed at start-up."""
    engine = db.make_engine(ingest_settings.db_url)
    try:
        sp = Spool(ingest_settings, db.session_factory(engine))
        (sp.incoming / "deadbeef.part").write_bytes(b"partial")
        Spool(ingest_settings, db.session_factory(engine))
        assert not (sp.incoming / "deadbeef.part").exists()
    finally:
        engine.dispose()


def test_status_cli(spool, ingest_settings, tmp_path):
    """``echonode status --json`` over a store with one clip; config errors exit 3."""
    import json
    import os
    import subprocess
    import sys

    from tests.fixtures.node import ROOT, write_config

    ds = us_dataset(frames=6)
    assert store(spool, ds).ok
    cfg = write_config(tmp_path / "s.toml", {"data_dir": str(ingest_settings.data_path),
                                             "database_url": ingest_settings.db_url})
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECHONODE_")}
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run([sys.executable, "-m", "echonode", "status", "--json", "--config", str(cfg)],
                         capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert (out["patients"], out["series"], out["instances"], out["study_count"]) == (1, 1, 1, 1)
    assert out["counts"] == {"patients": 1, "studies": 1, "series": 1, "instances": 1}
    [st] = out["studies"]
    assert (st["study_instance_uid"], st["instances"], st["clips_to_analyse"], st["state"]) == \
        (ds.StudyInstanceUID, 1, 1, "receiving")
    assert out["jobs"]["queued"] == 0
    res = subprocess.run([sys.executable, "-m", "echonode", "status", "--config", str(cfg)],
                         capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=120)
    assert res.returncode == 0 and ds.StudyInstanceUID in res.stdout
    res = subprocess.run([sys.executable, "-m", "echonode", "status", "--config", str(tmp_path / "missing.toml")],
                         capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=120)
    assert res.returncode == 3 and "not found" in res.stderr


def _record(study: str, series: str, **changes):
    from echonode.store.index import InstanceRecord

    rec = InstanceRecord(sop_instance_uid=generate_uid(), study_instance_uid=study, series_instance_uid=series,
                         sop_class_uid="1.2.840.10008.5.1.4.1.1.3.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
                         path="", size=100, sha256="ab" * 32, calling_ae="TEST", decision="skip", reason="test",
                         attrs={"patient_id": "GROUP", "modality": "US"})
    for k, v in changes.items():
        setattr(rec, k, v)
    return rec


def test_group_commit_one_bad_record_fails_only_itself(db_url):
    """Records queued at once are committed together; in a group with a record the database
    refuses, one whose file step fails and one whose directory fsync fails, those three get
    their own errors and every other record is committed, each after its own wait."""
    import errno

    from echonode.store.group import group_commit
    from echonode.store.index import record_instance

    engine = db.make_engine(db_url)
    sessions = db.session_factory(engine)
    group = group_commit(sessions)
    study, series = generate_uid(), generate_uid()
    gate, leading = threading.Event(), threading.Event()
    places: dict[str, int] = {}
    waited: set[str] = set()
    places_lock = threading.Lock()

    def place_file_for(rec, how: str = ""):
        def wait():
            if how == "wait":
                raise OSError(errno.EIO, "injected fsync failure")
            waited.add(rec.sop_instance_uid)

        def place_file(versioned, reuse):
            with places_lock:
                places[rec.sop_instance_uid] = places.get(rec.sop_instance_uid, 0) + 1
            if how == "hold":  # the first caller leads alone and holds the line until the others queue
                leading.set()
                assert gate.wait(60)
            if how == "place":
                raise OSError(errno.ENOSPC, "injected: no space")
            return f"instances/{study}/{series}/{rec.sop_instance_uid}.dcm", wait
        return place_file

    def run(rec, how=""):
        try:
            outcomes[rec.sop_instance_uid] = record_instance(sessions, rec, place_file_for(rec, how))
        except Exception as exc:  # noqa: BLE001 - the test looks at which error each record got
            outcomes[rec.sop_instance_uid] = exc

    try:
        outcomes: dict = {}
        first = _record(study, series)
        good = [_record(study, series) for _ in range(4)]
        bad_sql = _record(study, series, sop_class_uid=None)  # NOT NULL: refused by the database
        bad_place, bad_wait = _record(study, series), _record(study, series)
        holder = threading.Thread(target=run, args=(first, "hold"))
        holder.start()
        assert leading.wait(60)
        threads = [threading.Thread(target=run, args=(r, how)) for r, how in
                   [(good[0], ""), (bad_sql, ""), (good[1], ""), (bad_place, "place"), (good[2], ""),
                    (bad_wait, "wait"), (good[3], "")]]
        for t in threads:
            t.start()
        while group.waiting() < 1 + len(threads):  # all queued behind the holder
            assert all(t.is_alive() for t in threads)
            threading.Event().wait(0.01)
        gate.set()
        for t in [holder, *threads]:
            t.join(120)
        assert group.largest >= len(threads)  # the seven were one group

        from sqlalchemy.exc import IntegrityError
        assert isinstance(outcomes[bad_sql.sop_instance_uid], IntegrityError)
        assert isinstance(outcomes[bad_place.sop_instance_uid], OSError)
        assert outcomes[bad_place.sop_instance_uid].errno == errno.ENOSPC
        assert isinstance(outcomes[bad_wait.sop_instance_uid], OSError)
        assert outcomes[bad_wait.sop_instance_uid].errno == errno.EIO
        # a failed file step is that record's answer: never tried again
        assert places[bad_place.sop_instance_uid] == 1 and places[bad_wait.sop_instance_uid] == 1
        ok = [first, *good]
        for r in ok:
            out = outcomes[r.sop_instance_uid]
            assert not isinstance(out, Exception), out
            assert out.path.endswith(f"{r.sop_instance_uid}.dcm") and not out.duplicate
            assert r.sop_instance_uid in waited
        with sessions() as s:
            stored = set(s.scalars(select(Instance.sop_instance_uid)))
            assert len(s.scalars(select(Series)).all()) == 1
        assert stored == {r.sop_instance_uid for r in ok}

        # a group without a bad record: one COMMIT for all of it
        gate.clear()
        leading.clear()
        again = [_record(study, series) for _ in range(5)]
        holder = threading.Thread(target=run, args=(_record(study, series), "hold"))
        holder.start()
        assert leading.wait(60)
        before = (group.jobs, group.commits)
        threads = [threading.Thread(target=run, args=(r,)) for r in again]
        for t in threads:
            t.start()
        while group.waiting() < 1 + len(threads):
            threading.Event().wait(0.01)
        gate.set()
        for t in [holder, *threads]:
            t.join(120)
        assert all(not isinstance(outcomes[r.sop_instance_uid], Exception) for r in again)
        assert (group.jobs - before[0], group.commits - before[1]) == (1 + len(again), 2)
        with sessions() as s:
            assert {r.sop_instance_uid for r in again} <= set(s.scalars(select(Instance.sop_instance_uid)))
    finally:
        gate.set()
        engine.dispose()


def test_worker_rows_not_seen_for_a_day_are_deleted_by_a_beat(db_url):
    """Worker ids change with every start (host:pid): a beat deletes the rows not seen for a
    day and keeps the others; a worker whose own row is that old writes it again."""
    import datetime as dt

    from echonode.store import workers

    engine = db.make_engine(db_url)
    Session = db.session_factory(engine)
    now = dt.datetime(2026, 1, 2, 12, 0, 0)
    beat = dict(queues="analyze", device="cpu", model_available=True, model="m")

    def seen():
        with Session() as s:
            return {w.worker_id: w.last_seen for w in s.scalars(select(workers.WorkerRow))}

    try:
        for wid, ago in (("worker@a:3", 23), ("worker@a:2", 25), ("worker@a:1", 72)):   # newest first
            with Session.begin() as s:
                workers.beat(s, wid, now=now - dt.timedelta(hours=ago), **beat)
        assert len(seen()) == 3
        with Session.begin() as s:
            workers.beat(s, "worker@a:4", now=now, **beat)
        assert seen() == {"worker@a:3": now - dt.timedelta(hours=23), "worker@a:4": now}
        with Session.begin() as s:   # worker@a:3 beats again two days later
            workers.beat(s, "worker@a:3", now=now + dt.timedelta(days=2), **beat)
        assert seen() == {"worker@a:3": now + dt.timedelta(days=2)}
    finally:
        engine.dispose()
