"""The Interpreter: a model bundle + cached prompt embeddings -> an :class:`Interpretation`.

One Interpreter per worker process: it loads the EchoCLIP bundle (and optionally the
EchoCLIP-R bundle) once and embeds every prompt of the task catalogue once per
(weights sha256, tokenizer, precision, prompt text) -- from the on-disk cache under
``cache_dir`` when present, so a restarted worker calls no text encoder at all. The
steady-state cost of a study is the image side only: one batched gradient-free forward
of all sampled frames of all clips, a few matrix products, and for PromptCAM a gradient
through the image tower's head on one frame per configured task.

Several clips of one study are aggregated per task as follows (and each task keeps its
per-clip values):

* binary: the mean cosine over all frames of all clips, i.e. the frame-weighted mean of
  the per-clip scores (a clip with more frames weighs more);
* regression: the reference rank procedure run over the pooled frames of all clips
  (values at each rank averaged over every frame), then the lower median of the top 20 %;
* categorical: per-level mean cosine over all frames of all clips, then the level rule.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

from echonode import __version__
from echonode.interpret import scoring
from echonode.interpret.compare import PriorEmbedding, compare_with_priors, study_embedding as _study_embedding
from echonode.interpret.prompts import Task, load_catalog, task_coding
from echonode.interpret.promptcam import ActivationCapture, head_from_activation, promptcam, promptcam_from_activation
from echonode.model.preprocess import crop_box
from echonode.interpretation import (
    CALL_UNCALIBRATED,
    DEMO_BANNER,
    THRESHOLD_CALIBRATED,
    THRESHOLD_NONE,
    THRESHOLD_PUBLISHED,
    ClipRef,
    ClipValue,
    Interpretation,
    ModelInfo,
    PromptCam,
    TaskResult,
)

log = logging.getLogger(__name__)

__all__ = ["ClipInput", "PriorEmbedding", "Interpreter", "PromptEmbeddingCache", "DEFAULT_PROMPTCAM_TASKS"]

DEFAULT_PROMPTCAM_TASKS = ("pacemaker", "impella", "tavr", "mitraclip")
#: Published thresholds (from the reference code) hold for the published weights' architecture only.
PUBLISHED_THRESHOLD_ARCHITECTURES = ("echo-clip",)
LVEF_CONCEPT = "18043-0"


@dataclass(frozen=True)
class ClipInput:
    """One A4C clip of the study: its reference and its sampled frames (T, H, W, 3) uint8 RGB."""

    ref: ClipRef
    frames: np.ndarray


# ----------------------------------------------------------------------- prompt cache

class PromptEmbeddingCache:
    """Raw text embeddings on disk, one ``.npz`` per (weights sha256, tokenizer, precision).

    Keyed inside by the exact prompt text. Writes are atomic (temporary file + rename)
    and merge with what another process may have written meanwhile.
    """

    def __init__(self, cache_dir: str | os.PathLike | None):
        self.dir = Path(cache_dir).expanduser() / "prompt-embeddings" if cache_dir else None

    def _path(self, sha: str, tokenizer: str, precision: str) -> Optional[Path]:
        if self.dir is None:
            return None
        safe = "".join(c for c in f"{sha[:32]}-{tokenizer}-{precision}" if c.isalnum() or c in "-_")
        return self.dir / f"{safe}.npz"

    def load(self, sha: str, tokenizer: str, precision: str) -> dict[str, np.ndarray]:
        path = self._path(sha, tokenizer, precision)
        if path is None or not path.exists():
            return {}
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["weights_sha256"]) != sha or str(z["tokenizer"]) != tokenizer:
                    return {}
                texts = [str(t) for t in z["texts"]]
                emb = np.asarray(z["embeddings"], dtype=np.float32)
        except Exception as exc:  # a corrupt cache is recomputed, never fatal
            log.warning("prompt embedding cache %s unreadable (%s); recomputing", path, exc)
            return {}
        return dict(zip(texts, emb))

    def save(self, sha: str, tokenizer: str, precision: str, new: Mapping[str, np.ndarray]) -> None:
        path = self._path(sha, tokenizer, precision)
        if path is None or not new:
            return
        from echonode.files import atomic_write

        merged = {**self.load(sha, tokenizer, precision), **new}
        texts = list(merged)
        atomic_write(path, lambda fh: np.savez(
            fh, weights_sha256=np.str_(sha), tokenizer=np.str_(tokenizer), texts=np.array(texts, dtype=np.str_),
            embeddings=np.stack([np.asarray(merged[t], np.float32) for t in texts])))


# --------------------------------------------------------------------------- helpers

def _open_bundle(b):
    if b is None or hasattr(b, "load_model"):
        return b
    from echonode.model.bundle import Bundle
    return Bundle.open(b)


def _calibration_line(cal: Optional[dict]) -> Optional[str]:
    if not cal:
        return None
    p = cal.get("provenance") or {}
    parts = [f"dataset {p.get('dataset', '?')}", f"date {p.get('date', '?')}", f"n={p.get('n', '?')}"]
    if p.get("tool"):
        parts.append(str(p["tool"]))
    return ", ".join(parts)


def _model_info(bundle) -> ModelInfo:
    return ModelInfo(
        name=str(bundle.name), architecture=str(bundle.architecture), weights_sha256=str(bundle.weights_sha256),
        tokenizer=str(bundle.tokenizer_kind), echonode_version=__version__, demo=bool(getattr(bundle, "demo", False)),
        calibration=_calibration_line(getattr(bundle, "calibration", None)),
    )


class _Encoder:
    """One loaded bundle: model, tokenizer, cached text embeddings, counters."""

    def __init__(self, bundle, device: str, precision: str, channel_order: str, cache: PromptEmbeddingCache):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
        self.bundle = bundle
        self.device = torch.device(device)
        self.precision = precision
        self.channel_order = channel_order
        self.cache = cache
        self.model = bundle.load_model(device=str(self.device), precision="fp32")
        self.model.eval()
        self.tokenizer = bundle.tokenizer()
        cfg = getattr(self.model, "config", None) or bundle.config
        self.image_size = int(getattr(cfg, "image_size", 224))
        self.mean = tuple(getattr(cfg, "mean", (0.48145466, 0.4578275, 0.40821073)))
        self.std = tuple(getattr(cfg, "std", (0.26862954, 0.26130258, 0.27577711)))
        self.text_encoder_calls = 0       # forward passes of the text tower
        self.texts_encoded = 0            # prompt texts embedded by the text tower
        self._text: dict[str, np.ndarray] = {}
        self.info = _model_info(bundle)

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # ---- text
    def text_embeddings(self, texts: Sequence[str], batch_size: int = 64, use_cache: bool = True) -> np.ndarray:
        """Raw (unnormalised) float32 embeddings (N, D) of ``texts``, cached per text."""
        want = list(dict.fromkeys(texts))
        missing = [t for t in want if t not in self._text]
        if missing and use_cache:
            disk = self.cache.load(self.info.weights_sha256, self.info.tokenizer, self.precision)
            for t in missing:
                if t in disk:
                    self._text[t] = disk[t]
            missing = [t for t in want if t not in self._text]
        if missing:
            new: dict[str, np.ndarray] = {}
            with torch.inference_mode(), self.autocast():
                for i in range(0, len(missing), batch_size):
                    chunk = missing[i:i + batch_size]
                    ids = self.tokenizer(chunk).to(self.device)
                    out = self.model.encode_text(ids).float().cpu().numpy()
                    self.text_encoder_calls += 1
                    self.texts_encoded += len(chunk)
                    new.update(zip(chunk, out))
            self._text.update(new)
            if use_cache:
                self.cache.save(self.info.weights_sha256, self.info.tokenizer, self.precision, new)
        return np.stack([self._text[t] for t in texts]).astype(np.float32) if texts else np.zeros((0, 0), np.float32)

    # ---- images
    def preprocess(self, frames: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """(T, H, W, 3) uint8 RGB -> (scaled uint8 (T, S, S, 3) in model channel order, normalised tensor)."""
        from echonode.model.preprocess import normalize, scale_frames
        scaled = scale_frames(frames, channel_order=self.channel_order, size=self.image_size)
        return scaled, normalize(scaled, self.mean, self.std)

    def encode(self, x: torch.Tensor, batch_size: int, capture: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Raw image embeddings (N, D) float32 (CPU) and, if ``capture``, last-block activations."""
        outs = []
        with torch.inference_mode(), self.autocast(), ActivationCapture(self.model, enabled=capture) as cap:
            for i in range(0, x.shape[0], batch_size):
                xb = x[i:i + batch_size].to(self.device, non_blocking=True)
                outs.append(self.model.encode_image(xb).float())
        emb = torch.cat(outs, dim=0).cpu() if outs else torch.zeros((0, 0))
        return emb, cap.activations() if capture else None


# ------------------------------------------------------------------------ interpreter

class NoUsableClipError(ValueError):
    """None of a study's clips could be analysed (the study fails; one bad clip alone does not)."""


class Interpreter:
    """EchoCLIP zero-shot interpretation of one study's A4C clips.

    ``bundle``: a :class:`echonode.model.bundle.Bundle` (or its directory) -- EchoCLIP,
    whose tokenizer embeds the task prompts. ``r_bundle``: optional EchoCLIP-R bundle
    (template tokenizer) for the study embedding and the comparison with priors.
    ``tasks``: a catalogue ({id: Task} or a list of Tasks); default the built-in one.
    ``cache_dir``: where prompt embeddings persist (None: memory only).
    ``precision="bf16"``: autocast to bfloat16 (meant for CUDA; the reference ran bf16).
    """

    def __init__(self, bundle, r_bundle=None, *, device: str = "cpu", precision: str = "fp32",
                 channel_order: str = "bgr", tasks=None, promptcam_tasks: Iterable[str] = DEFAULT_PROMPTCAM_TASKS,
                 cache_dir: str | os.PathLike | None = None, batch_size: int = 32, promptcam_cine: bool = False):
        t0 = time.perf_counter()
        cache = PromptEmbeddingCache(cache_dir)
        self.device = device
        self.precision = precision
        self.channel_order = channel_order
        self.batch_size = int(batch_size)
        self.clip = _Encoder(_open_bundle(bundle), device, precision, channel_order, cache)
        self.r: Optional[_Encoder] = None
        if r_bundle is not None:
            rb = _open_bundle(r_bundle)
            if rb.tokenizer_kind != "template":
                raise ValueError(f"EchoCLIP-R bundle {rb.path} uses the {rb.tokenizer_kind!r} tokenizer; "
                                 "the study embedding and report retrieval need the template tokenizer")
            self.r = _Encoder(rb, device, precision, channel_order, cache)
        if tasks is None:
            tasks = load_catalog()
        if not isinstance(tasks, Mapping):
            tasks = {t.id: t for t in tasks}
        self.tasks: dict[str, Task] = dict(tasks)
        self.promptcam_tasks = tuple(t for t in promptcam_tasks)
        # also a map on every analysed frame of the best clip, for a cine overlay
        self.promptcam_cine = bool(promptcam_cine)
        self.calibration: dict = dict(getattr(self.clip.bundle, "calibration", None) or {})
        self._prepare_prompts()
        self.init_seconds = time.perf_counter() - t0
        self._head_ok: Optional[bool] = None

    # ------------------------------------------------------------------ properties
    @property
    def model_info(self) -> ModelInfo:
        return self.clip.info

    @property
    def text_encoder_calls(self) -> int:
        """Text-tower forward passes so far (prompts and reports, both models)."""
        return self.clip.text_encoder_calls + (self.r.text_encoder_calls if self.r else 0)

    # ------------------------------------------------------------------ prompts
    def _prepare_prompts(self) -> None:
        self._task_texts: dict[str, tuple[list[str], list[float]]] = {}
        texts: list[str] = []
        value_range = getattr(getattr(self.clip, "bundle", None), "value_range", None)
        for task in self.tasks.values():
            if task.mode == "regression":
                trained = value_range(task.id) if value_range else None
                ps, vs = scoring.regression_candidates(task.prompts, task.regression_values(trained))
            elif task.mode == "categorical":
                ps, vs = list(task.prompts), list(task.values)
            else:
                ps, vs = list(task.prompts), []
            self._task_texts[task.id] = (ps, vs)
            texts.extend(ps)
        unique = list(dict.fromkeys(texts))
        raw = self.clip.text_embeddings(unique) if unique else np.zeros((0, 1), np.float32)
        normed = scoring.normalize(torch.from_numpy(raw))
        self._text_index = {t: i for i, t in enumerate(unique)}
        self._text_matrix = normed        # (U, D), CPU float32
        self._task_emb = {tid: normed[[self._text_index[p] for p in ps]] for tid, (ps, _) in self._task_texts.items()}

    def prompt_embeddings(self, task_id: str) -> torch.Tensor:
        """L2-normalised embeddings of a task's prompts (regression: every candidate)."""
        return self._task_emb[task_id]

    def embed_texts(self, texts: Sequence[str], which: str = "clip") -> np.ndarray:
        """L2-normalised text embeddings with the bundle's own tokenizer (``which``: clip or r).

        Report texts are not cached on disk (they are not prompts).
        """
        enc = self.clip if which == "clip" else self.r
        if enc is None:
            raise ValueError("no EchoCLIP-R bundle loaded")
        return scoring.normalize(enc.text_embeddings(list(texts), use_cache=False))

    # ------------------------------------------------------------------ thresholds
    def threshold(self, task: Task) -> tuple[Optional[float], str]:
        """(threshold, source) for a binary task: calibration, else published, else none."""
        entry = (self.calibration.get("tasks") or {}).get(task.id)
        if isinstance(entry, Mapping) and isinstance(entry.get("threshold"), (int, float)):
            return float(entry["threshold"]), THRESHOLD_CALIBRATED
        if (task.published_threshold is not None and not self.clip.info.demo
                and self.clip.info.architecture in PUBLISHED_THRESHOLD_ARCHITECTURES):
            return task.published_threshold, THRESHOLD_PUBLISHED
        return None, THRESHOLD_NONE

    def _level_thresholds(self, task: Task) -> dict[int, Optional[float]]:
        cal = self.calibration.get("tasks") or {}
        out: dict[int, Optional[float]] = {}
        for lv in task.levels:
            th = None
            if lv.task and lv.task in self.tasks:
                th, src = self.threshold(self.tasks[lv.task])
                if src != THRESHOLD_CALIBRATED:
                    th = None
            for key in (f"{task.id}:{lv.name}", f"{task.id}:{lv.value}"):
                e = cal.get(key)
                if th is None and isinstance(e, Mapping) and isinstance(e.get("threshold"), (int, float)):
                    th = float(e["threshold"])
            out[lv.value] = th
        return out

    # ------------------------------------------------------------------ encoding
    def encode_frames(self, frames: np.ndarray) -> np.ndarray:
        """L2-normalised EchoCLIP embeddings (T, D) of (T, H, W, 3) uint8 RGB frames."""
        _, x = self.clip.preprocess(frames)
        emb, _ = self.clip.encode(x, self.batch_size)
        return scoring.normalize(emb).numpy()

    def study_embedding(self, clips: Sequence[ClipInput]) -> Optional[np.ndarray]:
        """EchoCLIP-R study embedding: mean of normalised frame embeddings over all clips' frames."""
        if self.r is None or not clips:
            return None
        embs = []
        for c in clips:
            _, x = self.r.preprocess(c.frames)
            e, _ = self.r.encode(x, self.batch_size)
            embs.append(e.numpy())
        return _study_embedding(embs)

    # ------------------------------------------------------------------ scoring
    def score_clips(self, clip_embeddings: Sequence[np.ndarray], sop_uids: Sequence[str]) -> dict[str, TaskResult]:
        """Every task's result from normalised frame embeddings per clip (pure given the prompts)."""
        if not clip_embeddings:
            raise ValueError("no clips to score")
        per_clip = [torch.as_tensor(np.asarray(e, dtype=np.float32)) for e in clip_embeddings]
        pooled = torch.cat(per_clip, dim=0)
        results: dict[str, TaskResult] = {}
        for task in self.tasks.values():
            results[task.id] = self._score_task(task, pooled, per_clip, list(sop_uids))
        return results

    def _score_task(self, task: Task, pooled: torch.Tensor, per_clip: list[torch.Tensor], uids: list[str]) -> TaskResult:
        P = self._task_emb[task.id]
        _, values = self._task_texts[task.id]
        common = dict(task_id=task.id, title=task.title, mode=task.mode, group=task.group, coding=task_coding(task))
        if task.mode == "binary":
            score = scoring.binary_score(pooled, P)
            th, src = self.threshold(task)
            return TaskResult(
                **common, method=scoring.METHOD_BINARY, score=score, call=scoring.binary_call(score, th),
                threshold=th, threshold_source=src,
                per_clip=tuple(ClipValue(u, score=scoring.binary_score(f, P)) for u, f in zip(uids, per_clip)),
                aggregation="mean cosine over all frames of all clips (frame-weighted mean of the per-clip scores)")
        if task.mode == "regression":
            value = scoring.regression_value(pooled, P, values)
            unit = task.unit.value if task.unit else None
            derived = scoring.lvef_derived(value) if task.concept.value == LVEF_CONCEPT else {}
            return TaskResult(
                **common, method=scoring.METHOD_REGRESSION, value=value, unit=unit, derived=derived,
                per_clip=tuple(ClipValue(u, value=scoring.regression_value(f, P, values)) for u, f in zip(uids, per_clip)),
                aggregation="rank procedure over the pooled frames of all clips (values at each rank averaged over every frame)")
        # categorical, reading (a)
        thresholds = self._level_thresholds(task)
        all_levels = [lv.value for lv in task.levels]
        base = min(all_levels)

        def one(frames: torch.Tensor):
            lvl = scoring.categorical_level_scores(frames, P, values)
            chosen, method = scoring.categorical_call(lvl, thresholds, all_levels)
            cols = [i for i, v in enumerate(values) if v != base]
            presence = scoring.binary_score(frames, P[cols]) if cols else None
            return lvl, chosen, method, presence

        lvl, chosen, method, presence = one(pooled)
        names = {lv.value: lv.name for lv in task.levels}
        clip_vals = []
        for u, f in zip(uids, per_clip):
            _, c_chosen, _, c_presence = one(f)
            clip_vals.append(ClipValue(u, score=c_presence, value=None if c_chosen is None else float(c_chosen)))
        category = names.get(chosen) if chosen is not None else None
        src = THRESHOLD_CALIBRATED if method == scoring.METHOD_CATEGORICAL_THRESHOLD else THRESHOLD_NONE
        return TaskResult(
            **common, method=method, score=presence, value=None if chosen is None else float(chosen),
            category=category, call=category if category is not None else CALL_UNCALIBRATED,
            threshold=None, threshold_source=src,
            scores={names[v]: s for v, s in lvl.items()}, per_clip=tuple(clip_vals),
            aggregation="per-level mean cosine over all frames of all clips; score = mean cosine over the prompts of "
                        "every level above the lowest")

    # ------------------------------------------------------------------ PromptCAM
    def _promptcams(self, clips: Sequence[ClipInput], pooled: torch.Tensor, raw: torch.Tensor,
                    acts: Optional[torch.Tensor], scaled: list[np.ndarray], xs: list[torch.Tensor],
                    warnings: list[str]) -> list[PromptCam]:
        offsets = np.cumsum([0] + [len(c.frames) for c in clips])
        cams: list[PromptCam] = []
        for tid in self.promptcam_tasks:
            task = self.tasks.get(tid)
            if task is None:
                continue
            if task.mode == "regression":
                warnings.append(f"PromptCAM not computed for regression task {tid}")
                continue
            ps, _ = self._task_texts[tid]
            P = self._task_emb[tid]
            sims = pooled @ P.T                                   # (N, P)
            flat = int(torch.argmax(sims))
            n, p = divmod(flat, sims.shape[1])
            ci = int(np.searchsorted(offsets, n, side="right") - 1)
            local = n - int(offsets[ci])
            clip = clips[ci]
            size = (self.clip.image_size, self.clip.image_size)
            heat = None
            if acts is not None and self._head_split_ok(acts[n:n + 1], raw[n:n + 1]):
                heat, _ = promptcam_from_activation(self.clip.model, acts[n].to(self.clip.device), P[p], size)
            if heat is None:
                heat, _ = promptcam(self.clip.model, xs[ci][local:local + 1].to(self.clip.device), P[p])
            frame = scaled[ci][local]
            if self.channel_order == "bgr":
                frame = frame[..., ::-1]
            used = clip.ref.frames_used
            source = np.ascontiguousarray(clip.frames[local], dtype=np.uint8)
            cine = {}
            if self.promptcam_cine and acts is not None and self._head_split_ok(acts[n:n + 1], raw[n:n + 1]):
                first = int(offsets[ci])
                maps = [heat if j == local else
                        promptcam_from_activation(self.clip.model, acts[first + j].to(self.clip.device), P[p], size)[0]
                        for j in range(len(clip.frames))]
                cine = dict(cine_heatmaps=np.stack(maps).astype(np.float32),
                            cine_frames=np.ascontiguousarray(clip.frames, dtype=np.uint8),
                            cine_indices=tuple(int(used[j]) if j < len(used) else j for j in range(len(clip.frames))))
            cams.append(PromptCam(
                task_id=tid, prompt=ps[p], sop_instance_uid=clip.ref.sop_instance_uid,
                frame_index=int(used[local]) if local < len(used) else local, score=float(sims[n, p]),
                frame=np.ascontiguousarray(frame, dtype=np.uint8), heatmap=heat,
                # the overlay maps the heat map back onto the full frame through this crop
                source_frame=source, crop=crop_box(*source.shape[:2]), **cine))
        return cams

    def _head_split_ok(self, act: torch.Tensor, raw: torch.Tensor) -> bool:
        """Check once that head(activation) reproduces the image embedding (else full backward)."""
        if self._head_ok is None:
            try:
                with torch.inference_mode(False), torch.no_grad():
                    e = head_from_activation(self.clip.model, act.clone().float().to(self.clip.device)).float().cpu()
                cos = float(torch.nn.functional.cosine_similarity(e, raw.float(), dim=-1).min())
                self._head_ok = cos > 0.999
            except Exception as exc:  # an unexpected trunk layout
                log.info("PromptCAM head split unavailable (%s); using a full backward pass", exc)
                self._head_ok = False
        return bool(self._head_ok)

    # ------------------------------------------------------------------ main entry
    def interpret(self, study_uid: str, clips: Sequence[ClipInput], priors: Sequence[PriorEmbedding] = ()) -> Interpretation:
        """Interpret one study's A4C clips (see :meth:`interpret_with_embedding`)."""
        return self.interpret_with_embedding(study_uid, clips, priors)[0]

    def interpret_with_embedding(self, study_uid: str, clips: Sequence[ClipInput],
                                 priors: Sequence[PriorEmbedding] = ()) -> tuple[Interpretation, Optional[np.ndarray]]:
        """The Interpretation and the EchoCLIP-R study embedding (None without an R bundle).

        The embedding is what the caller stores in SQL with ``r model weights_sha256``.
        """
        t_start = time.perf_counter()
        timings: dict[str, float] = {}
        warnings: list[str] = []
        if not clips:
            raise NoUsableClipError("no clips to interpret")
        t = time.perf_counter()
        usable, scaled, xs = [], [], []
        for c in clips:
            # one bad clip is one bad clip: it is left out with a warning, the others are analysed
            try:
                f = np.asarray(c.frames)
                if f.ndim != 4 or f.shape[-1] != 3 or f.dtype != np.uint8 or f.shape[0] < 1:
                    raise ValueError(f"frames must be (T, H, W, 3) uint8 with T >= 1, got {f.shape} {f.dtype}")
                s, x = self.clip.preprocess(c.frames)
            except Exception as exc:
                log.warning("clip %s not analysed: preprocessing failed: %s", c.ref.sop_instance_uid, exc)
                warnings.append(f"clip {c.ref.sop_instance_uid} not analysed: preprocessing failed "
                                f"({type(exc).__name__}: {exc})")
                continue
            usable.append(c)
            scaled.append(s)
            xs.append(x)
        if not usable:
            raise NoUsableClipError("no clip of the study could be preprocessed (" + "; ".join(warnings) + ")")
        clips = usable
        timings["preprocess"] = time.perf_counter() - t

        t = time.perf_counter()
        want_cam = any(tid in self.tasks for tid in self.promptcam_tasks)
        raw, acts = self.clip.encode(torch.cat(xs, dim=0), self.batch_size, capture=want_cam)
        timings["encode_image"] = time.perf_counter() - t

        t = time.perf_counter()
        pooled = scoring.normalize(raw)
        sizes = [len(c.frames) for c in clips]
        per_clip = list(torch.split(pooled, sizes))
        uids = [c.ref.sop_instance_uid for c in clips]
        tasks = self.score_clips([p.numpy() for p in per_clip], uids)
        timings["scoring"] = time.perf_counter() - t

        t = time.perf_counter()
        cams: list[PromptCam] = []
        if want_cam:
            try:
                cams = self._promptcams(clips, pooled, raw, acts, scaled, xs, warnings)
            except Exception as exc:  # PromptCAM is an aid; never lose the interpretation for it
                log.exception("PromptCAM failed")
                warnings.append(f"PromptCAM failed: {type(exc).__name__}: {exc}")
        timings["promptcam"] = time.perf_counter() - t

        embedding = None
        longitudinal = None
        if self.r is not None:
            t = time.perf_counter()
            embedding = self.study_embedding(clips)
            longitudinal, skipped = compare_with_priors(embedding, priors, self.r.info,
                                                        getattr(self.r.bundle, "calibration", None))
            if skipped:
                warnings.append(f"{len(skipped)} prior study embedding(s) from other EchoCLIP-R weights not compared")
            if longitudinal.priors and longitudinal.threshold_source == THRESHOLD_NONE:
                warnings.append("longitudinal similarity thresholds uncalibrated: similarities reported without flags")
            timings["study_embedding"] = time.perf_counter() - t
        else:
            warnings.append("no EchoCLIP-R model: no study embedding and no comparison with prior studies")

        info = self.clip.info
        if info.demo:
            warnings.insert(0, DEMO_BANNER)
        unc = [r.task_id for r in tasks.values() if r.mode == "binary" and r.threshold_source == THRESHOLD_NONE]
        if unc:
            n_bin = sum(1 for r in tasks.values() if r.mode == "binary")
            which = f"all {n_bin} binary tasks" if len(unc) == n_bin else \
                f"{len(unc)} of {n_bin} binary tasks ({', '.join(unc)})"
            warnings.append(f"uncalibrated thresholds for {which}: scores are reported without a "
                            "present/absent call")
        if info.tokenizer != "clip-bpe":
            warnings.append("zero-shot prompts embedded with the template tokenizer: the published zero-shot "
                            "method uses EchoCLIP with the CLIP BPE tokenizer")

        refs = []
        for c in clips:
            ref = c.ref
            used = tuple(ref.frames_used) or tuple(range(len(c.frames)))
            refs.append(replace(ref, frames_used=used, n_frames=ref.n_frames or len(c.frames)))
        timings["total"] = time.perf_counter() - t_start
        interp = Interpretation(
            study_instance_uid=study_uid, model=info, clips=tuple(refs), tasks=tasks, longitudinal=longitudinal,
            promptcams=tuple(cams), timings={k: round(v, 6) for k, v in timings.items()}, warnings=tuple(warnings))
        return interp, embedding
