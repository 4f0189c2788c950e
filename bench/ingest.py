#!/usr/bin/env python3
"""Ingest throughput: echonode (durable) vs DCMTK storescp, same files, same run.

200 generated ultrasound multi-frame clips of about 2 MB (native Explicit VR Little
Endian) are sent by DCMTK ``storescu``, over ONE association and then over 4 parallel
associations (4 storescu processes, a quarter of the files each), to

* DCMTK ``storescp`` (reference; started with ``TCP_NODELAY=1``; ``--fork`` for the
  parallel case; writes files, no fsync), and
* ``echonode serve`` (each dataset streams to its temp file as PDUs arrive; then fsync →
  link into place → fsync dir → SQL COMMIT of the index row, then of the audit row, before
  Success: two COMMITs per instance on one association, shared with the rows of parallel
  associations written at the same moment; SQLite by default, or ``--database-url``, where
  each PostgreSQL run gets a new database on that server, dropped afterwards).

Runs alternate (``--rounds``, default 2) and the best round of each is compared. A third,
diagnostic receiver (``pynetdicom-null``, one association only: the same pynetdicom
set-up with a handler that stores nothing) shows how much of the gap is network/DIMSE
and how much is durability. Prints JSON lines: one per round and a summary with MB/s and
the ratio for both modes (target: echonode ≥ 0.5 × storescp on one association).

    python3 bench/ingest.py [--files 200] [--mb 2] [--rounds 2] [--parallel 4] [--database-url URL]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from echonode.sandbox import dcmtk, free_port, fresh_database  # noqa: E402


def make_clips(out: Path, n: int, mb: float) -> list[Path]:
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rows, cols = 256, 256
    frames = max(2, int(round(mb * 1024 * 1024 / (rows * cols))))
    rng = np.random.default_rng(7)
    base = rng.integers(0, 255, (frames, rows, cols), dtype=np.uint8)
    study = generate_uid()
    files = []
    for i in range(n):
        ds = Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
        ds.Modality, ds.PatientID, ds.InstanceNumber = "US", "BENCH", i + 1
        ds.NumberOfFrames, ds.Rows, ds.Columns, ds.FrameTime = frames, rows, cols, 20.0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = np.roll(base, i, axis=2).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        p = out / f"{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        files.append(p)
    return files


def wait_echo(port: int, aet: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"receiver exited early ({proc.returncode})")
        if subprocess.run([dcmtk("echoscu"), "-aec", aet, "127.0.0.1", str(port)],
                          capture_output=True).returncode == 0:
            return
        time.sleep(0.2)
    raise SystemExit("receiver did not answer C-ECHO")


def send(port: int, aet: str, files: list[Path], env: dict, parallel: int = 1) -> float:
    """Wall time for ``parallel`` storescu processes (one association each) to send ``files``."""
    chunks = [files[i::parallel] for i in range(parallel)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen([dcmtk("storescu"), "-R", "-xe", "-aec", aet, "127.0.0.1", str(port), *map(str, c)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
             for c in chunks if c]
    errs = [(p.wait(), p.stderr.read()) for p in procs]
    dt = time.perf_counter() - t0
    for rc, err in errs:
        if rc != 0:
            raise SystemExit(f"storescu failed ({rc}): {err[-2000:]}")
    return dt


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_storescp(files, work: Path, env, parallel: int = 1) -> float:
    out = work / "storescp-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen([dcmtk("storescp"), *(["--fork"] if parallel > 1 else []), "-aet", "STORESCP",
                             "-od", str(out), str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_echo(port, "STORESCP", proc)
        dt = send(port, "STORESCP", files, env, parallel)
    finally:
        stop(proc)
    assert len(list(out.iterdir())) == len(files), "storescp did not store every file"
    return dt


def run_echonode(files, work: Path, env, database_url: str, parallel: int = 1) -> float:
    if database_url.startswith("postgresql"):
        # a new database per run: every run indexes new instances, not second versions of
        # the last run's, and nothing already in the given database is touched
        with fresh_database(database_url, "ingest") as url:
            return _run_echonode(files, work, env, url, parallel)
    return _run_echonode(files, work, env, database_url, parallel)


def _run_echonode(files, work: Path, env, database_url: str, parallel: int = 1) -> float:
    data = work / "echonode-data"
    shutil.rmtree(data, ignore_errors=True)
    port = free_port()
    cfg = work / "echonode.toml"
    lines = [f'data_dir = "{data}"', 'log_level = "INFO"']
    if database_url:
        lines.append(f'database_url = "{database_url}"')
    lines += ["[node]", f"port = {port}", 'host = "127.0.0.1"', "min_free_mb = 1",
              "[stable]", "delay_s = 3600.0", "[queue]", "embedded_worker = false", "[metrics]", "enabled = false"]
    cfg.write_text("\n".join(lines) + "\n")
    penv = {k: v for k, v in env.items() if not k.startswith("ECHONODE_")}
    penv["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "echonode", "serve", "--config", str(cfg)], env=penv, cwd=str(ROOT),
                            stdout=subprocess.DEVNULL, stderr=open(work / "echonode.log", "ab"))
    try:
        wait_echo(port, "ECHONODE", proc)
        dt = send(port, "ECHONODE", files, env, parallel)
    finally:
        stop(proc)
    stored = list((data / "instances").rglob("*.dcm"))
    assert len(stored) == len(files), f"echonode stored {len(stored)} of {len(files)}"
    return dt


NULL_SCP = """
import sys
import echonode.dicom.scp as scp  # same pynetdicom tuning as the node (recv_into)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
ae = AE("NULLSCP")
ae.maximum_pdu_size = int(sys.argv[2])
for uid in scp.STORAGE_SOP_CLASSES:
    ae.add_supported_context(uid, list(scp.TRANSFER_SYNTAXES))
ae.add_supported_context(Verification)
ae.start_server(("127.0.0.1", int(sys.argv[1])), block=True, evt_handlers=[(evt.EVT_C_STORE, lambda e: 0)])
"""


def run_null(files, work: Path, env) -> float:
    """Diagnostic ceiling: pynetdicom with a handler that stores nothing (network + DIMSE only)."""
    from echonode.config import NodeSettings

    port = free_port()
    penv = dict(env, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", NULL_SCP, str(port), str(NodeSettings().max_pdu)], env=penv,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_echo(port, "NULLSCP", proc)
        return send(port, "NULLSCP", files, env)
    finally:
        proc.kill()
        proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--mb", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=4, help="associations in the parallel case (storescp --fork)")
    ap.add_argument("--database-url", default="",
                    help="default: SQLite under the data dir; PostgreSQL: each run in a new database on that server, dropped after")
    ap.add_argument("--workdir", default="", help="default: a temporary directory (removed afterwards)")
    args = ap.parse_args()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="echonode-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TCP_NODELAY="1")
    try:
        clips = work / "clips"
        clips.mkdir(exist_ok=True)
        files = make_clips(clips, args.files, args.mb)
        total = sum(f.stat().st_size for f in files)
        modes = [1] + ([args.parallel] if args.parallel > 1 else [])
        best: dict[tuple[str, int], float] = {}
        for r in range(args.rounds):
            for par in modes:
                runs = [("storescp", lambda: run_storescp(files, work, env, par)),
                        ("echonode", lambda: run_echonode(files, work, env, args.database_url, par))]
                if par == 1:
                    runs.append(("pynetdicom-null", lambda: run_null(files, work, env)))
                for name, fn in runs:
                    dt = fn()
                    best[(name, par)] = min(best.get((name, par), float("inf")), dt)
                    print(json.dumps({"bench": "ingest", "round": r, "receiver": name, "associations": par,
                                      "files": len(files), "bytes": total, "seconds": round(dt, 3),
                                      "mb_per_s": round(total / dt / 1e6, 2)}), flush=True)
        summary = {"bench": "ingest", "summary": True, "files": len(files),
                   "mb_per_file": round(total / len(files) / 1e6, 2), "target_ratio_one_association": 0.5,
                   "database": "postgresql" if args.database_url.startswith("postgresql") else "sqlite",
                   "echonode_durable": "streamed temp file, fsync file + dir, SQL commit (grouped across "
                                       "associations) before Success",
                   "storescp_durable": "no fsync", "cpus": os.cpu_count()}
        for par in modes:
            ref, ours = total / best[("storescp", par)] / 1e6, total / best[("echonode", par)] / 1e6
            key = f"{par}_assoc"
            summary[f"storescp_mb_per_s_{key}"] = round(ref, 2)
            summary[f"echonode_mb_per_s_{key}"] = round(ours, 2)
            summary[f"ratio_{key}"] = round(ours / ref, 3)
        summary["pynetdicom_null_mb_per_s_1_assoc"] = round(total / best[("pynetdicom-null", 1)] / 1e6, 2)
        print(json.dumps(summary), flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
