"""Frames and text for training and evaluation.

* :class:`FrameCache` decodes each clip once (DICOM via :func:`echonode.dicom.frames.load_clip`,
  or AVI/MP4), keeps the reference's frames 0, 2, …, 38, crops and scales them exactly as the
  inference path does (:func:`echonode.model.preprocess.scale_frames`, model channel order)
  and stores them as uint8 ``.npy`` under the cache directory, so an epoch only reads
  memory-mapped arrays. Unreadable clips are reported and skipped.
* :class:`TextSampler` turns a report into token ids: for the CLIP BPE tokenizer a random
  *snippet* (a random subset of the report's sentences, in report order, that fits in the
  77-token context — the paper trained EchoCLIP on report snippets); for the template
  tokenizer the full report (EchoCLIP-R). Snippets keep 40-100 % of the sentences (then
  drop random ones until they fit), rare sentences more often, so that a snippet seldom
  says only boiler-plate that fits many clips of a batch equally well (the demo model's
  ``TRAINING.md`` records the measurements).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from train.manifest import Row

log = logging.getLogger(__name__)

_SENTENCE = re.compile(r".+?(?:\.\s+|\.$|$)", re.S)


class DataError(Exception):
    """A clip could not be decoded."""


def split_sentences(report: str) -> list[str]:
    """Sentences of a report, each keeping its period (``"A. B. "`` → ``["A. ", "B. "]``).

    Decimal points (``4.0CM``) do not split: a sentence ends at a period followed by
    white space or the end of the text.
    """
    text = " ".join(report.split())
    out = []
    start = 0
    for m in re.finditer(r"\.(\s+|$)", text):
        out.append(text[start:m.end()].strip() + " ")
        start = m.end()
    if start < len(text):
        out.append(text[start:].strip() + " ")
    return [s for s in out if s.strip()]


def _shape(sentence: str) -> str:
    """A sentence with its numbers blanked (``LV EJECTION FRACTION IS #%.``): measurement
    sentences count as one kind for the sentence frequencies."""
    return re.sub(r"\d+(?:\.\d+)?", "#", sentence)


class FrameCache:
    def __init__(self, cache_dir, size: int = 224, channel_order: str = "bgr", limit: int = 40,
                 stride: int = 2):
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.size, self.channel_order, self.limit, self.stride = int(size), channel_order, limit, stride

    def _file(self, row: Row) -> Path:
        return self.dir / f"{row.key}-{self.size}-{self.channel_order}-{self.limit}-{self.stride}.npy"

    def get(self, row: Row, mmap: bool = True) -> np.ndarray:
        """(K, S, S, 3) uint8 frames of ``row`` in model channel order."""
        f = self._file(row)
        if f.is_file():
            try:
                return np.load(f, mmap_mode="r" if mmap else None)
            except (OSError, ValueError):
                f.unlink(missing_ok=True)
        from echonode.files import atomic_write

        arr = self.decode(row)
        atomic_write(f, lambda fh: np.save(fh, arr))
        return np.load(f, mmap_mode="r") if mmap else arr

    def decode(self, row: Row) -> np.ndarray:
        from echonode.dicom.frames import count_frames, load_clip
        from echonode.model.preprocess import sample_indices, scale_frames

        try:
            n = count_frames(row.path)
            idx = sample_indices(n, limit=self.limit, stride=self.stride)
            if not idx:
                raise DataError(f"row {row.index}: no frames")
            clip = load_clip(row.path, indices=idx)
            frames = clip.frames
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - a decoder plugin may raise anything on a corrupt file
            # the class only: a decoder's text can quote header values of files exported
            # from the node's database (train --from-db), and this message is logged
            raise DataError(f"row {row.index}: cannot decode {row.path.name}: {type(exc).__name__}") from None
        if frames is None or len(frames) == 0:
            raise DataError(f"row {row.index}: no frames decoded")
        return np.ascontiguousarray(scale_frames(frames, channel_order=self.channel_order, size=self.size))

    def prepare(self, rows: Sequence[Row], desc: str = "frames") -> tuple[list[Row], list[np.ndarray], list[str]]:
        """Decode/cache every row; returns (good rows, their frame arrays, problems)."""
        good, arrays, problems = [], [], []
        bar = _bar(len(rows), desc)
        for row in rows:
            try:
                arrays.append(self.get(row))
                good.append(row)
            except DataError as exc:
                problems.append(str(exc) + "; skipped")
                log.warning("%s; skipped", exc)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return good, arrays, problems


def _bar(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, unit="clip", file=sys.stderr, leave=False,
                disable=not sys.stderr.isatty() and not os.environ.get("ECHONODE_PROGRESS"))


class TextSampler:
    """Report → (77,) token ids for training (snippets for BPE, full report for template)."""

    def __init__(self, tokenizer, snippets: Optional[bool] = None, full_report_prob: float = 0.1,
                 keep: tuple[float, float] = (0.4, 1.0)):
        import torch  # noqa: F401

        lo, hi = float(keep[0]), float(keep[1])
        if not (0.0 < lo <= hi <= 1.0):
            raise ValueError(f"snippet keep range must satisfy 0 < LO <= HI <= 1, got {keep}")
        self.keep = (lo, hi)
        self.tok = tokenizer
        self.kind = getattr(tokenizer, "kind", "clip-bpe")
        self.snippets = (self.kind == "clip-bpe") if snippets is None else bool(snippets)
        self.full_report_prob = full_report_prob
        self.context = int(getattr(tokenizer, "context_length", 77))
        self._sent_cache: dict[str, tuple[list[str], list[list[int]], np.ndarray]] = {}
        self._full_cache: dict[str, np.ndarray] = {}
        self._freq: dict[str, float] = {}

    def fit(self, reports: Iterable[str]) -> None:
        """Sentence frequencies over the training reports (text only): rare sentences are
        kept in snippets more often than boiler-plate ones, so a finding that few reports
        mention still reaches the contrastive loss."""
        from collections import Counter

        reports = list(reports)
        c = Counter(_shape(x) for r in reports for x in set(split_sentences(r)))
        n = max(1, len(reports))
        self._freq = {k: v / n for k, v in c.items()}
        self._sent_cache.clear()  # it holds frequencies

    def full(self, report: str) -> np.ndarray:
        ids = self._full_cache.get(report)
        if ids is None:
            ids = self.tok([report])[0].numpy().astype(np.int64)
            self._full_cache[report] = ids
        return ids

    def _sentences(self, report: str) -> tuple[list[str], list[list[int]], np.ndarray]:
        """(sentences with normalised white space, their token ids, their training-report
        frequencies), computed once per report: sampling runs on every training step."""
        s = self._sent_cache.get(report)
        if s is None:
            texts = split_sentences(report)
            s = ([" ".join(x.split()) for x in texts], [self.tok.encode(x) for x in texts],
                 np.array([self._freq.get(_shape(x), 0.5) for x in texts], dtype=float))
            self._sent_cache[report] = s
        return s

    def sentence_set(self, report: str) -> frozenset:
        """The report's sentences (normalised white space), for :meth:`sample_with_sentences`."""
        return frozenset(self._sentences(report)[0])

    def sample(self, report: str, rng: np.random.Generator) -> np.ndarray:
        return self.sample_with_sentences(report, rng)[0]

    def sample_with_sentences(self, report: str, rng: np.random.Generator) -> tuple[np.ndarray, Optional[frozenset]]:
        """(token ids, the sentences they say) — the sentences are ``None`` for a full
        report (which the context may truncate), so only the report itself matches it."""
        if not self.snippets or rng.random() < self.full_report_prob:
            return self.full(report), None
        texts, sents, freq = self._sentences(report)
        if not sents:
            return self.full(report), None
        # a share of the sentences, rare ones (devices, grades) kept more often
        keep_p = rng.uniform(*self.keep)
        p = np.clip(keep_p * np.sqrt(0.5 / np.maximum(freq, 0.02)), 0.0, 0.9) if self._freq \
            else np.full(len(sents), keep_p)
        chosen = list(np.flatnonzero(rng.random(len(sents)) < p))
        if not chosen:
            chosen = [int(rng.integers(len(sents)))]
        # fit the context: drop sentences until it fits, frequent (boiler-plate) ones first
        # in proportion to how many training reports say them
        budget = self.context - 2
        while sum(len(sents[i]) for i in chosen) > budget and len(chosen) > 1:
            w = np.maximum(freq[chosen], 1e-3)
            chosen.pop(int(rng.choice(len(chosen), p=w / w.sum())))
        ids = [t for i in sorted(chosen) for t in sents[i]]
        said = frozenset(texts[i] for i in chosen) if len(ids) <= budget else None
        ids = ids[:budget]
        out = np.zeros(self.context, dtype=np.int64)
        seq = [self.tok.sot_id] + ids + [self.tok.eot_id]
        out[:len(seq)] = seq
        return out, said
