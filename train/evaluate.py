"""``echonode eval``: the paper's metrics on a labelled manifest.

For every clip the frames the published pipeline uses (0, 2, …, 38) are embedded; the
zero-shot tasks of the catalogue (:mod:`echonode.interpret.prompts`) are scored with the
interpreter's own pure functions (:mod:`echonode.interpret.scoring`: binary mean cosine,
top-20 % lower-median regression), so evaluation measures exactly what the node reports.

Metrics (written as ``metrics.md``, ``metrics.csv``, ``metrics.json`` and PNG plots):

* binary tasks: AUC with a 95 % bootstrap CI, sensitivity/specificity at Youden's index;
* categorical tasks: AUC of "any grade" (mean cosine of all non-normal prompts);
* LVEF and PASP: MAE (95 % CI) against the truth, the MAE of predicting the training
  mean (``baseline``), and LVEF < 50 / 40 / 30 AUCs (score = − predicted LVEF);
* retrieval: image→report and report→image mean rank and MCMRR (clip = mean of
  normalised frame embeddings, report = the full report with the bundle's tokenizer);
* same-patient AUC: cosine of two studies' embeddings, same patient vs different.

Labels: :mod:`train.labels` (truth columns, else report-text rules).
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from train import labels as L
from train import metrics as M
from train.data import FrameCache
from train.manifest import Manifest, Row, load_manifest

log = logging.getLogger(__name__)

#: tasks whose AUC the phantom acceptance looks at (issue 4)
HEADLINE = ("pacemaker", "mitraclip", "severe_left_ventricle_dilation", "pericardial_effusion")


@dataclass
class EvalConfig:
    manifest: str
    bundle: str
    out: str = ""
    r_bundle: str = ""                 # EchoCLIP-R bundle for study embeddings (default: bundle)
    split: str = "test"                # test | val | train | all
    device: str = "cpu"
    precision: str = "fp32"
    channel_order: str = "bgr"
    cache_dir: str = ""
    tasks_file: str = ""
    n_boot: int = 500
    seed: int = 0
    plots: bool = True


@dataclass
class ClipScores:
    """Per-clip zero-shot outputs and labels (the raw material of eval and calibrate)."""

    rows: list
    labels: list
    label_source: list
    binary: dict = field(default_factory=dict)        # task -> np.ndarray (N,)
    categorical: dict = field(default_factory=dict)   # task -> {level: np.ndarray (N,)}
    regression: dict = field(default_factory=dict)    # task -> np.ndarray (N,)
    clip_emb: Optional[np.ndarray] = None              # (N, D) mean normalised frame embeddings
    study_emb: Optional[np.ndarray] = None             # (N, D) from the R bundle (or the same)
    report_emb: Optional[np.ndarray] = None            # (N, D)
    problems: list = field(default_factory=list)
    bundle_info: dict = field(default_factory=dict)


def _select_rows(manifest: Manifest, split: str) -> list[Row]:
    if split == "all":
        return list(manifest.rows)
    rows = manifest.split(split)
    return rows


def _frame_embeddings(model, frames_list, device, mean, std, batch=128, autocast=None):
    import torch
    import torch.nn.functional as F
    from echonode.model.preprocess import normalize

    out = []
    for fr in frames_list:
        embs = []
        arr = np.asarray(fr)
        for i in range(0, len(arr), batch):
            x = normalize(arr[i:i + batch], mean, std).to(device)
            with torch.no_grad():
                if autocast:
                    with autocast():
                        e = model.encode_image(x)
                else:
                    e = model.encode_image(x)
            embs.append(F.normalize(e.float(), dim=-1).cpu().numpy())
        out.append(np.concatenate(embs))
    return out


def _text_emb(model, tokenizer, texts, device, batch=256):
    import torch
    import torch.nn.functional as F

    out = []
    for i in range(0, len(texts), batch):
        ids = tokenizer(list(texts[i:i + batch])).to(device)
        with torch.no_grad():
            out.append(F.normalize(model.encode_text(ids).float(), dim=-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def score_manifest(cfg: EvalConfig, rows: list[Row], progress: bool = True) -> ClipScores:
    """Embed every clip of ``rows`` and score all catalogue tasks on it."""
    import torch

    from echonode.interpret import scoring
    from echonode.interpret.prompts import load_catalog
    from echonode.model.bundle import Bundle

    bundle = Bundle.open(cfg.bundle)
    model = bundle.load_model(device=cfg.device, precision=cfg.precision)
    tok = bundle.tokenizer()
    mcfg = bundle.config
    catalog = load_catalog(cfg.tasks_file or None)
    cache = FrameCache(cfg.cache_dir or (Path(cfg.out or ".") / "cache"), size=mcfg.image_size,
                       channel_order=cfg.channel_order)
    good, frames, problems = cache.prepare(rows, desc="decode")
    device = torch.device(cfg.device)
    frame_embs = _frame_embeddings(model, frames, device, mcfg.mean, mcfg.std)
    res = ClipScores(rows=good, labels=[], label_source=[], problems=problems,
                     bundle_info={"name": bundle.name, "architecture": bundle.architecture,
                                  "weights_sha256": bundle.weights_sha256, "demo": bundle.demo,
                                  "tokenizer": bundle.tokenizer_kind,
                                  "value_ranges": bundle.value_ranges})
    for r in good:
        lab, src = L.row_labels(r.report, r.extra, catalog)
        res.labels.append(lab)
        res.label_source.append(src)
    # prompt embeddings, once per task
    for tid, task in catalog.items():
        if task.mode == "binary":
            pe = _text_emb(model, tok, list(task.prompts), device)
            res.binary[tid] = np.array([scoring.binary_score(fe, pe) for fe in frame_embs])
        elif task.mode == "categorical":
            pe = _text_emb(model, tok, list(task.prompts), device)
            vals = list(task.values)
            per = {lv: [] for lv in sorted(set(vals))}
            anyv = []
            nonzero = [i for i, v in enumerate(vals) if v > 0]
            for fe in frame_embs:
                sc = scoring.categorical_level_scores(fe, pe, vals)
                for lv in per:
                    per[lv].append(sc[lv])
                anyv.append(scoring.binary_score(fe, pe[nonzero]) if nonzero else float("nan"))
            res.categorical[tid] = {lv: np.array(v) for lv, v in per.items()}
            res.categorical[tid]["any"] = np.array(anyv)
        elif task.mode == "regression":
            cands, cvals = scoring.regression_candidates(list(task.prompts),
                                                         task.regression_values(bundle.value_range(tid)))
            ce = _text_emb(model, tok, cands, device)
            res.regression[tid] = np.array([scoring.regression_value(fe, ce, cvals) for fe in frame_embs])
    res.clip_emb = np.stack([fe.mean(axis=0) for fe in frame_embs]) if frame_embs else np.zeros((0, 0))
    res.report_emb = _text_emb(model, tok, [r.report for r in good], device) if good else np.zeros((0, 0))
    if cfg.r_bundle and cfg.r_bundle != cfg.bundle:
        rb = Bundle.open(cfg.r_bundle)
        rmodel = rb.load_model(device=cfg.device, precision=cfg.precision)
        rcache = FrameCache(cache.dir, size=rb.config.image_size, channel_order=cfg.channel_order)
        _, rframes, _ = rcache.prepare(good, desc="decode (R)")
        remb = _frame_embeddings(rmodel, rframes, device, rb.config.mean, rb.config.std)
        res.study_emb = np.stack([fe.mean(axis=0) for fe in remb])
    else:
        res.study_emb = res.clip_emb
    return res


def _training_means(manifest: Manifest) -> dict[str, float]:
    out = {}
    train_rows = manifest.split("train")
    for key in ("lvef", "pasp"):
        vals = []
        for r in train_rows:
            lab, _ = L.row_labels(r.report, r.extra)
            v = lab.get(key, float("nan"))
            if not math.isnan(v):
                vals.append(v)
        if vals:
            out[key] = float(np.mean(vals))
    return out


def compute_metrics(s: ClipScores, *, n_boot: int = 500, seed: int = 0,
                    train_means: Optional[dict] = None) -> dict:
    """All metrics from per-clip scores. Returns a JSON-able dict."""
    out: dict = {"n": len(s.rows), "binary": {}, "categorical": {}, "regression": {}, "bundle": s.bundle_info,
                 "label_sources": {k: s.label_source.count(k) for k in set(s.label_source)}}

    def bin_entry(y, sc):
        y = np.asarray(y, float)
        ok = np.isfinite(y) & np.isfinite(sc)
        y, sc = y[ok], np.asarray(sc)[ok]
        n_pos = int(y.sum())
        e = {"n": int(len(y)), "n_pos": n_pos}
        if n_pos == 0 or n_pos == len(y):
            e.update(auc=None, note="only one class present")
            return e
        a = M.auc(y, sc)
        lo, hi = M.bootstrap_ci(y, sc, n_boot=n_boot, seed=seed)
        yd = M.youden(y, sc)
        e.update(auc=a, auc_ci=[lo, hi], threshold=yd["threshold"], sensitivity=yd["sensitivity"],
                 specificity=yd["specificity"])
        return e

    for tid, sc in s.binary.items():
        y = [L.task_label(tid, lab) for lab in s.labels]
        if all(math.isnan(v) for v in y):
            continue
        out["binary"][tid] = bin_entry(y, sc)
    for tid, per in s.categorical.items():
        g = np.array([L.categorical_grade(tid, lab) for lab in s.labels])
        if np.all(np.isnan(g)):
            continue
        y_any = np.where(np.isnan(g), np.nan, (g >= 1).astype(float))
        entry = {"any": bin_entry(y_any, per["any"])}
        for lv, sc in per.items():
            if lv == "any" or lv == 0:
                continue
            y = np.where(np.isnan(g), np.nan, (g >= lv).astype(float))
            entry[f">={lv}"] = bin_entry(y, sc)
        out["categorical"][tid] = entry
    train_means = train_means or {}
    for tid, pred in s.regression.items():
        key = L.REGRESSION_LABELS.get(tid)
        if not key:
            continue
        t = np.array([lab.get(key, np.nan) for lab in s.labels], float)
        ok = np.isfinite(t) & np.isfinite(pred)
        if ok.sum() == 0:
            continue
        e = {"n": int(ok.sum()), "mae": M.mae(t[ok], pred[ok])}
        lo, hi = M.mae_ci(t[ok], pred[ok], n_boot=n_boot, seed=seed)
        e["mae_ci"] = [lo, hi]
        ref = train_means.get(key, float(np.mean(t[ok])))
        e["baseline_mean"] = ref
        e["baseline_source"] = "training-split mean" if key in train_means else "evaluation-set mean"
        e["baseline_mae"] = M.mae(t[ok], np.full(ok.sum(), ref))
        e["mae_ratio"] = e["mae"] / e["baseline_mae"] if e["baseline_mae"] > 0 else None
        e["corr"] = float(np.corrcoef(t[ok], pred[ok])[0, 1]) if ok.sum() > 2 and np.std(pred[ok]) > 0 else None
        if key == "lvef":
            for thr in (50, 40, 30):
                e[f"auc_lvef_lt_{thr}"] = bin_entry((t[ok] < thr).astype(float), -pred[ok])
        out["regression"][tid] = e
    if s.clip_emb is not None and len(s.rows) >= 2:
        out["retrieval"] = M.retrieval(s.clip_emb, s.report_emb)
    if s.study_emb is not None and len(s.rows) >= 2:
        y, sim = M.same_patient_pairs(s.study_emb, [r.patient_id for r in s.rows], seed=seed)
        if y.any() and (~y).any():
            out["same_patient"] = {"n_pairs": int(len(y)), "n_same": int(y.sum()), "auc": M.auc(y, sim),
                                   "auc_ci": list(M.bootstrap_ci(y.astype(float), sim, n_boot=min(n_boot, 200), seed=seed))}
        else:
            out["same_patient"] = {"n_pairs": int(len(y)), "n_same": int(y.sum()), "auc": None,
                                   "note": "needs patients with more than one study"}
    return out


def headline(metrics: dict) -> dict:
    """The acceptance numbers of issue 4 in one flat dict."""
    h = {}
    ef = metrics["regression"].get("ejection_fraction")
    if ef:
        h["lvef_mae"] = ef["mae"]
        h["lvef_baseline_mae"] = ef["baseline_mae"]
        h["lvef_mae_ratio"] = ef["mae_ratio"]
    pa = metrics["regression"].get("pulmonary_artery_pressure")
    if pa:
        h["pasp_mae"] = pa["mae"]
        h["pasp_mae_ratio"] = pa["mae_ratio"]
    for t in ("pacemaker", "mitraclip", "severe_left_ventricle_dilation", "impella", "tavr"):
        if t in metrics["binary"]:
            h[f"auc_{t}"] = metrics["binary"][t].get("auc")
    pe = metrics["categorical"].get("pericardial_effusion")
    if pe:
        h["auc_pericardial_effusion"] = pe["any"].get("auc")
    r = metrics.get("retrieval")
    if r:
        h["mcmrr"] = r["mcmrr"]
        h["mcmrr_over_chance"] = r["mcmrr_over_chance"]
    sp = metrics.get("same_patient")
    if sp:
        h["same_patient_auc"] = sp.get("auc")
    return h


def _fmt(x, nd=3):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def table_rows(metrics: dict) -> list[dict]:
    rows = []
    for tid, e in metrics["binary"].items():
        rows.append({"task": tid, "kind": "binary", "n": e["n"], "n_pos": e["n_pos"], "auc": e.get("auc"),
                     "ci_low": (e.get("auc_ci") or [None, None])[0], "ci_high": (e.get("auc_ci") or [None, None])[1],
                     "threshold": e.get("threshold"), "sensitivity": e.get("sensitivity"),
                     "specificity": e.get("specificity")})
    for tid, ent in metrics["categorical"].items():
        for lvl, e in ent.items():
            rows.append({"task": f"{tid} [{lvl}]", "kind": "categorical", "n": e["n"], "n_pos": e["n_pos"],
                         "auc": e.get("auc"), "ci_low": (e.get("auc_ci") or [None, None])[0],
                         "ci_high": (e.get("auc_ci") or [None, None])[1], "threshold": e.get("threshold"),
                         "sensitivity": e.get("sensitivity"), "specificity": e.get("specificity")})
    for tid, e in metrics["regression"].items():
        rows.append({"task": tid, "kind": "regression", "n": e["n"], "mae": e["mae"], "ci_low": e["mae_ci"][0],
                     "ci_high": e["mae_ci"][1], "baseline_mae": e["baseline_mae"], "mae_ratio": e["mae_ratio"]})
        for thr in (50, 40, 30):
            k = f"auc_lvef_lt_{thr}"
            if k in e:
                x = e[k]
                rows.append({"task": f"LVEF < {thr}", "kind": "binary (from LVEF)", "n": x["n"], "n_pos": x["n_pos"],
                             "auc": x.get("auc"), "ci_low": (x.get("auc_ci") or [None, None])[0],
                             "ci_high": (x.get("auc_ci") or [None, None])[1], "threshold": x.get("threshold"),
                             "sensitivity": x.get("sensitivity"), "specificity": x.get("specificity")})
    r = metrics.get("retrieval")
    if r:
        rows.append({"task": "retrieval", "kind": "retrieval", "n": r["n"], "i2t_mean_rank": r["image_to_report_mean_rank"],
                     "t2i_mean_rank": r["report_to_image_mean_rank"], "mcmrr": r["mcmrr"], "chance": r["chance_rank"]})
    sp = metrics.get("same_patient")
    if sp:
        rows.append({"task": "same patient", "kind": "longitudinal", "n": sp["n_pairs"], "n_pos": sp["n_same"],
                     "auc": sp.get("auc"), "ci_low": (sp.get("auc_ci") or [None, None])[0],
                     "ci_high": (sp.get("auc_ci") or [None, None])[1]})
    return rows


def write_reports(metrics: dict, scores: ClipScores, out: Path, plots: bool = True) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
    rows = table_rows(metrics)
    cols = ["task", "kind", "n", "n_pos", "auc", "ci_low", "ci_high", "threshold", "sensitivity", "specificity",
            "mae", "baseline_mae", "mae_ratio", "i2t_mean_rank", "t2i_mean_rank", "mcmrr", "chance"]
    with (out / "metrics.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in cols})
    b = metrics.get("bundle", {})
    md = [f"# echonode eval — {b.get('name', '?')} ({b.get('architecture', '?')}, weights {str(b.get('weights_sha256', ''))[:12]})", ""]
    if b.get("demo"):
        md += ["**DEMO MODEL — NOT FOR CLINICAL USE** (trained on synthetic phantoms)", ""]
    md += [f"{metrics['n']} clips; labels from: {', '.join(f'{k} ({v})' for k, v in metrics['label_sources'].items())}.", "",
           "| task | n | positives | AUC (95 % CI) | Youden threshold | sens | spec |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] in ("binary", "categorical", "binary (from LVEF)", "longitudinal"):
            ci = f" ({_fmt(r.get('ci_low'))}–{_fmt(r.get('ci_high'))})" if r.get("auc") is not None else ""
            md.append(f"| {r['task']} | {r['n']} | {r.get('n_pos', '')} | {_fmt(r.get('auc'))}{ci} | "
                      f"{_fmt(r.get('threshold'), 4)} | {_fmt(r.get('sensitivity'))} | {_fmt(r.get('specificity'))} |")
    md += ["", "| regression | n | MAE (95 % CI) | MAE of predicting the mean | ratio |", "|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "regression":
            md.append(f"| {r['task']} | {r['n']} | {_fmt(r['mae'], 2)} ({_fmt(r['ci_low'], 2)}–{_fmt(r['ci_high'], 2)}) | "
                      f"{_fmt(r['baseline_mae'], 2)} | {_fmt(r['mae_ratio'], 2)} |")
    if b.get("value_ranges"):
        md += ["", "Regression candidates limited to the values the model's training reports stated: " +
               ", ".join(f"{k} {v[0]}–{v[1]}" for k, v in sorted(b["value_ranges"].items())) + "."]
    rt = metrics.get("retrieval")
    if rt:
        md += ["", f"Retrieval over {rt['n']} clip/report pairs: image→report mean rank {rt['image_to_report_mean_rank']:.2f}, "
               f"report→image {rt['report_to_image_mean_rank']:.2f}, MCMRR {rt['mcmrr']:.2f} (chance {rt['chance_rank']:.1f}, "
               f"ratio {rt['mcmrr_over_chance']:.3f})."]
    (out / "metrics.md").write_text("\n".join(md) + "\n")
    files = {"json": str(out / "metrics.json"), "csv": str(out / "metrics.csv"), "md": str(out / "metrics.md")}
    if plots:
        files.update(_plots(metrics, scores, out))
    return files


def _plots(metrics: dict, s: ClipScores, out: Path) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    fig, ax = plt.subplots(figsize=(6, 6))
    for tid, sc in s.binary.items():
        y = np.array([L.task_label(tid, lab) for lab in s.labels], float)
        ok = np.isfinite(y)
        if ok.sum() < 2 or y[ok].sum() in (0, ok.sum()):
            continue
        fpr, tpr, _ = M.roc_curve(y[ok], sc[ok])
        ax.plot(fpr, tpr, label=f"{tid} ({M.auc(y[ok], sc[ok]):.2f})")
    for tid, per in s.categorical.items():
        g = np.array([L.categorical_grade(tid, lab) for lab in s.labels], float)
        ok = np.isfinite(g)
        y = (g[ok] >= 1).astype(float)
        if ok.sum() < 2 or y.sum() in (0, len(y)):
            continue
        fpr, tpr, _ = M.roc_curve(y, per["any"][ok])
        ax.plot(fpr, tpr, "--", label=f"{tid} any ({M.auc(y, per['any'][ok]):.2f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC (zero-shot binary scores)")
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=110)
    plt.close(fig)
    files["roc"] = str(out / "roc.png")
    for tid, pred in s.regression.items():
        key = L.REGRESSION_LABELS.get(tid)
        if not key:
            continue
        t = np.array([lab.get(key, np.nan) for lab in s.labels], float)
        ok = np.isfinite(t) & np.isfinite(pred)
        if not ok.any():
            continue
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(t[ok], pred[ok], s=8, alpha=0.6)
        lo, hi = float(min(t[ok].min(), pred[ok].min())), float(max(t[ok].max(), pred[ok].max()))
        ax.plot([lo, hi], [lo, hi], ":", color="grey")
        ax.set_xlabel(f"true {key}")
        ax.set_ylabel(f"predicted {key}")
        ax.set_title(f"{tid}: MAE {M.mae(t[ok], pred[ok]):.2f}")
        fig.tight_layout()
        fig.savefig(out / f"scatter_{tid}.png", dpi=110)
        plt.close(fig)
        files[f"scatter_{tid}"] = str(out / f"scatter_{tid}.png")
    return files


def evaluate(cfg: EvalConfig, progress: bool = True) -> tuple[dict, dict]:
    """Run the evaluation; returns (metrics, written files)."""
    manifest = load_manifest(cfg.manifest)
    rows = _select_rows(manifest, cfg.split)
    if len(rows) < 2:
        raise ValueError(f"{cfg.manifest}: split {cfg.split!r} has {len(rows)} usable row(s); need at least 2")
    scores = score_manifest(cfg, rows, progress=progress)
    metrics = compute_metrics(scores, n_boot=cfg.n_boot, seed=cfg.seed, train_means=_training_means(manifest))
    metrics["manifest"] = str(cfg.manifest)
    metrics["split"] = cfg.split
    metrics["problems"] = list(manifest.problems) + list(scores.problems)
    metrics["headline"] = headline(metrics)
    metrics["date"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    files = write_reports(metrics, scores, Path(cfg.out), plots=cfg.plots) if cfg.out else {}
    return metrics, files
