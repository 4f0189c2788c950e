"""End-to-end pipeline latency and throughput: cart → echonode → worker → SR in Orthanc.

A real ``echonode serve`` (SQLite, embedded broker, its own worker on ``--device``; or
``--broker redis://…`` with the same embedded worker) receives phantom A4C studies by
C-STORE and delivers SR + overlays to a local Orthanc. The model is an echo-clip-size
model (open_clip convnext_base layout, random weights; built once into ``--work``).

JSON lines printed:

* ``warmup``: first study after start (model already loaded by the worker at start-up;
  includes computing and caching the prompt embeddings);
* ``latency``: for one study with one clip, seconds from the last C-STORE response to
  the SR being in Orthanc, **minus the configured stable delay** (median of ``--repeat``);
  ``ref_interpret_s`` is the bare ``Interpreter.interpret`` (built by ``echonode.analysis``) of the same clip in this
  process, same device (the reference), and ``ratio_vs_interpret = latency / ref``;
  ``worker_interpret_s`` is the Interpreter's own time inside the worker for that study and
  ``pipeline_overhead_s`` = latency − that (decode, SR/overlays, SQL, queue, delivery);
  ``target_s`` = 20 (CPU);
* ``throughput``: ``--n`` studies sent at once; studies/s and clips/s from the last
  C-STORE to the last SR in Orthanc, with per-stage means from the stored Interpretations.

Usage::

    python3 bench/pipeline.py [--device cpu|cuda] [--n 20] [--repeat 3] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


def emit(**kw) -> None:
    print(json.dumps(kw, sort_keys=True), flush=True)


def build_bundle(work: Path, name: str, tokenizer: str, arch: str = ""):
    """A random-weight bundle (seed 0) of ``arch`` (default: the echo-clip or echo-clip-r size
    that ``tokenizer`` goes with), built once into ``work/name``."""
    from echonode.model.bundle import Bundle, write_bundle

    path = work / name
    if (path / "echonode.json").is_file():
        return Bundle.open(path)
    import torch
    from echonode.model.clip import build_model

    torch.manual_seed(0)
    arch = arch or ("echo-clip" if tokenizer == "clip-bpe" else "echo-clip-r")
    return write_bundle(path, build_model(arch).state_dict(), name=name, architecture=arch,
                        tokenizer_kind=tokenizer, source="bench (random weights)", overwrite=True)


def make_study(folder: Path, i: int, n_frames: int, rows: int, cols: int, patient: str = "") -> tuple[str, Path]:
    from echonode.dicom.uids import derived_uid
    from echonode.phantom import make_clip, write_dicom

    def uid(*p):
        return derived_uid("bench", *p)
    pid = patient or f"BENCH{i:05d}"
    study = uid(i, "study")
    clip = make_clip(500 + i, n_frames=n_frames, rows=rows, cols=cols)
    path = write_dicom(folder / f"s{i}.dcm", clip, patient_id=pid, patient_name="BENCH^PHANTOM", birth_date="19600101",
                       sex="O", study_uid=study, series_uid=uid(i, "series"), sop_uid=uid(i, "sop"),
                       study_date=f"2024{(i % 12) + 1:02d}01")
    return study, path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=20, help="studies queued at once for throughput")
    ap.add_argument("--repeat", type=int, default=3, help="latency repetitions (median)")
    ap.add_argument("--frames", type=int, default=60, help="frames per clip (analysis samples 0,2,…,38)")
    ap.add_argument("--rows", type=int, default=480)
    ap.add_argument("--cols", type=int, default=640)
    ap.add_argument("--stable-delay", type=float, default=2.0)
    ap.add_argument("--with-r", action="store_true", help="also run an echo-clip-r-size model (study embedding)")
    ap.add_argument("--broker", default="", help="Celery broker URL (default: the embedded SQLite broker)")
    ap.add_argument("--work", default="", help="work folder (bundles are cached there)")
    ap.add_argument("--timeout", type=float, default=1800.0)
    args = ap.parse_args()

    from echonode.sandbox import LocalOrthanc, echo, find_orthanc, free_port, send, write_toml

    work = Path(args.work or tempfile.mkdtemp(prefix="echonode-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    clip_b = build_bundle(work / "models", "echo-clip", "clip-bpe")
    r_b = build_bundle(work / "models", "echo-clip-r", "template") if args.with_r else None
    emit(bench="pipeline", stage="bundles", seconds=round(time.perf_counter() - t0, 2),
         weights_sha256=clip_b.weights_sha256[:12])

    run = work / f"run-{int(time.time())}"
    exe = find_orthanc()
    if not exe:
        emit(bench="pipeline", error="Orthanc not installed")
        return 1
    node_port = free_port()
    orthanc = LocalOrthanc(exe, run / "orthanc", "ECHONODE", node_port)
    procs = []
    try:
        if not orthanc.wait():
            emit(bench="pipeline", error="Orthanc did not start")
            return 1
        model = {"clip_model": str(clip_b.path), "device": args.device,
                 "r_model": str(r_b.path) if r_b else str(work / "no-r-model")}
        cfg = {"data_dir": str(run / "node"), "log_level": "INFO",
               "node": {"host": "127.0.0.1", "port": node_port, "min_free_mb": 64},
               "stable": {"delay_s": args.stable_delay, "poll_s": 0.25},
               "model": model, "metrics": {"enabled": False},
               "queue": {"embedded_worker": True, "broker_url": args.broker},
               "delivery": {"backoff_initial_s": 1.0, "destinations": [
                   {"name": "orthanc", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}]}}
        cfg_path = run / "bench.toml"
        write_toml(cfg_path, cfg)
        saved = work / "prompt-cache"          # prompt embeddings of earlier runs (same weights)
        if saved.is_dir():
            shutil.copytree(saved, run / "node" / "cache" / "prompts", dirs_exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ECHONODE_")}
        log = open(run / "node.log", "ab")
        node = subprocess.Popen([sys.executable, "-m", "echonode", "serve", "--config", str(cfg_path)], env=env,
                                stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT))
        procs.append(node)
        while not echo(node_port):
            if node.poll() is not None:
                emit(bench="pipeline", error=f"node exited, see {run / 'node.log'}")
                return 1
            time.sleep(0.3)

        folder = run / "studies"

        def wait_srs(uids, deadline):
            pending = set(uids)
            done_at = {}
            while pending and time.monotonic() < deadline:
                for u in list(pending):
                    try:
                        objs = orthanc.study_objects(u)
                    except OSError:
                        objs = []
                    if any(o["sop_class_uid"].startswith(SR_PREFIX) for o in objs):
                        done_at[u] = time.perf_counter()
                        pending.discard(u)
                time.sleep(0.1)
            return done_at, pending

        deadline = time.monotonic() + args.timeout
        # warm-up (the worker loads the model at start; prompt embeddings are computed here)
        u, f = make_study(folder, 0, args.frames, args.rows, args.cols)
        send(node_port, [f])
        t_sent = time.perf_counter()
        done, pending = wait_srs([u], deadline)
        if pending:
            emit(bench="pipeline", error="warm-up timed out", log=str(run / "node.log"))
            return 1
        emit(bench="pipeline", stage="warmup", seconds=round(done[u] - t_sent, 2), device=args.device,
             prompt_cache_reused=saved.is_dir())
        if (run / "node" / "cache" / "prompts").is_dir():
            shutil.copytree(run / "node" / "cache" / "prompts", saved, dirs_exist_ok=True)

        from echonode.config import load_settings
        from echonode.store import db
        from echonode.store import interpretations, status
        Session = db.session_factory(db.get_engine(load_settings(cfg_path, env={}).db_url))

        def worker_interpret_s(uid):
            with Session() as s:
                d = interpretations.latest_interpretation(s, uid) or {}
            return float((d.get("timings") or {}).get("total", float("nan")))

        # latency, one study (one A4C clip) at a time
        lat, in_worker = [], []
        for k in range(args.repeat):
            u, f = make_study(folder, 1 + k, args.frames, args.rows, args.cols)
            send(node_port, [f])
            t_last = time.perf_counter()
            done, pending = wait_srs([u], deadline)
            if pending:
                emit(bench="pipeline", error="latency run timed out")
                return 1
            lat.append(done[u] - t_last - args.stable_delay)
            in_worker.append(worker_interpret_s(u))

        # reference in this run: the bare Interpreter (as the worker builds it) on the same clip
        from echonode import analysis
        node_settings = load_settings(cfg_path, env={})
        interp = analysis.make_interpreter(node_settings, clip_b, r_b, device=args.device)
        ci, _, _ = analysis.load_clips(node_settings, [analysis.ClipSource(Path(f))])
        interp.interpret(u, ci)   # warm
        ref = []
        for _ in range(args.repeat):
            tt = time.perf_counter()
            interp.interpret(u, ci)
            ref.append(time.perf_counter() - tt)
        del interp
        med, ref_med = statistics.median(lat), statistics.median(ref)
        overhead = statistics.median(a - b for a, b in zip(lat, in_worker))
        emit(bench="pipeline", stage="latency", device=args.device, latency_s=round(med, 2),
             runs=[round(x, 2) for x in lat], ref_interpret_s=round(ref_med, 2),
             ratio_vs_interpret=round(med / ref_med, 2),
             worker_interpret_s=[round(x, 2) for x in in_worker], pipeline_overhead_s=round(overhead, 2),
             load_avg_1min=round(os.getloadavg()[0], 2), stable_delay_s=args.stable_delay,
             frames=args.frames, size=f"{args.rows}x{args.cols}", target_s=20.0, ok=med <= 20.0)

        if args.n < 1:
            return 0
        # throughput: n studies queued at once
        studies = [make_study(folder, 100 + i, args.frames, args.rows, args.cols) for i in range(args.n)]
        send(node_port, [p for _, p in studies])
        t_last = time.perf_counter()
        done, pending = wait_srs([s for s, _ in studies], deadline)
        if pending:
            emit(bench="pipeline", error=f"throughput run: {len(pending)} studies not done in time")
            return 1
        span = max(done.values()) - t_last
        stages: dict[str, list[float]] = {}
        with Session() as s:
            for uid, _ in studies:
                d = interpretations.latest_interpretation(s, uid) or {}
                for k, v in (d.get("timings") or {}).items():
                    stages.setdefault(k, []).append(float(v))
            durations = status.job_durations(s, limit=args.n)
        emit(bench="pipeline", stage="throughput", device=args.device, studies=args.n, seconds=round(span, 2),
             studies_per_s=round(args.n / span, 3), clips_per_s=round(args.n / span, 3),
             job_mean_s=round(statistics.mean(durations), 2) if durations else None,
             stage_means_s={k: round(statistics.mean(v), 3) for k, v in sorted(stages.items())})
        return 0
    finally:
        from echonode.pipeline.service import terminate
        for p in procs:
            terminate(p, 60)
        orthanc.stop()


if __name__ == "__main__":
    sys.exit(main())
