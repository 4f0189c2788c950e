"""``echonode train``, ``echonode eval`` and ``echonode calibrate``."""

from __future__ import annotations

import argparse

import json
import sys
from pathlib import Path
from echonode import audit

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def register(sub, parents):
    p = sub.add_parser(
        "train", parents=parents, help="train or fine-tune EchoCLIP on a manifest (contrastive, paper recipe)",
        description="Contrastive CLIP training on clip/report pairs from a manifest (CSV or Parquet with "
                    "path, report, patient_id, study_date, split). Writes <out>/bundle (published "
                    "open_clip layout), <out>/metrics.jsonl and per-epoch checkpoints (<out>/checkpoints).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", help="manifest CSV/Parquet")
    src.add_argument("--from-db", action="store_true",
                     help="train on the node's own SQL index: analysable clips of studies that hold a report "
                          "(an SR not written by echonode); writes OUT/manifest-from-db.csv first")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--architecture", default="tiny", choices=("tiny", "echo-clip", "echo-clip-r"),
                   help="architecture when training from scratch (default tiny)")
    p.add_argument("--init", default="", metavar="BUNDLE", help="fine-tune from this model bundle")
    p.add_argument("--tokenizer", default="", choices=("", "clip-bpe", "template"),
                   help="clip-bpe (report snippets, EchoCLIP) or template (full reports, EchoCLIP-R)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (paper 5e-5; scratch tiny ~1e-3)")
    p.add_argument("--warmup-steps", type=int, default=2000, help="warm-up steps (capped at 5%% of the run)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--max-minutes", type=float, default=0.0, help="time budget; the cosine follows it (0 = none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (under torchrun: the local rank's GPU)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--channel-order", default="bgr", choices=("bgr", "rgb"))
    p.add_argument("--cache-dir", default="", help="decoded-frame cache (default <out>/cache)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/last.pt")
    p.add_argument("--name", default="", help="bundle name")
    p.add_argument("--demo", action="store_true", help="mark the bundle as a demo model (never for clinical use)")
    p.add_argument("--weights-dtype", default="", choices=("", "fp16"), help="store fp16 weights (halves the bundle)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--low-res", default="", metavar="SIZES",
                   help="progressive resizing: e.g. 96 or 96,160 - train at these sizes first, then at the model's size")
    p.add_argument("--low-res-fraction", type=float, default=0.7, help="share of the run at --low-res (default 0.7)")
    p.add_argument("--val-every", type=int, default=1, help="validate (and checkpoint) every N epochs")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=False,
                   help="random zoom/shift/gain/gamma of training frames (default off: in short from-scratch runs "
                        "it dominated the embeddings and slowed learning)")
    p.add_argument("--full-report-prob", type=float, default=0.1,
                   help="BPE: share of training texts that are the whole report instead of a snippet (default 0.1)")
    p.add_argument("--positives", default="report", choices=("report", "none"),
                   help="report (default): a snippet counts as a positive of every image in the batch whose report "
                        "contains all of its sentences; none: plain InfoNCE, only the clip's own text")
    p.add_argument("--snippet-keep", default="0.4,1.0", metavar="LO,HI",
                   help="share of a report's sentences kept in a BPE snippet, drawn from [LO, HI]; sentences are then "
                        "dropped at random until the snippet fits the 77-token context (default 0.4,1.0)")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.set_defaults(func=run_train)

    e = sub.add_parser(
        "eval", parents=parents, help="evaluate a model bundle on a labelled manifest (paper metrics)",
        description="AUC with 95%% bootstrap CI, Youden sensitivity/specificity, LVEF/PASP MAE, LVEF<50/40/30 "
                    "AUCs, retrieval mean ranks and MCMRR, same-patient AUC. Writes metrics.md/.csv/.json "
                    "and PNG plots to --out.")
    _common_eval(e)
    e.add_argument("--out", required=True, help="output directory for the report")
    e.add_argument("--split", default="test", choices=("test", "val", "train", "all"))
    e.add_argument("--bootstrap", type=int, default=500, help="bootstrap resamples for CIs (default 500)")
    e.add_argument("--no-plots", action="store_true")
    e.set_defaults(func=run_eval)

    c = sub.add_parser(
        "calibrate", parents=parents, help="Youden thresholds and longitudinal thresholds into a bundle",
        description="Compute decision thresholds on a labelled manifest split and write calibration.json "
                    "(with provenance) into the bundle; the interpreter reads it.")
    _common_eval(c)
    c.add_argument("--split", default="val", choices=("test", "val", "train", "all"))
    c.add_argument("--dataset", default="", help="data set name recorded in the provenance")
    c.add_argument("--dry-run", action="store_true", help="print the thresholds, write nothing")
    c.add_argument("--min-auc", type=float, default=0.6, help="no threshold for tasks whose AUC is below this (default 0.6)")
    c.set_defaults(func=run_calibrate)


def _common_eval(p):
    p.add_argument("--manifest", required=True, help="labelled manifest CSV/Parquet")
    p.add_argument("--bundle", default="", help="model bundle directory (default: the configured EchoCLIP model)")
    p.add_argument("--r-bundle", default="", help="EchoCLIP-R bundle for study embeddings (default: --bundle)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--channel-order", default="bgr", choices=("bgr", "rgb"))
    p.add_argument("--cache-dir", default="", help="decoded-frame cache")
    p.add_argument("--tasks-file", default="", help="site task catalogue (TOML)")
    p.add_argument("--json", action="store_true", help="print JSON on stdout")


def _resolve_bundle(args) -> str | None:
    if args.bundle:
        return args.bundle
    from echonode.cli import settings_from_args
    from echonode.model.bundle import resolve_model

    settings = settings_from_args(args)
    b = resolve_model(settings, "clip")
    return str(b.path) if b is not None else None


def _setup(args):
    from echonode.cli import setup_logging
    setup_logging("WARNING")
    if getattr(args, "config", None):
        from echonode.cli import settings_from_args
        settings_from_args(args)  # config errors surface as exit 3


def run_train(args) -> int:
    _setup(args)
    from echonode.model.bundle import BundleError
    from train.loop import TrainConfig, train
    from train.manifest import ManifestError

    if args.epochs < 1 or args.batch_size < 2 or args.accum_steps < 1 or args.lr <= 0:
        print("echonode train: --epochs >= 1, --batch-size >= 2, --accum-steps >= 1 and --lr > 0 are required",
              file=sys.stderr)
        return EXIT_USAGE
    manifest = args.manifest
    if args.from_db:
        from echonode.cli import settings_from_args
        from train.fromdb import export_manifest

        settings = settings_from_args(args)
        manifest = str(Path(args.out) / "manifest-from-db.csv")
        try:
            exp = export_manifest(settings, manifest)
        except Exception as exc:  # noqa: BLE001 - database unreachable etc.: a clear one-line error
            from echonode.store.db import describe_error
            print(f"echonode train: cannot read the node's index: {describe_error(exc)}", file=sys.stderr)
            return EXIT_FAIL
        audit.record(settings, audit.export("training-manifest", str(Path(manifest).resolve()), [(u, None) for u in dict.fromkeys(r["study_uid"] for r in exp.rows)], count=len(exp.rows), detail="train --from-db: paths of raw stored clips, reports, patient keys"))
        for p in exp.problems:
            print(f"echonode train: {p}", file=sys.stderr)
        print(f"echonode train: {len(exp.rows)} clips from {exp.studies} studies in the index -> {manifest}",
              file=sys.stderr)
    cfg = TrainConfig(manifest=manifest, out=args.out, architecture=args.architecture, init_bundle=args.init,
                      tokenizer=args.tokenizer, epochs=args.epochs, batch_size=args.batch_size,
                      accum_steps=args.accum_steps, lr=args.lr, warmup_steps=args.warmup_steps,
                      weight_decay=args.weight_decay, max_minutes=args.max_minutes, seed=args.seed,
                      device=args.device, precision=args.precision, channel_order=args.channel_order,
                      cache_dir=args.cache_dir, resume=args.resume, name=args.name, demo=args.demo,
                      weights_dtype=args.weights_dtype, threads=args.threads, low_res=args.low_res,
                      low_res_fraction=args.low_res_fraction, augment=args.augment,
                      positives=args.positives, full_report_prob=args.full_report_prob, snippet_keep=args.snippet_keep,
                      val_every=max(1, args.val_every))
    try:
        res = train(cfg)
    except (ManifestError, BundleError, FileNotFoundError, ValueError) as exc:
        print(f"echonode train: {exc}", file=sys.stderr)
        return EXIT_FAIL
    for p in res.problems:
        print(f"echonode train: {p}", file=sys.stderr)
    summary = {"bundle": str(res.bundle_path), "best_epoch": res.best_epoch, "best_val_mcmrr": res.best_mcmrr,
               "epochs": res.epochs_run, "steps": res.steps, "seconds": round(res.seconds, 1),
               "skipped": len(res.problems)}
    print(json.dumps(summary) if args.json else
          f"bundle: {res.bundle_path} (best epoch {res.best_epoch}, val MCMRR {res.best_mcmrr:.3f}, "
          f"{res.steps} steps in {res.seconds:.0f} s)")
    return EXIT_OK


def run_eval(args) -> int:
    _setup(args)
    from echonode.model.bundle import BundleError
    from train.evaluate import EvalConfig, evaluate
    from train.manifest import ManifestError

    bundle = _resolve_bundle(args)
    if not bundle:
        print("echonode eval: no model bundle (give --bundle or install one under model.models_dir)", file=sys.stderr)
        return EXIT_FAIL
    cfg = EvalConfig(manifest=args.manifest, bundle=bundle, out=args.out, r_bundle=args.r_bundle, split=args.split,
                     device=args.device, precision=args.precision, channel_order=args.channel_order,
                     cache_dir=args.cache_dir, tasks_file=args.tasks_file, n_boot=args.bootstrap,
                     plots=not args.no_plots)
    try:
        metrics, files = evaluate(cfg)
    except (ManifestError, BundleError, ValueError) as exc:
        print(f"echonode eval: {exc}", file=sys.stderr)
        return EXIT_FAIL
    for p in metrics.get("problems", []):
        print(f"echonode eval: {p}", file=sys.stderr)
    if args.json:
        print(json.dumps({"headline": metrics["headline"], "files": files}, default=float))
    else:
        if metrics.get("bundle", {}).get("demo"):
            print("DEMO MODEL — NOT FOR CLINICAL USE")
        print(open(files["md"]).read())
    return EXIT_OK


def run_calibrate(args) -> int:
    _setup(args)
    from echonode.model.bundle import BundleError
    from train.calibrate import calibrate
    from train.manifest import ManifestError

    bundle = _resolve_bundle(args)
    if not bundle:
        print("echonode calibrate: no model bundle (give --bundle)", file=sys.stderr)
        return EXIT_FAIL
    try:
        res = calibrate(args.manifest, bundle, split=args.split, r_bundle=args.r_bundle, device=args.device,
                        precision=args.precision, channel_order=args.channel_order, cache_dir=args.cache_dir,
                        tasks_file=args.tasks_file, dataset=args.dataset, write=not args.dry_run,
                        min_auc=args.min_auc)
    except (ManifestError, BundleError, ValueError) as exc:
        print(f"echonode calibrate: {exc}", file=sys.stderr)
        return EXIT_FAIL
    if args.json:
        print(json.dumps(res, default=float))
    else:
        cal = res["calibration"]
        print(f"{len(cal['tasks'])} task threshold(s) from {cal['provenance']['n']} clips "
              f"({cal['provenance']['dataset']}):")
        for tid, e in sorted(cal["tasks"].items()):
            print(f"  {tid:45s} threshold {e['threshold']:.4f}  AUC {e['auc']:.3f}  n {e['n']}")
        if res["longitudinal"]:
            print(f"  longitudinal: {res['longitudinal']}")
        if res["skipped"]:
            print(f"  no threshold (AUC below --min-auc, or too few positives/negatives): {', '.join(res['skipped'])}")
        print("written to: " + (", ".join(res["written"]) if res["written"] else "nothing (--dry-run)"))
    return EXIT_OK
