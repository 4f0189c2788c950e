"""The contrastive training loop (``echonode train``).

The paper's recipe (issue 4, research/echoclip.md):

* CLIP loss: symmetric cross-entropy over the batch's image–text cosine matrix scaled
  by the learnable ``logit_scale`` (clamped at ln 100, as open_clip does);
* AdamW; the learning rate warms up linearly (2,000 steps in the paper, here at most 5 %
  of the run) and then follows a cosine to zero; when a time budget is given the cosine
  follows elapsed time, so a run that must stop at N minutes still anneals;
* one random frame (of the reference's frames 0, 2, …, 38) per video per epoch;
* BPE tokenizer with report snippets (EchoCLIP) or the template tokenizer with full
  reports (EchoCLIP-R); a snippet also counts as a positive of the other clips of the
  batch whose reports say every one of its sentences (``positives="report"``, see
  :func:`clip_loss`; report text only, no labels);
* the checkpoint kept is the one with the lowest mean cross-modal retrieval rank (MCMRR)
  on the validation split;
* the bundle records the LVEF and PASP values the training reports stated
  (:func:`trained_value_ranges`): the interpreter ranks only regression candidates the text
  tower has read.

No augmentation by default (``augment=True`` adds a random zoom, shift, gain and gamma):
in 10-minute from-scratch runs on phantoms the random gain and gamma dominated the image
embeddings (held-out clips without it all embedded within cosine ~1 of each other) and the
loss stayed at ln(batch).

Progressive resizing (optional, ``--low-res``): the first part of the run sees frames
downscaled to a smaller input (4x cheaper at half size), the rest the model's own size;
validation and the saved model always use the model's size.

Engineering: bf16 autocast and channels-last on CUDA, gradient accumulation, DDP under
``torchrun`` (each rank contrasts its own batch: no feature gather), a checkpoint after
every epoch and ``--resume``, a tqdm bar and JSON-lines metrics (``metrics.jsonl``).
The result is a model bundle in the published layout (:func:`echonode.model.bundle.write_bundle`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from train.data import FrameCache, TextSampler
from train.manifest import Manifest, ManifestError, load_manifest

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    manifest: str
    out: str
    architecture: str = "tiny"          # echo-clip | echo-clip-r | tiny (scratch)
    init_bundle: str = ""               # fine-tune from this bundle (overrides architecture)
    tokenizer: str = ""                 # clip-bpe | template ("" = architecture default / bundle's)
    epochs: int = 10
    batch_size: int = 64
    accum_steps: int = 1
    lr: float = 5e-5
    warmup_steps: int = 2000            # capped at 5 % of the run
    weight_decay: float = 0.1
    max_minutes: float = 0.0            # 0 = no time budget
    seed: int = 0
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    precision: str = "auto"             # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    channel_order: str = "bgr"
    cache_dir: str = ""                 # default <out>/cache
    val_frames: int = 4                 # frames per clip embedded for the validation MCMRR
    val_every: int = 1                  # validate every N epochs (and always at the end)
    resume: bool = False
    name: str = ""                      # bundle name (default: architecture + "-trained")
    demo: bool = False
    weights_dtype: str = ""             # "" = fp32; "fp16" halves the bundle
    threads: int = 0                    # torch CPU threads (0 = torch default)
    low_res: str = ""                   # progressive resizing: "96" or "96,160" (sizes before the model's own)
    low_res_fraction: float = 0.7       # share of the run (by schedule progress) spent at low_res
    augment: bool = False               # random zoom/shift/gain/gamma per training frame
    positives: str = "report"           # report: a snippet is a positive of every image whose report says
                                        # all of its sentences; none: plain InfoNCE (diagonal only)
    snippet_keep: str = "0.4,1.0"       # BPE snippets keep this share of a report's sentences (range)
    full_report_prob: float = 0.1       # BPE: share of training texts that are the whole report (truncated)
    log_every: int = 10


@dataclass
class TrainResult:
    bundle_path: Path
    best_epoch: int
    best_mcmrr: float
    epochs_run: int
    steps: int
    seconds: float
    history: list = field(default_factory=list)
    problems: list = field(default_factory=list)


def clip_loss(img, txt, logit_scale, positives=None):
    """Symmetric InfoNCE of open_clip (normalised features in, scalar loss out).

    ``positives`` (optional B x B bool, ``positives[i, j]``: text j truly describes image
    i; the diagonal is True) corrects it for report snippets, which are short and repeat
    ("NORMAL RIGHT VENTRICULAR SIZE.", "ECHO DENSITY IN RIGHT VENTRICLE SUGGESTIVE OF
    CATHETER, PACER LEAD, OR ICD LEAD."), so one snippet often describes several images of
    a batch word for word:

    * text → image: the target of text j spreads evenly over every image it describes
      (the multi-positive form of UniCL, Yang et al. 2022), so a finding sentence pulls
      all the batch's images that show the finding;
    * image → text: the target stays the image's own text, and the other texts that also
      describe it are left out of the softmax (false-negative cancellation) rather than
      made targets: spreading this direction over true texts too would let a model lower
      the loss by scoring frequent, generic sentences high for every image without looking
      at it (a collapse seen in practice).

    With only the diagonal this is exactly open_clip's loss.
    """
    return contrastive_loss(logit_scale * img @ txt.T, positives)


def contrastive_loss(logits, positives=None):
    """:func:`clip_loss` on a (B, B) image x text logit matrix."""
    import torch
    import torch.nn.functional as F

    labels = torch.arange(logits.shape[0], device=logits.device)
    if positives is None:
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    pos = positives.to(device=logits.device, dtype=torch.bool)
    other = pos & ~torch.eye(pos.shape[0], dtype=torch.bool, device=pos.device)
    i2t = F.cross_entropy(logits.masked_fill(other, float("-inf")), labels)
    target = pos.T.to(logits.dtype)
    t2i = F.cross_entropy(logits.T, target / target.sum(dim=1, keepdim=True))
    return (i2t + t2i) / 2


def report_positives(report_sentences, snippet_sentences):
    """B x B bool tensor: [i, j] is True when every sentence of snippet j is a sentence of
    report i (a full report, ``None``, matches only its own row). Uses report text only."""
    import torch

    n = len(report_sentences)
    pos = torch.eye(n, dtype=torch.bool)
    for j, said in enumerate(snippet_sentences):
        if not said:
            continue
        for i in range(n):
            if i != j and said <= report_sentences[i]:
                pos[i, j] = True
    return pos


def mean_pairwise_cos(e) -> float:
    """Mean cosine between distinct rows (near 1: every input looks the same to the model)."""
    import torch
    import torch.nn.functional as F

    e = F.normalize(torch.as_tensor(e).float(), dim=-1)
    c = e @ e.T
    n = c.shape[0]
    return float((c.sum() - c.diagonal().sum()) / max(1, n * n - n))


def augment(im: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Light echo-plausible augmentation of one (S, S, 3) uint8 frame: a random zoom
    (0.9-1.1) and shift (up to 6 % of the size), gain (0.8-1.2) and gamma (0.85-1.15)."""
    import cv2

    S = im.shape[0]
    z = rng.uniform(0.9, 1.1)
    tx, ty = rng.uniform(-0.06, 0.06, size=2) * S
    M = np.array([[z, 0, (1 - z) * S / 2 + tx], [0, z, (1 - z) * S / 2 + ty]], dtype=np.float32)
    out = cv2.warpAffine(im, M, (S, S), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    g, gam = rng.uniform(0.8, 1.2), rng.uniform(0.85, 1.15)
    lut = np.clip(255.0 * g * (np.arange(256) / 255.0) ** gam, 0, 255).astype(np.uint8)
    return lut[out]


def trained_value_ranges(reports, base=None) -> Optional[dict]:
    """{regression task id: [lo, hi]} of the values the training reports state in the task's
    prompt phrasing (the default catalogue), recorded in the bundle so the interpreter ranks
    only candidates the text tower has read (:meth:`echonode.model.bundle.Bundle.value_range`).

    ``base`` is the starting bundle's record: None when it reads every value (published
    weights; a fine-tune of them records nothing), {} for a model trained from scratch, or
    its ranges, which the new reports widen."""
    from echonode.interpret.prompts import load_catalog
    from train.labels import stated_value_range

    if base is None:
        return None
    out = {k: list(v) for k, v in base.items()}
    for task in load_catalog().values():
        if task.mode != "regression":
            continue
        r = stated_value_range(reports, task.prompts)
        if r is not None:
            old = out.get(task.id)
            out[task.id] = [min(r[0], old[0]), max(r[1], old[1])] if old else [r[0], r[1]]
    return out or None


def make_optimizer(groups, lr: float):
    """AdamW (betas 0.9/0.98, eps 1e-6, as open_clip) in its fused form where this torch has
    one for the parameters' device: the same update in one kernel per step instead of a
    Python loop over ~60 tensors (on 2 CPU threads the tiny model's optimizer step drops
    from ~38 ms to ~6 ms, a quarter of the whole step)."""
    import torch

    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    except (RuntimeError, TypeError, ValueError):  # torch without a fused AdamW for this device
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def lr_at(progress: float, warmup_frac: float, base_lr: float) -> float:
    """Linear warm-up over the first ``warmup_frac`` of the run, then cosine to zero.

    ``progress`` in [0, 1] is the larger of steps done / planned steps and, with a time
    budget, elapsed / budget: the schedule scales to the run's length either way.
    """
    p = min(1.0, max(0.0, progress))
    if warmup_frac > 0 and p < warmup_frac:
        return base_lr * max(p / warmup_frac, 1e-3)
    q = (p - warmup_frac) / max(1e-9, 1.0 - warmup_frac)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * q))


def _dist():
    """(rank, world_size, local_rank), initialising torch.distributed under torchrun."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def _device(cfg: TrainConfig, local_rank: int):
    import torch

    if cfg.device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and torch.cuda.is_available():
        return torch.device(f"cuda:{local_rank}")
    return torch.device(cfg.device)


class _Writer:
    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def __call__(self, **rec):
        if not self.enabled:
            return
        rec = {"time": round(time.time(), 3), **rec}
        with self.path.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")


@dataclass
class Prepared:
    rows: list
    frames: list
    problems: list


def prepare_split(manifest: Manifest, split: str, cache: FrameCache, desc: str) -> Prepared:
    rows = manifest.split(split)
    good, arrays, problems = cache.prepare(rows, desc=desc)
    return Prepared(good, arrays, problems)


def embed_clips(model, frames_list, device, mean, std, n_frames: int = 4, batch: int = 128, autocast=None,
                size: int = 0):
    """Mean of L2-normalised embeddings of ``n_frames`` evenly spaced cached frames per clip
    (resized to ``size`` first when given: validation during the low-resolution phase)."""
    import cv2
    import torch
    import torch.nn.functional as F
    from echonode.model.preprocess import normalize

    out = []
    buf, owners = [], []

    def flush():
        if not buf:
            return
        x = normalize(np.stack(buf), mean, std).to(device)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), (autocast() if autocast else _null()):
            e = F.normalize(model.encode_image(x).float(), dim=-1).cpu().numpy()
        for o, v in zip(owners, e):
            out[o].append(v)
        buf.clear()
        owners.clear()

    for ci, fr in enumerate(frames_list):
        out.append([])
        k = len(fr)
        sel = np.unique(np.linspace(0, k - 1, num=min(n_frames, k)).round().astype(int)) if n_frames else np.arange(k)
        for j in sel:
            im = np.asarray(fr[j])
            if size and size != im.shape[0]:
                im = cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA)
            buf.append(im)
            owners.append(ci)
            if len(buf) >= batch:
                flush()
    flush()
    return np.stack([np.mean(v, axis=0) for v in out])


def embed_texts(model, sampler: TextSampler, texts, device, batch: int = 256):
    import torch
    import torch.nn.functional as F

    embs = []
    for i in range(0, len(texts), batch):
        ids = torch.from_numpy(np.stack([sampler.full(t) for t in texts[i:i + batch]])).to(device)
        with torch.no_grad():
            embs.append(F.normalize(model.encode_text(ids).float(), dim=-1).cpu().numpy())
    return np.concatenate(embs) if embs else np.zeros((0, 1))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@dataclass
class _Model:
    """The model to train and where it came from."""

    model: object
    config: object          # echonode.model.configs.ModelConfig
    architecture: str
    tokenizer_kind: str
    source: str
    base_value_ranges: Optional[dict]   # {} from scratch; the starting bundle's record otherwise


def _load_model(cfg: TrainConfig) -> _Model:
    """The starting bundle (fine-tuning) or a fresh model of ``cfg.architecture``."""
    import torch

    from echonode.model.bundle import Bundle
    from echonode.model.clip import build_model
    from echonode.model.configs import get_config

    if cfg.init_bundle:
        b = Bundle.open(cfg.init_bundle)
        model = b.load_model(device="cpu", precision="fp32")
        model.train()
        return _Model(model, b.config, b.architecture, cfg.tokenizer or b.tokenizer_kind,
                      f"fine-tuned from {b.name} ({b.weights_sha256[:12]})", b.value_ranges or None)
    mcfg = get_config(cfg.architecture)
    torch.manual_seed(cfg.seed)
    return _Model(build_model(mcfg), mcfg, cfg.architecture, cfg.tokenizer or mcfg.tokenizer_kind,
                  f"trained from scratch ({cfg.architecture})", {})


def _text_sampler(cfg: TrainConfig, tokenizer_kind: str) -> TextSampler:
    from echonode.model.tokenize import get_tokenizer

    if cfg.positives not in ("report", "none"):
        raise ValueError(f"positives must be 'report' or 'none', got {cfg.positives!r}")
    try:
        keep_lo, keep_hi = (float(x) for x in str(cfg.snippet_keep).split(","))
    except ValueError:
        raise ValueError(f"snippet_keep must be 'LO,HI', got {cfg.snippet_keep!r}") from None
    return TextSampler(get_tokenizer(tokenizer_kind), keep=(keep_lo, keep_hi), full_report_prob=cfg.full_report_prob)


def _optimizer(cfg: TrainConfig, model):
    """AdamW with weight decay on weight matrices only (not on norms, biases, scales, embeddings)."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_scale" in n or "positional_embedding" in n or n.endswith(".bias")
         or "norm" in n or "ln_" in n or "gamma" in n else decay).append(p)
    return make_optimizer([{"params": decay, "weight_decay": cfg.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)


@dataclass
class _Run:
    """A training run in progress: what every step reads, and the counters it moves."""

    cfg: TrainConfig
    model: object
    ddp_model: object
    opt: object
    sampler: TextSampler
    tr: Prepared
    va: Prepared
    report_sets: list
    device: object
    autocast: object
    writer: _Writer
    ckdir: Path
    main: bool
    rank: int
    world: int
    mean: tuple
    std: tuple
    per_rank: int = 0
    bs: int = 2
    steps_per_epoch: int = 1
    total_updates: int = 1
    warmup_frac: float = 0.0
    low_sizes: list = field(default_factory=list)
    step: int = 0
    best: float = float("inf")
    best_epoch: int = -1
    history: list = field(default_factory=list)
    elapsed_before: float = 0.0
    budget: float = 0.0
    t_loop: float = 0.0

    def progress_frac(self) -> float:
        """How far the run is: by updates, or by time when a budget is set (whichever is further)."""
        p = self.step / max(1, self.total_updates)
        if self.budget:
            p = max(p, (self.elapsed_before + time.time() - self.t_loop) / self.budget)
        return p

    def train_size(self) -> int:
        """Input size at the current point of the run (the model's own size after the low-res share)."""
        p = self.progress_frac()
        if not self.low_sizes or p >= self.cfg.low_res_fraction:
            return 0
        return self.low_sizes[min(len(self.low_sizes) - 1, int(p / self.cfg.low_res_fraction * len(self.low_sizes)))]


def _schedule(run: _Run) -> None:
    """Shard the training set across ranks (disjoint, equal length) and size the run."""
    cfg = run.cfg
    run.per_rank = len(run.tr.rows) // run.world
    run.bs = max(2, min(cfg.batch_size, run.per_rank))
    run.steps_per_epoch = max(1, run.per_rank // run.bs)
    updates_per_epoch = max(1, run.steps_per_epoch // max(1, cfg.accum_steps))
    run.total_updates = updates_per_epoch * cfg.epochs
    # the paper's 2,000 warm-up steps, but never more than 5 % of the run
    run.warmup_frac = min(cfg.warmup_steps / max(1, run.total_updates), 0.05)
    run.low_sizes = [int(x) for x in str(cfg.low_res or "").replace(" ", "").split(",") if x and int(x) > 0]


def _resume(run: _Run, last: Path) -> int:
    """Continue from ``last.pt``: model, optimizer, counters. Returns the epoch to start with."""
    import torch

    if not last.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {last}")
    ck = torch.load(last, map_location="cpu", weights_only=False)
    run.model.load_state_dict(ck["model"])
    run.opt.load_state_dict(ck["optimizer"])
    start_epoch, run.step = int(ck["epoch"]) + 1, int(ck["step"])
    run.best, run.best_epoch, run.history = float(ck["best"]), int(ck["best_epoch"]), list(ck.get("history", []))
    run.elapsed_before = float(ck.get("elapsed", 0.0))
    run.writer(event="resume", epoch=start_epoch, step=run.step)
    return start_epoch


def _batch(run: _Run, idx, rng):
    """Images (one random cached frame per clip, augmented, at the current size) and text ids
    (a report snippet per clip) with the report-level positives mask."""
    import cv2
    import torch

    from echonode.model.preprocess import normalize

    cfg, tr = run.cfg, run.tr
    imgs = np.stack([np.asarray(tr.frames[i][rng.integers(len(tr.frames[i]))]) for i in idx])
    if cfg.augment:
        imgs = np.stack([augment(im, rng) for im in imgs])
    size_now = run.train_size()
    if size_now and size_now < imgs.shape[1]:
        imgs = np.stack([cv2.resize(im, (size_now, size_now), interpolation=cv2.INTER_AREA) for im in imgs])
    samples = [run.sampler.sample_with_sentences(tr.rows[i].report, rng) for i in idx]
    ids = np.stack([x[0] for x in samples])
    pos = report_positives([run.report_sets[i] for i in idx], [x[1] for x in samples]) \
        if cfg.positives == "report" else None
    x = normalize(imgs, run.mean, run.std).to(run.device, non_blocking=True)
    if run.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.from_numpy(ids).to(run.device), pos


def _update(run: _Run) -> None:
    """One optimizer update (learning rate from the schedule, gradient clipping, logit scale ≤ 100)."""
    import torch

    for g in run.opt.param_groups:
        g["lr"] = lr_at(run.progress_frac(), run.warmup_frac, run.cfg.lr)
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        run.model.logit_scale.clamp_(0, math.log(100))
    run.step += 1


def _train_epoch(run: _Run, epoch: int, bar) -> tuple[list[float], bool]:
    """One epoch on this rank's shard: ``(losses, stop)``; stop when the time budget is spent."""
    cfg = run.cfg
    rng = np.random.default_rng([cfg.seed, epoch])
    perm = rng.permutation(np.arange(len(run.tr.rows)))[run.rank * run.per_rank:(run.rank + 1) * run.per_rank]
    run.ddp_model.train()
    losses: list[float] = []
    for bi in range(run.steps_per_epoch):
        x, t, pos = _batch(run, perm[bi * run.bs:(bi + 1) * run.bs], rng)
        with (run.autocast() if run.autocast else _null()):
            img_f, txt_f, scale = run.ddp_model(x, t)
            loss = clip_loss(img_f.float(), txt_f.float(), scale.float(),
                             positives=pos.to(run.device) if pos is not None else None)
        (loss / cfg.accum_steps).backward()
        losses.append(float(loss.detach()))
        if (bi + 1) % cfg.accum_steps:
            continue
        _update(run)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{np.mean(losses[-10:]):.3f}")
        if run.main and run.step % max(1, cfg.log_every) == 0:
            run.writer(event="step", epoch=epoch, step=run.step, loss=float(np.mean(losses[-cfg.log_every:])),
                       lr=run.opt.param_groups[0]["lr"], logit_scale=float(run.model.logit_scale.detach().exp()))
        if run.budget and run.progress_frac() >= 1.0:
            return losses, True
    return losses, False


def _validate(run: _Run, epoch: int, losses: list[float], stop: bool, t_ep: float) -> None:
    """MCMRR of clip vs full-report embeddings on the validation split; keeps ``best.pt`` and
    writes ``last.pt`` (the resume point)."""
    import torch

    from train.metrics import retrieval

    cfg, model = run.cfg, run.model
    rec = {"event": "epoch", "epoch": epoch, "step": run.step,
           "train_loss": float(np.mean(losses)) if losses else None, "epoch_seconds": round(time.time() - t_ep, 2)}
    model.eval()
    low_now = 0 if stop else run.train_size()
    if len(run.va.rows) >= 2:
        ie = embed_clips(model, run.va.frames, run.device, run.mean, run.std, n_frames=cfg.val_frames,
                         autocast=run.autocast, size=low_now)
        te = embed_texts(model, run.sampler, [r.report for r in run.va.rows], run.device)
        rr = retrieval(ie, te)
        # collapse diagnostic: mean pairwise cosine of each modality's embeddings
        # (near 1 = every clip or report looks the same to the model)
        rec.update(val_image_cos=round(mean_pairwise_cos(ie), 4), val_text_cos=round(mean_pairwise_cos(te), 4))
        rec.update(val_mcmrr=rr["mcmrr"], val_i2t=rr["image_to_report_mean_rank"],
                   val_t2i=rr["report_to_image_mean_rank"], val_chance=rr["chance_rank"], val_n=rr["n"])
        metric = rr["mcmrr"]
    else:
        metric = float(np.mean(losses)) if losses else float("inf")  # no val split: lowest loss
        rec.update(val_note="no validation split; best by training loss")
    if low_now:
        # validated at the low training size: logged, but only full-size epochs can be "best"
        rec.update(val_size=low_now)
    elif metric < run.best:
        run.best, run.best_epoch = metric, epoch
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, run.ckdir / "best.pt")
    rec.update(best_epoch=run.best_epoch, best=run.best)
    run.history.append(rec)
    run.writer(**rec)
    tmp = run.ckdir / "last.pt.tmp"
    torch.save({"model": model.state_dict(), "optimizer": run.opt.state_dict(), "epoch": epoch, "step": run.step,
                "best": run.best, "best_epoch": run.best_epoch, "history": run.history,
                "elapsed": run.elapsed_before + time.time() - run.t_loop,
                "config": dataclasses.asdict(cfg)}, tmp)
    os.replace(tmp, run.ckdir / "last.pt")


def _progress_bar(run: _Run, show: bool):
    if not (show and run.main):
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=run.total_updates, initial=min(run.step, run.total_updates), desc="train", unit="step",
                file=sys.stderr, disable=not sys.stderr.isatty() and not os.environ.get("ECHONODE_PROGRESS"))


def _stop_everywhere(run: _Run, stop: bool) -> bool:
    """Rank 0 decides (it holds the clock and the validation); the others follow."""
    if run.world == 1:
        return stop
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1 if stop else 0], device=run.device)
    dist.broadcast(flag, 0)
    return bool(flag.item())


def train(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    import cv2
    import torch

    from echonode.model.bundle import write_bundle

    t_start = time.time()
    rank, world, local_rank = _dist()
    main = rank == 0
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
        cv2.setNumThreads(int(cfg.threads))
    out = Path(cfg.out)
    ckdir = out / "checkpoints"
    if main:
        ckdir.mkdir(parents=True, exist_ok=True)
    writer = _Writer(out / "metrics.jsonl", main)
    device = _device(cfg, local_rank)
    use_bf16 = (cfg.precision == "bf16") or (cfg.precision == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)) if use_bf16 else None

    m = _load_model(cfg)
    sampler = _text_sampler(cfg, m.tokenizer_kind)
    model = m.model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)

    # --- data
    manifest = load_manifest(cfg.manifest)
    problems = list(manifest.problems)
    cache = FrameCache(cfg.cache_dir or (out / "cache"), size=m.config.image_size, channel_order=cfg.channel_order)
    tr = prepare_split(manifest, "train", cache, "cache train")
    va = prepare_split(manifest, "val", cache, "cache val")
    problems += tr.problems + va.problems
    sampler.fit(r.report for r in tr.rows)
    value_ranges = trained_value_ranges([r.report for r in tr.rows], m.base_value_ranges)
    for p in problems:
        log.warning("%s", p)
    if len(tr.rows) < 2:
        raise ManifestError(f"{cfg.manifest}: need at least 2 usable training clips, have {len(tr.rows)}")
    writer(event="data", train=len(tr.rows), val=len(va.rows), problems=len(problems))

    ddp_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    run = _Run(cfg=cfg, model=model, ddp_model=ddp_model, opt=_optimizer(cfg, model), sampler=sampler, tr=tr, va=va,
               report_sets=[sampler.sentence_set(r.report) for r in tr.rows], device=device, autocast=autocast,
               writer=writer, ckdir=ckdir, main=main, rank=rank, world=world, mean=m.config.mean, std=m.config.std)
    _schedule(run)
    start_epoch = _resume(run, ckdir / "last.pt") if cfg.resume else 0
    run.budget = cfg.max_minutes * 60.0 if cfg.max_minutes else 0.0
    run.t_loop = time.time()  # the time budget covers the training loop (frame caching is logged apart)
    writer(event="prepared", seconds=round(run.t_loop - t_start, 1))

    bar = _progress_bar(run, progress)
    epoch = start_epoch - 1
    for epoch in range(start_epoch, cfg.epochs):
        t_ep = time.time()
        losses, stop = _train_epoch(run, epoch, bar)
        last_epoch = stop or epoch == cfg.epochs - 1 or (run.budget and run.progress_frac() >= 1.0)
        if main and ((epoch + 1) % max(1, cfg.val_every) == 0 or last_epoch):
            _validate(run, epoch, losses, stop, t_ep)
        if _stop_everywhere(run, stop):
            break
    if bar is not None:
        bar.close()

    bundle_path = out / "bundle"
    if main:
        best_sd = torch.load(ckdir / "best.pt", map_location="cpu", weights_only=True) if (ckdir / "best.pt").is_file() \
            else {k: v.detach().cpu() for k, v in model.state_dict().items()}
        write_bundle(bundle_path, best_sd, name=cfg.name or f"{m.architecture}-trained", architecture=m.architecture,
                     tokenizer_kind=m.tokenizer_kind, demo=cfg.demo, dtype=(cfg.weights_dtype or None),
                     value_ranges=value_ranges,
                     source=f"echonode train: {m.source}; manifest {Path(cfg.manifest).name}; "
                            f"best epoch {run.best_epoch} (val MCMRR {run.best:.3f})", overwrite=True)
        writer(event="done", bundle=str(bundle_path), best_epoch=run.best_epoch, best=run.best, steps=run.step,
               seconds=round(time.time() - t_start, 1))
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(bundle_path, run.best_epoch, run.best, epoch + 1 - start_epoch, run.step,
                       time.time() - t_start, run.history, problems)
