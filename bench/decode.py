"""Decode speed of echonode.dicom.frames on the real-world JPEG baseline clips.

For every JPEG baseline ultrasound clip under ``--clips`` (default ``tests/data/realworld``, else
``../shared/data/realworld``) prints one JSON
line with:

* ``all_fps`` / ``all_s``: ``load_clip(path)`` decoding every frame;
* ``sel_fps`` / ``sel_s``: ``load_clip(path, indices)`` with the analysis indices
  0, 2, …, 38 (20 frames, fewer on short clips), i.e. what a worker pays per clip;
* ``clip_speedup``: ``all_s / sel_s`` (the win of decoding only the needed frames);
* ``ref_fps``: the reference in the same run, pydicom's default
  ``pydicom.pixels.pixel_array(path)`` (every frame, pydicom's plugin choice and its
  own YBR→RGB), and ``ratio_vs_pydicom = all_fps / ref_fps``;
* ``prep_fps``: decode of the 20 frames plus the model's ``preprocess_frames``
  (when ``echonode.model.preprocess`` is importable; it needs torch).

A last line ``"summary"`` gives totals over the clips. Times are the best of
``--repeat`` runs. Usage::

    OMP_NUM_THREADS=1 python3 bench/decode.py [--clips DIR] [--repeat 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.datadirs import default_data_dir  # noqa: E402

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=Path, default=default_data_dir("realworld"),
                    help="the real-world data folder (with us_*/ subfolders)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best is reported")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for preprocessing (0 = leave)")
    ap.add_argument("--no-preprocess", action="store_true", help="skip decode+preprocess even if available")
    args = ap.parse_args(argv)

    import pydicom
    from pydicom.pixels import pixel_array

    from echonode.dicom.frames import count_frames, load_clip

    preprocess = None
    if not args.no_preprocess:
        try:
            from echonode.model.preprocess import preprocess_frames as preprocess

            if args.threads:
                import torch

                torch.set_num_threads(args.threads)
        except Exception as exc:  # torch missing or the model side not there yet
            print(json.dumps({"note": f"preprocess not measured: {exc}"}), flush=True)
            preprocess = None

    realworld = args.clips
    files = []
    for p in sorted(realworld.glob("us_*/*.dcm")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        if str(ds.file_meta.TransferSyntaxUID) == JPEG_BASELINE and count_frames(p) > 1:
            files.append(p)
    if not files:
        print(json.dumps({"error": f"no JPEG baseline clips under {realworld}"}), flush=True)
        return 1

    tot = {"all_frames": 0, "all_s": 0.0, "sel_frames": 0, "sel_s": 0.0, "ref_s": 0.0, "prep_s": 0.0}
    for p in files:
        n = count_frames(p)
        idx = list(range(0, min(n, 40), 2))

        def ref():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pixel_array(p)

        all_s = _best(lambda: load_clip(p), args.repeat)
        sel_s = _best(lambda: load_clip(p, idx), args.repeat)
        ref_s = _best(ref, args.repeat)
        row = {
            "bench": "decode",
            "file": p.name,
            "frames": n,
            "size": list(load_clip(p, [0]).frames.shape[1:3]),
            "all_s": round(all_s, 4),
            "all_fps": round(n / all_s, 1),
            "sel_frames": len(idx),
            "sel_s": round(sel_s, 4),
            "sel_fps": round(len(idx) / sel_s, 1),
            "clip_speedup": round(all_s / sel_s, 2),
            "ref_fps": round(n / ref_s, 1),
            "ratio_vs_pydicom": round(ref_s / all_s, 2),
        }
        if preprocess is not None:
            def prep():
                preprocess(load_clip(p, idx).frames)

            prep_s = _best(prep, args.repeat)
            row["prep_fps"] = round(len(idx) / prep_s, 1)
            tot["prep_s"] += prep_s
        tot["all_frames"] += n
        tot["all_s"] += all_s
        tot["sel_frames"] += len(idx)
        tot["sel_s"] += sel_s
        tot["ref_s"] += ref_s
        print(json.dumps(row), flush=True)

    summary = {
        "bench": "decode",
        "summary": True,
        "clips": len(files),
        "all_fps": round(tot["all_frames"] / tot["all_s"], 1),
        "sel_fps": round(tot["sel_frames"] / tot["sel_s"], 1),
        "clip_speedup": round(tot["all_s"] / tot["sel_s"], 2),
        "ref_fps": round(tot["all_frames"] / tot["ref_s"], 1),
        "ratio_vs_pydicom": round(tot["ref_s"] / tot["all_s"], 2),
    }
    if preprocess is not None:
        summary["prep_fps"] = round(tot["sel_frames"] / tot["prep_s"], 1)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
