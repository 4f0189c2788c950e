#!/usr/bin/env python3
"""Phantom acceptance benchmark (issue 4).

1. ``echonode phantom`` writes a training set (80/10/10 train/val/test by patient) and a
   separate held-out set (other patients, other seed);
2. ``echonode train`` trains the tiny architecture from scratch on CPU within a time budget
   (default 10 minutes, the cosine schedule follows the budget);
3. ``echonode eval`` scores the held-out set;
4. prints the acceptance table and JSON lines:

   * LVEF MAE <= 0.6 x the MAE of predicting the training mean;
   * AUC >= 0.9 for pacemaker lead, MitraClip, severe LV dilation and pericardial effusion;
   * MCMRR <= 0.1 x chance ((N + 1) / 2).

Usage: ``python3 bench/phantom.py [--train-studies 1800] [--test-studies 300] [--minutes 10]
[--threads 2] [--seed 0] [--workdir DIR] [--keep]``. Timings depend on the machine; the JSON lines say how many CPU
threads torch used and the load average when the run started.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sh(args, **kw):
    t = time.time()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "echonode", *args], cwd=ROOT, env=env, text=True,
                       capture_output=True, **kw)
    if p.returncode != 0:
        sys.stderr.write(p.stdout + p.stderr)
        raise SystemExit(f"echonode {args[0]} failed with exit code {p.returncode}")
    return p.stdout, time.time() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-studies", type=int, default=1800,
                    help="training phantoms (default 1800; the demo model's TRAINING.md says why)")
    ap.add_argument("--test-studies", type=int, default=300)
    ap.add_argument("--minutes", type=float, default=10.0, help="training time budget")
    ap.add_argument("--size", type=int, default=160, help="phantom frame size (default 160)")
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2, the CI machine's cores)")
    ap.add_argument("--val-every", type=int, default=2,
                    help="validate (and checkpoint) every N epochs (default 2: an epoch is ~3 s here)")
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument("--low-res", default="", help="progressive resizing stages before the model size (e.g. 96)")
    ap.add_argument("--epochs", type=int, default=400)
    ap.add_argument("--workdir", default="")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="echonode-bench-phantom-"))
    work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    try:
        _, t_gen1 = sh(["phantom", "--out", str(work / "train"), "--studies", str(args.train_studies), "--seed", "1",
                        "--size", str(args.size), "--frames", str(args.frames), "--json"])
        _, t_gen2 = sh(["phantom", "--out", str(work / "heldout"), "--studies", str(args.test_studies), "--seed", "2",
                        "--split", "test", "--size", str(args.size), "--frames", str(args.frames), "--json"])
        print(json.dumps({"stage": "phantom", "train_studies": args.train_studies, "test_studies": args.test_studies,
                          "seconds": round(t_gen1 + t_gen2, 1),
                          "seconds_per_study": round((t_gen1 + t_gen2) / (args.train_studies + args.test_studies), 3)}))
        out, t_train = sh(["train", "--manifest", str(work / "train" / "manifest.csv"), "--out", str(work / "run"),
                           "--architecture", "tiny", "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                           "--lr", str(args.lr), "--max-minutes", str(args.minutes), "--threads", str(args.threads),
                           "--low-res", args.low_res, "--low-res-fraction", "0.75", "--val-every", str(args.val_every),
                           "--seed", str(args.seed), "--json"])
        tr = json.loads(out.strip().splitlines()[-1])
        print(json.dumps({"stage": "train", "seconds": round(t_train, 1), "budget_s": args.minutes * 60,
                          "steps": tr["steps"], "epochs": tr["epochs"], "best_epoch": tr["best_epoch"],
                          "best_val_mcmrr": tr["best_val_mcmrr"], "torch_threads": args.threads,
                          "loadavg_at_start": load}))
        out, t_eval = sh(["eval", "--manifest", str(work / "heldout" / "manifest.csv"), "--bundle",
                          str(work / "run" / "bundle"), "--split", "test", "--out", str(work / "eval"),
                          "--cache-dir", str(work / "evalcache"), "--json"])
        ev = json.loads(out.strip().splitlines()[-1])
        h = ev["headline"]
        # the baseline: predicting the TRAINING mean LVEF for every held-out clip
        with open(work / "train" / "manifest.csv", newline="") as fh:
            train_ef = [float(r["lvef"]) for r in csv.DictReader(fh) if r["split"] in ("train", "val")]
        with open(work / "heldout" / "manifest.csv", newline="") as fh:
            test_ef = [float(r["lvef"]) for r in csv.DictReader(fh)]
        mean_ef = sum(train_ef) / len(train_ef)
        base = sum(abs(x - mean_ef) for x in test_ef) / len(test_ef)
        ratio = h["lvef_mae"] / base
        checks = [
            ("LVEF MAE / MAE(training mean)", ratio, "<=", 0.6),
            ("AUC pacemaker lead", h.get("auc_pacemaker"), ">=", 0.9),
            ("AUC MitraClip", h.get("auc_mitraclip"), ">=", 0.9),
            ("AUC severe LV dilation", h.get("auc_severe_left_ventricle_dilation"), ">=", 0.9),
            ("AUC pericardial effusion", h.get("auc_pericardial_effusion"), ">=", 0.9),
            ("MCMRR / chance", h.get("mcmrr_over_chance"), "<=", 0.1),
        ]
        print(json.dumps({"stage": "eval", "seconds": round(t_eval, 1), "lvef_mae": h["lvef_mae"],
                          "lvef_training_mean": round(mean_ef, 2), "lvef_mae_training_mean": round(base, 3),
                          **h}, default=float))
        ok_all = True
        print(f"\n{'criterion':34s} {'value':>8s}   target")
        for name, v, op, target in checks:
            ok = v is not None and (v <= target if op == "<=" else v >= target)
            ok_all &= ok
            print(f"{name:34s} {('%.3f' % v) if v is not None else '—':>8s}   {op} {target}   {'PASS' if ok else 'FAIL'}")
            print(json.dumps({"criterion": name, "value": v, "op": op, "target": target, "pass": ok}), file=sys.stderr)
        print(f"\nextra: LVEF MAE {h['lvef_mae']:.2f} (training-mean MAE {base:.2f}); PASP MAE {h.get('pasp_mae', float('nan')):.2f}; "
              f"same-patient AUC {h.get('same_patient_auc')}; AUC impella {h.get('auc_impella')}, TAVR {h.get('auc_tavr')}")
        print(f"report: {work / 'eval' / 'metrics.md'}")
        print(json.dumps({"stage": "summary", "pass": ok_all, "workdir": str(work)}))
        return 0 if ok_all else 1
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
