"""Chaos: nothing acknowledged is lost, and the PACS holds one current SR per study version.

Production shape on this machine: ``echonode serve`` (no embedded worker), two
``echonode worker`` processes, a Redis server of its own (started here on a free port,
no persistence: a restart loses every queued message), a PostgreSQL database of its own
(created on ``--pg-admin``'s server, dropped afterwards) and a throw-away Orthanc on its
default configuration (``OverwriteInstances = false``). The model is the tiny demo
bundle shipped with echonode (plumbing, not accuracy).

``--studies`` phantom studies (two clips each) arrive from ``--carts`` carts in parallel;
each study's second clip follows its first after a random pause, so some studies change
after they were analysed (a new study version). A cart re-sends what was not acknowledged
(the node was down), as a cart does. Over ``--rounds`` rounds, at random moments: kill -9
of ``serve`` and of one worker (both restarted), a restart of Orthanc and of Redis.

At the end (everything running again, given ``--settle`` seconds to finish):

* every acknowledged instance is in the index, its file on disk with the indexed sha256;
* every study version analysed has exactly one SR in Orthanc (its UID from the
  ``interpretations`` row; a version whose analysis ended after a later version was
  published is superseded and sends none), no SR in Orthanc is unaccounted for, and the
  SR of a later version names the earlier one (Predecessor Documents Sequence);
* every outbox row is delivered (none dead).

Prints one JSON line of counts (``ok`` true when all of the above hold).

Usage::

    python3 bench/chaos.py [--rounds 10] [--studies 20] [--carts 4] [--seed 1] [--work DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PG_ADMIN = os.environ.get("ECHONODE_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")


def emit(**kw) -> None:
    print(json.dumps(kw, sort_keys=True), flush=True)


class Proc:
    """A restartable subprocess with its log."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict):
        self.name, self.argv, self.log, self.env = name, argv, log, env
        self.p = None

    def start(self) -> "Proc":
        with open(self.log, "ab") as log:
            self.p = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT))
        return self

    def kill9(self) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
            self.p.wait(10)

    def stop(self) -> None:
        if self.p is not None and self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.kill9()


def make_studies(folder: Path, n: int, seed: int) -> list[tuple[str, list[Path]]]:
    from echonode.dicom.uids import derived_uid
    from echonode.phantom import make_clip, write_dicom

    out = []
    for k in range(n):
        study = derived_uid("chaos", seed, k, "study")
        files = []
        for i in range(2):
            clip = make_clip(seed * 1000 + k * 10 + i, n_frames=16, rows=112, cols=112)
            files.append(write_dicom(folder / f"{k}-{i}.dcm", clip, patient_id=f"CHAOS{k}", patient_name="CHAOS^CART",
                                     birth_date="19600101", sex="O", study_uid=study,
                                     series_uid=derived_uid(study, "series", i), sop_uid=derived_uid(study, "sop", i),
                                     study_date="20240101", series_number=i + 1))
        out.append((study, files))
    return out


def cart(port: int, todo: list[tuple[str, list[Path]]], acked: dict, lock: threading.Lock, rng: random.Random,
         stop: threading.Event, tries: dict) -> None:
    """Send each study's clips, the second after a random pause; re-send until Success."""
    from echonode.sandbox import send

    for _study, files in todo:
        for j, f in enumerate(files):
            if j:
                time.sleep(rng.uniform(0.5, 8.0))
            while not stop.is_set():
                with lock:
                    tries["sent"] += 1
                try:
                    status = send(port, [f])[0]
                except Exception:
                    status = -1
                if status == 0:
                    import pydicom
                    uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                    with lock:
                        acked[uid] = str(f)
                    break
                with lock:
                    tries["refused"] += 1
                time.sleep(1.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--studies", type=int, default=20)
    ap.add_argument("--carts", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--round-s", type=float, default=12.0, help="mean seconds between two rounds of faults")
    ap.add_argument("--settle", type=float, default=300.0, help="seconds allowed to converge at the end")
    ap.add_argument("--pg-admin", default=PG_ADMIN)
    ap.add_argument("--work", default="")
    args = ap.parse_args()

    from echonode.sandbox import find_orthanc, fresh_database

    rng = random.Random(args.seed)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="echonode-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    exe, redis_exe = find_orthanc(), shutil.which("redis-server")
    if not exe or not redis_exe:
        emit(bench="chaos", error="Orthanc and redis-server are needed")
        return 1
    try:
        with fresh_database(args.pg_admin, "chaos") as db_url:
            return run(args, rng, work, exe, db_url)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def run(args, rng: random.Random, work: Path, exe: str, db_url: str) -> int:
    from echonode.pipeline.modelsel import DEMO_MODEL_DIR
    from echonode.sandbox import LocalOrthanc, LocalRedis, clean_env, echo, free_port, write_toml

    env = clean_env()
    node_port = free_port()
    redis = LocalRedis(work / "redis")
    orthanc = LocalOrthanc(exe, work / "orthanc", "ECHONODE", node_port)
    cfg = {"data_dir": str(work / "node"), "database_url": db_url, "log_level": "INFO",
           "node": {"host": "127.0.0.1", "port": node_port, "min_free_mb": 64},
           "stable": {"delay_s": 2.0, "poll_s": 0.3},
           "model": {"clip_model": str(DEMO_MODEL_DIR), "allow_demo_model": True,
                     "r_model": str(work / "no-r-model"), "promptcam_tasks": [], "device": "cpu"},
           "metrics": {"enabled": False},
           "queue": {"embedded_worker": False, "broker_url": redis.url,
                     "lease_s": 8.0, "heartbeat_s": 1.0, "max_attempts": 20, "visibility_timeout_s": 60},
           "delivery": {"backoff_initial_s": 0.5, "backoff_max_s": 3.0, "destinations": [
               {"name": "orthanc", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}]}}
    cfg_path = work / "chaos.toml"
    write_toml(cfg_path, cfg)
    py = sys.executable
    serve = Proc("serve", [py, "-m", "echonode", "serve", "--config", str(cfg_path)], work / "serve.log", env)
    workers = [Proc(f"worker{i}", [py, "-m", "echonode", "worker", "--config", str(cfg_path), "--device", "cpu",
                                   "--queues", "analyze,deliver"], work / f"worker{i}.log", env) for i in range(2)]
    faults = {"serve_kill9": 0, "worker_kill9": 0, "orthanc_restart": 0, "redis_restart": 0}
    tries = {"sent": 0, "refused": 0}
    acked: dict[str, str] = {}
    lock = threading.Lock()
    stop = threading.Event()
    t0 = time.monotonic()
    try:
        orthanc.wait()
        serve.start()
        while not echo(node_port):
            time.sleep(0.3)
        for w in workers:
            w.start()
        studies = make_studies(work / "studies", args.studies, args.seed)
        shares = [studies[i::args.carts] for i in range(args.carts)]
        carts = [threading.Thread(target=cart, args=(node_port, share, acked, lock, random.Random(rng.random()),
                                                     stop, tries), daemon=True) for share in shares]
        for t in carts:
            t.start()

        for _ in range(args.rounds):
            actions = ["serve", "worker", "orthanc", "redis"]
            rng.shuffle(actions)
            for a in actions:
                time.sleep(rng.uniform(0.2, 2 * args.round_s / len(actions)))
                if a == "serve":
                    serve.kill9()
                    faults["serve_kill9"] += 1
                    time.sleep(rng.uniform(0.5, 3.0))
                    serve.start()
                elif a == "worker":
                    w = rng.choice(workers)
                    w.kill9()
                    faults["worker_kill9"] += 1
                    time.sleep(rng.uniform(0.5, 3.0))
                    w.start()
                elif a == "orthanc":
                    orthanc.stop()
                    faults["orthanc_restart"] += 1
                    time.sleep(rng.uniform(0.5, 5.0))
                    orthanc.start()
                else:
                    redis.stop()
                    faults["redis_restart"] += 1
                    time.sleep(rng.uniform(0.5, 3.0))
                    redis.start()
        chaos_s = time.monotonic() - t0
        for t in carts:
            t.join(timeout=args.settle)
        orthanc.wait()
        result = converge(db_url, orthanc, acked, work, args.settle)
        emit(bench="chaos", rounds=args.rounds, studies=args.studies, carts=args.carts, faults=faults,
             cart_attempts=tries["sent"], cart_retries=tries["refused"], chaos_s=round(chaos_s, 1),
             total_s=round(time.monotonic() - t0, 1), **result)
        return 0 if result["ok"] else 2
    finally:
        stop.set()
        for p in [*workers, serve]:
            p.stop()
        orthanc.stop()
        redis.stop()


def converge(db_url: str, orthanc, acked: dict, work: Path, settle: float) -> dict:
    """Wait until every job and outbox row is final, then compare SQL, disk and Orthanc."""
    from echonode.store import db
    from echonode.store.interpretations import InterpretationRow
    from echonode.store.models import AnalysisJob, Instance
    from echonode.store.outbox import OutboxRow

    Session = db.session_factory(db.get_engine(db_url))
    deadline = time.monotonic() + settle
    while True:
        with Session() as s:
            jobs = s.query(AnalysisJob).all()
            rows = s.query(OutboxRow).all()
            busy = [j for j in jobs if j.state not in ("done", "failed")]
            pending = [r for r in rows if r.state not in ("delivered", "dead")]
            studies = {i.study_pk for i in s.query(Instance)}
            all_jobs = {j.study_pk for j in jobs}
        if not busy and not pending and studies <= all_jobs and len(acked) and time.monotonic() > 0:
            break
        if time.monotonic() > deadline:
            break
        time.sleep(1.0)
    with Session() as s:
        inst = {i.sop_instance_uid: (i.path, i.sha256) for i in s.query(Instance)}
        jobs = [(j.study_instance_uid, j.study_version, j.state) for j in s.query(AnalysisJob)]
        interps = [(r.study_instance_uid, r.study_version, r.sr_sop_instance_uid)
                   for r in s.query(InterpretationRow)]
        outbox = [r.state for r in s.query(OutboxRow)]
    data = work / "node"
    indexed = matching = 0
    for uid in acked:
        if uid in inst:
            indexed += 1
            path, sha = inst[uid]
            p = Path(path) if Path(path).is_absolute() else data / path
            if p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest() == sha:
                matching += 1
    srs = orthanc.find_sr()
    in_pacs: dict[str, int] = {}
    for sr in srs:
        in_pacs[sr["sop_instance_uid"]] = in_pacs.get(sr["sop_instance_uid"], 0) + 1
    expected = {uid: (study, v) for study, v, uid in interps if uid}
    # a version whose job finished after a later version was published is superseded: no SR
    superseded = {(st, v) for st, v, uid in interps if not uid}
    done_versions = {(st, v) for st, v, state in jobs if state == "done"} - superseded
    one_each = sum(1 for (st, v) in done_versions
                   if sum(in_pacs.get(u, 0) for u, sv in expected.items() if sv == (st, v)) == 1)
    stray = [u for u in in_pacs if u not in expected]
    by_sv = {sv: u for u, sv in expected.items()}
    linked = later = 0
    for sr in srs:
        st, v = expected.get(sr["sop_instance_uid"], ("", 0))
        earlier = [by_sv[(st, k)] for k in range(v - 1, 0, -1) if (st, k) in by_sv]
        if v > 1 and earlier:
            later += 1
            linked += bool(sr["predecessors"]) and sr["predecessors"][0] in earlier
    ok = (indexed == matching == len(acked) and one_each == len(done_versions) and not stray and linked == later
          and all(s == "delivered" for s in outbox) and all(st == "done" for _, _, st in jobs))
    return {"ok": ok, "acknowledged": len(acked), "indexed": indexed, "sha256_match": matching,
            "study_versions_published": len(done_versions), "study_versions_superseded": len(superseded),
            "jobs": len(jobs),
            "jobs_failed": sum(1 for *_, st in jobs if st == "failed"),
            "study_versions_with_one_sr": one_each, "srs_in_pacs": len(srs), "stray_srs": len(stray),
            "later_versions": later, "later_versions_naming_predecessor": linked,
            "outbox_rows": len(outbox), "outbox_delivered": sum(1 for s in outbox if s == "delivered"),
            "outbox_dead": sum(1 for s in outbox if s == "dead")}


if __name__ == "__main__":
    sys.exit(main())
