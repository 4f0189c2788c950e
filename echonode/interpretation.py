"""The Interpretation: the one contract between the model side and the DICOM side.

The interpreter (``echonode.interpret.engine``) produces it; the SR writer, the overlay
writer, the SQL store and ``echonode status`` read it. None of them re-derives a
number. This module imports neither torch nor pydicom (numpy only, for PromptCAM
arrays), so both sides can import it.

Everything except the PromptCAM pixel arrays round-trips through ``to_dict`` /
``from_dict`` (JSON-safe), which is how it is stored in SQL and printed by
``echonode analyze --json``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

#: Shown wherever a result computed with the tiny phantom-trained demo model appears.
DEMO_BANNER = "DEMO MODEL — NOT FOR CLINICAL USE"

#: Shown in every result: what these numbers are.
DISCLAIMER = ("Automated zero-shot estimates from the EchoCLIP vision-language model; "
              "for review by a physician, not a diagnosis.")

# threshold_source values
THRESHOLD_CALIBRATED = "calibrated"      # from the bundle's calibration file
THRESHOLD_PUBLISHED = "published"        # from the paper / reference code (pacemaker 0.298)
THRESHOLD_NONE = "uncalibrated"          # no threshold: score only, no yes/no call

# call values for binary tasks
CALL_PRESENT = "present"
CALL_ABSENT = "absent"
CALL_UNCALIBRATED = "uncalibrated"


@dataclass(frozen=True)
class ModelInfo:
    """Provenance of the model that produced a result."""

    name: str                     # bundle name, e.g. "echo-clip"
    architecture: str             # "echo-clip", "echo-clip-r", "tiny"
    weights_sha256: str
    tokenizer: str                # "clip-bpe" or "template"
    echonode_version: str
    demo: bool = False            # tiny phantom-trained model: never for clinical use
    calibration: Optional[str] = None  # provenance line of the calibration used, if any


@dataclass(frozen=True)
class ClipRef:
    """One analysed clip (a DICOM instance, or a video file in offline use)."""

    sop_instance_uid: str
    series_instance_uid: str = ""
    sop_class_uid: str = ""
    path: str = ""
    n_frames: int = 0             # frames in the clip
    frames_used: tuple[int, ...] = ()  # frame indices that were embedded


@dataclass(frozen=True)
class ClipValue:
    """A task's score or value on one clip."""

    sop_instance_uid: str
    score: Optional[float] = None
    value: Optional[float] = None


#: A coded concept as plain data: (code value, coding scheme designator, code meaning).
CodeTuple = tuple[str, str, str]


@dataclass(frozen=True)
class TaskCoding:
    """How a task is coded in DICOM, copied from the task catalogue the Interpreter used
    (built-in ``tasks.toml`` plus the site's ``model.tasks_file``).

    It travels inside the result so that every writer (SR, page, a rebuild from SQL)
    codes the task exactly as the catalogue in use did, without reading the catalogue.
    """

    concept: CodeTuple
    private: CodeTuple
    site: Optional[CodeTuple] = None
    unit: Optional[CodeTuple] = None
    value_code: Optional[CodeTuple] = None
    levels: tuple[tuple[int, CodeTuple], ...] = ()     # categorical level value -> code
    notes: str = ""

    @classmethod
    def from_dict(cls, d: dict) -> "TaskCoding":
        def code(x):
            return None if x is None else (str(x[0]), str(x[1]), str(x[2]))
        return cls(concept=code(d["concept"]), private=code(d["private"]), site=code(d.get("site")),
                   unit=code(d.get("unit")), value_code=code(d.get("value_code")),
                   levels=tuple((int(v), code(c)) for v, c in d.get("levels", ())), notes=d.get("notes", ""))


@dataclass(frozen=True)
class TaskResult:
    """One zero-shot task's result for the study.

    * binary: ``score`` is the mean cosine; ``call`` is present/absent when a threshold
      exists, else ``uncalibrated``.
    * regression: ``value`` in ``unit`` (LVEF %, PASP mm[Hg]); ``derived`` holds calls
      such as ``lvef_lt_50``.
    * categorical: ``value`` is the chosen level's numeric value, ``category`` its name,
      ``scores`` per level (see ``method``).
    """

    task_id: str
    title: str
    mode: str                              # "binary" | "regression" | "categorical"
    method: str                            # how the number was computed (human-readable id)
    score: Optional[float] = None
    value: Optional[float] = None
    unit: Optional[str] = None
    category: Optional[str] = None
    call: Optional[str] = None
    threshold: Optional[float] = None
    threshold_source: str = THRESHOLD_NONE
    scores: dict[str, float] = field(default_factory=dict)   # categorical: level -> score
    derived: dict[str, Optional[bool]] = field(default_factory=dict)
    per_clip: tuple[ClipValue, ...] = ()
    aggregation: str = ""                  # how per-clip values became the study value
    group: str = ""                        # "device", "chamber", "lv", "pericardium", "function", ...
    coding: Optional[TaskCoding] = None    # None: a task no catalogue codes (the SR uses a fallback code)


@dataclass(frozen=True)
class PriorComparison:
    study_instance_uid: str
    study_date: str                        # DICOM DA (YYYYMMDD) or ""
    similarity: float
    most_recent: bool = False
    most_similar: bool = False


@dataclass(frozen=True)
class Longitudinal:
    """EchoCLIP-R comparison with the same patient's earlier studies. For review only."""

    model: ModelInfo
    priors: tuple[PriorComparison, ...] = ()
    same_patient_threshold: Optional[float] = None
    change_threshold: Optional[float] = None
    threshold_source: str = THRESHOLD_NONE
    possible_patient_mismatch: Optional[bool] = None   # None: uncalibrated or no prior
    marked_change: Optional[bool] = None
    note: str = ("Similarity flags compare image embeddings only; they prompt review and "
                 "do not establish identity or clinical change.")

    @property
    def reference(self) -> Optional[PriorComparison]:
        """The prior the flags are about: the most recent one."""
        for p in self.priors:
            if p.most_recent:
                return p
        return self.priors[0] if self.priors else None


@dataclass(frozen=True)
class PromptCam:
    """A PromptCAM saliency map for one task's prompt on the best-matching frame."""

    ARRAYS = ("frame", "heatmap", "source_frame", "cine_heatmaps", "cine_frames")  # left out of to_dict() unless asked

    task_id: str
    prompt: str
    sop_instance_uid: str
    frame_index: int
    score: float
    frame: Any = None      # np.ndarray (H, W, 3) uint8 RGB, the frame as the model saw it
    heatmap: Any = None    # np.ndarray (H, W) float32 in [0, 1], same H, W as frame
    # Where ``frame`` came from: the full decoded source frame (Rows, Columns, 3) uint8 RGB
    # and the (top, left, height, width) region of it that preprocessing cropped and
    # resized into ``frame``. Empty/None: ``frame`` is the whole source frame.
    source_frame: Any = None
    crop: tuple[int, ...] = ()
    # With ``model.promptcam_cine``: the map on every analysed frame of the same clip,
    # (T, H, W) float32 like ``heatmap``, the full source frames (T, Rows, Columns, 3)
    # and their frame indices in the clip.
    cine_heatmaps: Any = None
    cine_frames: Any = None
    cine_indices: tuple[int, ...] = ()


@dataclass(frozen=True)
class ResultRef:
    """A result SR already published for an earlier version of the same study: the one a
    new SR replaces (its Predecessor Documents Sequence, PS3.3 C.17.2)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    study_version: int = 0


@dataclass(frozen=True)
class Interpretation:
    """Everything echonode concluded about one study.

    ``study_version``: which version of the study (it grows when an instance arrives after
    the study was analysed) the result covers; 0 when there is none (offline analysis).
    It enters the UIDs of the SR, page and overlays, so every version is a new object.
    ``replaces``: the SR of the earlier version this result supersedes, if any.
    """

    study_instance_uid: str
    model: ModelInfo
    clips: tuple[ClipRef, ...]
    tasks: dict[str, TaskResult]
    longitudinal: Optional[Longitudinal] = None
    promptcams: tuple[PromptCam, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)   # seconds per stage
    warnings: tuple[str, ...] = ()
    disclaimer: str = DISCLAIMER
    study_version: int = 0
    replaces: Optional[ResultRef] = None

    @property
    def demo(self) -> bool:
        return self.model.demo

    # ------------------------------------------------------------------ JSON
    def to_dict(self, include_arrays: bool = False) -> dict:
        """JSON-safe dict. PromptCAM arrays are left out unless ``include_arrays``."""
        def conv(obj: Any) -> Any:
            if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
                d = {}
                for f in dataclasses.fields(obj):
                    v = getattr(obj, f.name)
                    if isinstance(obj, PromptCam) and f.name in PromptCam.ARRAYS:
                        if not include_arrays:
                            continue
                        v = None if v is None else np.asarray(v).tolist()
                    d[f.name] = conv(v)
                return d
            if isinstance(obj, dict):
                return {str(k): conv(v) for k, v in obj.items()}
            if isinstance(obj, (list, tuple)):
                return [conv(v) for v in obj]
            if isinstance(obj, np.generic):
                return obj.item()
            return obj
        d = conv(self)
        if self.demo:
            d["banner"] = DEMO_BANNER
        return d

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "Interpretation":
        def mi(x: Optional[dict]) -> Optional[ModelInfo]:
            return None if x is None else ModelInfo(**x)

        tasks = {}
        for k, t in d["tasks"].items():
            t = dict(t)
            t["per_clip"] = tuple(ClipValue(**c) for c in t.get("per_clip", ()))
            if t.get("coding") is not None:
                t["coding"] = TaskCoding.from_dict(t["coding"])
            tasks[k] = TaskResult(**t)
        lon = d.get("longitudinal")
        if lon is not None:
            lon = dict(lon)
            lon["model"] = mi(lon["model"])
            lon["priors"] = tuple(PriorComparison(**p) for p in lon.get("priors", ()))
            lon = Longitudinal(**lon)
        cams = []
        for c in d.get("promptcams", ()):
            c = dict(c)
            for key in PromptCam.ARRAYS:
                if c.get(key) is not None:
                    c[key] = np.asarray(c[key], dtype=np.float32 if key.endswith("heatmaps") or key == "heatmap"
                                        else np.uint8)
            for key in ("crop", "cine_indices"):
                if key in c:
                    c[key] = tuple(int(v) for v in c[key])
            cams.append(PromptCam(**c))
        return cls(
            study_instance_uid=d["study_instance_uid"],
            model=mi(d["model"]),
            clips=tuple(ClipRef(**{**c, "frames_used": tuple(c.get("frames_used", ()))}) for c in d["clips"]),
            tasks=tasks,
            longitudinal=lon,
            promptcams=tuple(cams),
            timings=dict(d.get("timings", {})),
            warnings=tuple(d.get("warnings", ())),
            disclaimer=d.get("disclaimer", DISCLAIMER),
            study_version=int(d.get("study_version") or 0),
            replaces=None if not d.get("replaces") else ResultRef(**d["replaces"]),
        )

    @classmethod
    def from_json(cls, s: str) -> "Interpretation":
        return cls.from_dict(json.loads(s))
