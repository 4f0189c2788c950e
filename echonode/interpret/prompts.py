"""The zero-shot task catalogue: every EchoCLIP task, its prompts, and its SR codes.

The built-in catalogue is ``tasks.toml`` beside this module (prompt strings copied from
the MIT-licensed EchoCLIP repository; attribution in that file). A site file in the same
format (settings ``model.tasks_file``) overrides keys of existing tasks, adds tasks, or
drops them (``enabled = false``). Any error -- TOML syntax or meaning -- raises
:class:`TaskCatalogError` (a :class:`~echonode.config.ConfigError`) naming the file and
line at fault, so a bad site file stops the node at start-up.

Task modes:

* ``binary``: ``prompts`` are sentences; score = mean cosine (scoring.binary_score).
* ``regression``: ``prompts`` are templates with ``<#>``; candidates are every template x
  ``range`` (default 0..100); value = top-20 % lower median.
* ``categorical``: ``prompts`` with a parallel ``values`` list (the level of each
  prompt) and ``levels`` (value, name, optional code, optional ``task`` whose calibrated
  threshold grades that level). Scored per level (scoring.categorical_level_scores).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from echonode.config import ConfigError

if TYPE_CHECKING:   # the Interpretation's plain-data type, imported where it is built
    from echonode.interpretation import TaskCoding

BUILTIN_PATH = Path(__file__).with_name("tasks.toml")
PRIVATE_SCHEME = "99ECHONODE"
MODES = ("binary", "regression", "categorical")

# Values of binary findings in the SR (research/dicom-anchors.md §5.5).
PRESENT_CODE = ("121053", "DCM", "Present")
ABSENT_CODE = ("121054", "DCM", "Absent")

_ID_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


class TaskCatalogError(ConfigError):
    """A task catalogue file is malformed; the message names the file and line."""


@dataclass(frozen=True)
class Code:
    """A coded concept: (code value, coding scheme designator, code meaning)."""

    value: str
    scheme: str
    meaning: str

    def as_tuple(self) -> tuple[str, str, str]:
        return (self.value, self.scheme, self.meaning)


@dataclass(frozen=True)
class Level:
    value: int
    name: str
    code: Optional[Code] = None
    task: Optional[str] = None      # binary task whose calibrated threshold grades this level


@dataclass(frozen=True)
class Task:
    id: str
    title: str
    mode: str
    group: str
    prompts: tuple[str, ...]
    concept: Code
    private_code: Code
    values: tuple[int, ...] = ()
    levels: tuple[Level, ...] = ()
    value_range: tuple[int, int] = (0, 100)
    unit: Optional[Code] = None
    site: Optional[Code] = None
    value_code: Optional[Code] = None
    published_threshold: Optional[float] = None
    source: str = ""
    notes: str = ""

    def level(self, value: int) -> Optional[Level]:
        for lv in self.levels:
            if lv.value == value:
                return lv
        return None

    def level_prompts(self, value: int) -> tuple[str, ...]:
        return tuple(p for p, v in zip(self.prompts, self.values) if v == value)

    def regression_values(self, model_range: Optional[tuple[int, int]] = None) -> range:
        """The candidate values: the task's range, narrowed to ``model_range`` (the values the
        model's training reports stated, :meth:`echonode.model.bundle.Bundle.value_range`)
        where the two overlap."""
        lo, hi = self.value_range
        if model_range is not None and max(lo, model_range[0]) <= min(hi, model_range[1]):
            lo, hi = max(lo, model_range[0]), min(hi, model_range[1])
        return range(lo, hi + 1)


# ----------------------------------------------------------------------------- parsing

_FIELDS = {"title", "mode", "group", "prompts", "values", "levels", "range", "unit", "concept", "site",
           "value_code", "private_code", "published_threshold", "source", "notes", "enabled"}


def _line_of(text: str, task_id: str, key: Optional[str] = None) -> Optional[int]:
    """1-based line of ``[tasks.<id>]`` (or of ``key`` inside that table), if found."""
    lines = text.splitlines()
    head = re.compile(r'^\s*\[\s*tasks\s*\.\s*(["\']?)' + re.escape(task_id) + r'\1\s*\]')
    dotted = re.compile(r'^\s*tasks\s*\.\s*(["\']?)' + re.escape(task_id) + r'\1\s*\.')
    start = None
    for i, ln in enumerate(lines):
        if head.match(ln) or dotted.match(ln):
            start = i
            break
    if start is None:
        return None
    if key:
        kre = re.compile(r'^\s*' + re.escape(key) + r'\s*=')
        for j in range(start + (1 if head.match(lines[start]) else 0), len(lines)):
            if j > start and lines[j].lstrip().startswith("["):
                break
            if kre.match(lines[j]):
                return j + 1
    return start + 1


class _Ctx:
    def __init__(self, path: str, text: str):
        self.path, self.text = path, text

    def fail(self, task_id: Optional[str], msg: str, key: Optional[str] = None) -> TaskCatalogError:
        line = _line_of(self.text, task_id, key) if task_id else None
        where = f"{self.path}:{line}" if line else self.path
        who = f"task {task_id!r}: " if task_id else ""
        return TaskCatalogError(f"{where}: {who}{msg}")


def _code(ctx: _Ctx, tid: str, key: str, v: Any) -> Code:
    if (isinstance(v, list) and len(v) == 3 and all(isinstance(x, str) and x for x in v)):
        c = Code(*v)
    elif isinstance(v, dict) and set(v) == {"value", "scheme", "meaning"} and all(isinstance(x, str) and x for x in v.values()):
        c = Code(v["value"], v["scheme"], v["meaning"])
    else:
        raise ctx.fail(tid, f"{key} must be [code value, scheme designator, meaning] (three non-empty strings), got {v!r}", key)
    if len(c.value) > 16:
        raise ctx.fail(tid, f"{key}: code value {c.value!r} longer than 16 characters (DICOM SH)", key)
    if len(c.meaning) > 64:
        raise ctx.fail(tid, f"{key}: code meaning longer than 64 characters (DICOM LO)", key)
    return c


def _read(path: Path) -> tuple[dict, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TaskCatalogError(f"task file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskCatalogError(f"{path}: cannot read: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # the message carries "(at line L, column C)"
        m = re.search(r"line (\d+)", str(exc))
        where = f"{path}:{m.group(1)}" if m else str(path)
        raise TaskCatalogError(f"{where}: TOML syntax error: {exc}") from None
    return data, text


def _raw_tables(data: dict, ctx: _Ctx) -> dict[str, dict]:
    unknown = sorted(set(data) - {"tasks"})
    if unknown:
        raise ctx.fail(None, f"unknown top-level key(s) {', '.join(unknown)}; expected [tasks.ID] tables")
    tasks = data.get("tasks", {})
    if not isinstance(tasks, dict):
        raise ctx.fail(None, "'tasks' must be a table of [tasks.ID] tables")
    for tid, t in tasks.items():
        if not _ID_RE.match(tid):
            raise ctx.fail(tid, "task id must be lower-case letters, digits and '_' (start with a letter, at most 64)")
        if not isinstance(t, dict):
            raise ctx.fail(tid, "must be a table")
        unknown = sorted(set(t) - _FIELDS)
        if unknown:
            raise ctx.fail(tid, f"unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_FIELDS))}", unknown[0])
    return tasks


def _build(tid: str, t: dict, ctx: _Ctx) -> Task:
    def req(key: str, typ: type, what: str) -> Any:
        if key not in t:
            raise ctx.fail(tid, f"missing required key {key!r}")
        v = t[key]
        if not isinstance(v, typ) or isinstance(v, bool) and typ is not bool:
            raise ctx.fail(tid, f"{key} must be {what}, got {v!r}", key)
        return v

    title = req("title", str, "a string")
    mode = req("mode", str, "a string")
    if mode not in MODES:
        raise ctx.fail(tid, f"mode must be one of {', '.join(MODES)}, got {mode!r}", "mode")
    group = t.get("group", "")
    if not isinstance(group, str):
        raise ctx.fail(tid, "group must be a string", "group")
    prompts = req("prompts", list, "a list of strings")
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ctx.fail(tid, "prompts must be a non-empty list of non-empty strings", "prompts")
    concept = _code(ctx, tid, "concept", req("concept", (list, dict), "a code"))
    private = _code(ctx, tid, "private_code", t["private_code"]) if "private_code" in t else \
        Code(tid.upper().replace("_", "-")[:16], PRIVATE_SCHEME, title[:64])
    kw: dict[str, Any] = {}
    for key in ("site", "value_code", "unit"):
        if key in t:
            kw[key] = _code(ctx, tid, key, t[key])
    for key in ("source", "notes"):
        if key in t:
            if not isinstance(t[key], str):
                raise ctx.fail(tid, f"{key} must be a string", key)
            kw[key] = t[key]
    if "published_threshold" in t:
        th = t["published_threshold"]
        if isinstance(th, bool) or not isinstance(th, (int, float)) or not -1.0 <= th <= 1.0:
            raise ctx.fail(tid, f"published_threshold must be a number in [-1, 1] (a cosine), got {th!r}", "published_threshold")
        if mode == "regression":
            raise ctx.fail(tid, "published_threshold applies to binary and categorical tasks only", "published_threshold")
        kw["published_threshold"] = float(th)

    if mode == "regression":
        bad = [p for p in prompts if "<#>" not in p]
        if bad:
            raise ctx.fail(tid, f"regression template without <#> placeholder: {bad[0]!r}", "prompts")
        rng = t.get("range", [0, 100])
        if (not isinstance(rng, list) or len(rng) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in rng)
                or rng[0] >= rng[1]):
            raise ctx.fail(tid, f"range must be [low, high] integers with low < high, got {rng!r}", "range")
        kw["value_range"] = (rng[0], rng[1])
        for key in ("values", "levels"):
            if key in t:
                raise ctx.fail(tid, f"{key} is for categorical tasks only", key)
    elif mode == "binary":
        bad = [p for p in prompts if "<#>" in p]
        if bad:
            raise ctx.fail(tid, f"binary prompt contains the <#> placeholder: {bad[0]!r}", "prompts")
        for key in ("values", "levels", "range"):
            if key in t:
                raise ctx.fail(tid, f"{key} is not used by binary tasks", key)
    else:  # categorical
        values = req("values", list, "a list of integers")
        if len(values) != len(prompts) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ctx.fail(tid, f"values must be {len(prompts)} integers, one per prompt", "values")
        levels_raw = req("levels", list, "a list of {value, name} tables")
        levels = []
        seen = set()
        for lv in levels_raw:
            if not isinstance(lv, dict) or not isinstance(lv.get("value"), int) or isinstance(lv.get("value"), bool) \
                    or not isinstance(lv.get("name"), str) or set(lv) - {"value", "name", "code", "task"}:
                raise ctx.fail(tid, f"each level needs integer value and string name (optional code, task), got {lv!r}", "levels")
            if lv["value"] in seen:
                raise ctx.fail(tid, f"level value {lv['value']} given twice", "levels")
            seen.add(lv["value"])
            code = _code(ctx, tid, "levels", lv["code"]) if "code" in lv else None
            task_ref = lv.get("task")
            if task_ref is not None and not isinstance(task_ref, str):
                raise ctx.fail(tid, "level task must be a task id string", "levels")
            levels.append(Level(lv["value"], lv["name"], code, task_ref))
        missing = sorted(set(values) - seen)
        if missing:
            raise ctx.fail(tid, f"values {missing} have no level in 'levels'", "values")
        kw["values"] = tuple(values)
        kw["levels"] = tuple(sorted(levels, key=lambda x: x.value))
        if "range" in t:
            raise ctx.fail(tid, "range is for regression tasks only", "range")
    return Task(id=tid, title=title, mode=mode, group=group, prompts=tuple(prompts), concept=concept,
                private_code=private, **kw)


def load_catalog(tasks_file: str | Path | None = None) -> dict[str, Task]:
    """The task catalogue: built-in tasks, then the site file's overrides and additions.

    Returns an ordered dict {task id: Task}. Raises TaskCatalogError naming file:line.
    """
    data, text = _read(BUILTIN_PATH)
    bctx = _Ctx(str(BUILTIN_PATH), text)
    merged: dict[str, tuple[dict, _Ctx]] = {tid: (dict(t), bctx) for tid, t in _raw_tables(data, bctx).items()}
    if tasks_file:
        path = Path(tasks_file).expanduser()
        sdata, stext = _read(path)
        sctx = _Ctx(str(path), stext)
        for tid, t in _raw_tables(sdata, sctx).items():
            enabled = t.get("enabled", True)
            if not isinstance(enabled, bool):
                raise sctx.fail(tid, "enabled must be true or false", "enabled")
            if not enabled:
                merged.pop(tid, None)
                continue
            if tid in merged:
                base = merged[tid][0]
                if "mode" in t and t["mode"] != base.get("mode"):
                    # a new mode makes the old mode-specific keys meaningless
                    base = {k: v for k, v in base.items() if k not in ("values", "levels", "range", "published_threshold")}
                merged[tid] = ({**base, **t}, sctx)
            else:
                merged[tid] = (dict(t), sctx)
    tasks: dict[str, Task] = {}
    for tid, (t, ctx) in merged.items():
        t = {k: v for k, v in t.items() if k != "enabled"}
        tasks[tid] = _build(tid, t, ctx)
    # cross-references: a level's grading task must exist and be binary
    for task in tasks.values():
        for lv in task.levels:
            if lv.task is not None and (lv.task not in tasks or tasks[lv.task].mode != "binary"):
                ctx = merged[task.id][1]
                raise ctx.fail(task.id, f"level {lv.name!r} refers to task {lv.task!r}, which is not a binary task in the catalogue", "levels")
    return tasks


def task_coding(task: Task) -> "TaskCoding":
    """The task's codes as plain data for the Interpretation (the SR builder reads them from
    there: the DICOM side never reads the catalogue)."""
    from echonode.interpretation import TaskCoding

    def t(c: Optional[Code]):
        return None if c is None else c.as_tuple()
    return TaskCoding(concept=task.concept.as_tuple(), private=task.private_code.as_tuple(), site=t(task.site),
                      unit=t(task.unit), value_code=t(task.value_code),
                      levels=tuple((lv.value, lv.code.as_tuple()) for lv in task.levels if lv.code is not None),
                      notes=task.notes)
