"""Benchmark: SR/SC build time and delivery throughput against DCMTK storescu.

    python3 bench/results.py [--objects 40] [--reps 3]

In one process, with a real Orthanc (Debian package) on free loopback ports:

1. ``build_sr`` and ``build_overlays`` on the Interpretation of a two-clip phantom study
   (analysed through ``echonode.analysis`` with the shipped demo model; median of ``--reps``);
2. delivery of ``--objects`` Secondary Captures (distinct UIDs) through the outbox
   (``deliver_pending``: claim, one association, C-STORE, SQL bookkeeping) against
   DCMTK ``storescu`` sending a same-sized set of other files to the same Orthanc
   (reference, same run); ratio = echonode / storescu wall time;
3. the same delivery with storage commitment, until every row is ``delivered``.

Prints JSON lines.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _phantom_study(folder: Path):
    """Two phantom A4C clips of one study: (study UID, [ClipSource])."""
    from echonode.analysis import ClipSource
    from echonode.dicom.uids import derived_uid
    from echonode.phantom import make_clip, write_dicom

    study = derived_uid("bench-results", "study")
    clips = []
    for i in range(2):
        path = write_dicom(folder / f"{i}.dcm", make_clip(700 + i, n_frames=40, rows=224, cols=224),
                           patient_id="BENCH-RESULTS", patient_name="BENCH^PHANTOM", birth_date="19600101",
                           sex="O", study_uid=study, series_uid=derived_uid("bench-results", "series", i),
                           sop_uid=derived_uid("bench-results", "sop", i), study_date="20240101")
        clips.append(ClipSource(path))
    return study, clips


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", type=int, default=40)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    import logging
    logging.disable(logging.WARNING)
    from echonode import analysis
    from echonode.config import load_settings
    from echonode.dicom import scu
    from echonode.storage import open_storage
    from echonode.dicom.overlays import build_overlays
    from echonode.dicom.sr import build_sr
    from echonode.dicom.uids import derived_uid
    from echonode.model.bundle import DEMO_BUNDLE_DIR, Bundle
    from echonode.sandbox import LocalOrthanc, find_orthanc, free_port
    from echonode.store import db
    from echonode.store import outbox as ob

    work = Path(tempfile.mkdtemp(prefix="echonode-bench-"))
    settings = load_settings(env={}, overrides={"data_dir": str(work / "analysis"),
                                                 "model": {"promptcam_tasks": ["pacemaker", "tavr"]}})
    study_uid, clips = _phantom_study(work / "phantoms")
    interpreter = analysis.make_interpreter(settings, Bundle.open(DEMO_BUNDLE_DIR))
    result = analysis.analyse(settings, interpreter, study_uid, clips)
    interp, sources = result.interp, result.headers
    t_sr, t_sc = [], []
    for _ in range(args.reps):
        t = time.perf_counter()
        build_sr(interp, sources)
        t_sr.append(time.perf_counter() - t)
        t = time.perf_counter()
        scs = build_overlays(interp, sources)
        t_sc.append((time.perf_counter() - t) / len(scs))
    print(json.dumps({"bench": "build", "build_sr_ms": round(1000 * statistics.median(t_sr), 1),
                      "build_overlay_ms_per_image": round(1000 * statistics.median(t_sc), 1),
                      "groups": len(interp.tasks) + 1, "reps": args.reps}))

    exe = find_orthanc()
    if not exe:
        print(json.dumps({"bench": "delivery", "error": "Orthanc not installed"}))
        return 1
    node_port = free_port()     # where Orthanc sends storage-commitment reports
    server = LocalOrthanc(exe, work / "orthanc", "ECHONODE", node_port)
    if not server.wait():
        print(json.dumps({"bench": "delivery", "error": "Orthanc did not start"}))
        return 1
    try:
        def make_set(label: str) -> list[Path]:
            folder = work / label
            folder.mkdir()
            paths = []
            for i in range(args.objects):
                ds = copy.deepcopy(scs[i % len(scs)])
                ds.SOPInstanceUID = derived_uid("bench-results", label, i)
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                p = folder / f"{i}.dcm"
                ds.save_as(p, enforce_file_format=True)
                paths.append(p)
            return paths

        ref_set, ours, ours_commit = make_set("ref"), make_set("ours"), make_set("commit")
        size = sum(p.stat().st_size for p in ours)

        t = time.perf_counter()
        proc = subprocess.run(["storescu", "-aec", "ORTHANC", "127.0.0.1", str(server.dicom_port),
                               *map(str, ref_set)], capture_output=True, timeout=600)
        t_ref = time.perf_counter() - t
        assert proc.returncode == 0, proc.stderr[-500:]

        results = {}
        for label, paths, commitment in (("c-store", ours, False), ("c-store+commitment", ours_commit, True)):
            settings = load_settings(env={}, overrides={
                "data_dir": str(work / f"data-{label}"),
                "node": {"ae_title": "ECHONODE", "host": "127.0.0.1", "port": node_port},
                "delivery": {"destinations": [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                                               "port": server.dicom_port, "storage_commitment": commitment}]}})
            db.migrate(settings.db_url)
            engine = db.make_engine(settings.db_url)
            sf = db.session_factory(engine)
            with sf() as s:
                scu.enqueue(s, paths, settings.delivery.destinations, store=open_storage(settings))
            listener = scu.CommitmentListener(settings, sf).start() if commitment else None
            t = time.perf_counter()
            summary = scu.deliver_pending(settings, sf)
            while True:
                with sf() as s:
                    if ob.counts(s)["delivered"] == len(paths):
                        break
                if time.perf_counter() - t > 120:
                    raise RuntimeError("delivery did not finish")
                time.sleep(0.02)
            results[label] = time.perf_counter() - t
            if listener:
                listener.stop()
            engine.dispose()
            assert summary.claimed == len(paths)
        for label, secs in results.items():
            print(json.dumps({"bench": "delivery", "mode": label, "objects": args.objects,
                              "mbytes": round(size / 1e6, 2), "seconds": round(secs, 3),
                              "objects_per_s": round(args.objects / secs, 1),
                              "storescu_seconds": round(t_ref, 3),
                              "ratio_vs_storescu": round(secs / t_ref, 2)}))
        print(json.dumps({"bench": "orthanc", "instances": server.count_instances(),
                          "expected": 3 * args.objects}))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
