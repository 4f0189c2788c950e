"""``echonode analyze``: run the zero-shot Interpretation on files, offline, as the node would.

DICOM files are grouped by StudyInstanceUID (one Interpretation per study, all its files
as its A4C clips); every video file (AVI, MP4, ...) is a pseudo-study of its own with a
deterministic ``2.25.`` UID derived from its path. Frames are sampled exactly as the
worker samples them (``model.frames`` frames at ``model.frame_stride`` from frame 0) and
decoded with :func:`echonode.dicom.frames.load_clip`.

Output: a readable table per study, or with ``--json`` one JSON object per study (one
per line): ``{"study_instance_uid", "model", "tasks": {ID: {"mode", "score" | "value",
"call", "threshold", "threshold_source", ...}}, "clips", "promptcams", "longitudinal",
"warnings", "timings", "disclaimer"[, "banner"]}``.

``--out DIR``: for DICOM studies writes ``DIR/<study uid>/`` with the SR, the PromptCAM
Secondary Captures and ``interpretation.json``; video studies have no DICOM source, so
only ``interpretation.json`` is written for them.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

VIDEO_SUFFIXES = {".avi", ".mp4", ".mov", ".m4v", ".mkv", ".wmv", ".mpg", ".mpeg", ".webm"}


def register(sub, parents):
    p = sub.add_parser(
        "analyze", parents=parents,
        help="run the EchoCLIP zero-shot interpretation on DICOM or video files (offline)",
        description="Interpret DICOM (or video) echo clips exactly as the node would: files are grouped "
                    "by study, frames sampled as the worker samples them, every catalogue task scored. "
                    "Results are automated zero-shot estimates for review by a physician, not a diagnosis.")
    p.add_argument("files", nargs="+", metavar="FILE", help="DICOM files (A4C clips) or video files")
    p.add_argument("--model", metavar="DIR", help="EchoCLIP bundle directory (default: the configured model)")
    p.add_argument("--r-model", metavar="DIR",
                   help="EchoCLIP-R bundle directory for the study embedding (default: the configured one, if any)")
    p.add_argument("--json", action="store_true", help="one JSON object per study on stdout")
    p.add_argument("--out", metavar="DIR", help="write the SR, PromptCAM overlays and interpretation.json here")
    p.add_argument("--device", help="torch device (default: model.device, e.g. cpu or cuda)")
    p.add_argument("--precision", choices=("fp32", "bf16"), help="default: model.precision")
    p.add_argument("--no-promptcam", action="store_true", help="skip PromptCAM maps")
    p.set_defaults(func=run)


def pseudo_study_uid(path: Path) -> str:
    """A deterministic UID for a video file (no DICOM study): 2.25.<128 bits of sha256(path)>."""
    digest = hashlib.sha256(str(path.resolve()).encode("utf-8")).digest()[:16]
    return "2.25." + str(int.from_bytes(digest, "big"))


def _valid_uid(uid: str) -> bool:
    """Safe as a path component: the node's own UID check (echonode.dicom.uids, lenient form)."""
    from echonode.dicom.uids import is_valid_uid

    return is_valid_uid(uid, strict=False)


def _err(msg: str) -> None:
    print(f"echonode analyze: {msg}", file=sys.stderr)


def _group_files(paths: list[Path]) -> tuple[dict, list[str]]:
    """{study uid: {"video": bool, "files": [(path, dataset or None)]}} in argument order."""
    import pydicom

    studies: dict[str, dict] = {}
    problems: list[str] = []
    for p in paths:
        if p.suffix.lower() in VIDEO_SUFFIXES:
            studies.setdefault(pseudo_study_uid(p), {"video": True, "files": []})["files"].append((p, None))
            continue
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises many types on damaged files (struct.error, ...)
            problems.append(f"{p}: not a readable DICOM file ({type(exc).__name__})")
            continue
        uid = str(getattr(ds, "StudyInstanceUID", "") or "")
        if not _valid_uid(uid):
            problems.append(f"{p}: missing or invalid StudyInstanceUID")
            continue
        studies.setdefault(uid, {"video": False, "files": []})["files"].append((p, ds))
    return studies, problems


def _load_study(files, settings, warnings: list[str]):
    from echonode.dicom.frames import FrameDecodeError, count_frames, load_clip
    from echonode.interpret.engine import ClipInput
    from echonode.interpretation import ClipRef
    from echonode.model.preprocess import sample_indices

    m = settings.model
    inputs, sources = [], []
    for path, ds in files:
        try:
            n = count_frames(path) if ds is None else int(getattr(ds, "NumberOfFrames", 1) or 1)
            idx = sample_indices(n, limit=m.frames * m.frame_stride, stride=m.frame_stride)
            clip = load_clip(path, indices=idx, sector_mask=m.sector_mask)
        except FrameDecodeError as exc:
            warnings.append(f"{path.name}: not analysed: {exc.reason}")
            continue
        except (OSError, ValueError, IndexError) as exc:
            warnings.append(f"{path.name}: not analysed: {type(exc).__name__}: {exc}")
            continue
        if len(clip.frames) == 0:
            warnings.append(f"{path.name}: not analysed: no frames")
            continue
        if ds is not None:
            sop = str(getattr(ds, "SOPInstanceUID", "") or "")
            ref = ClipRef(sop_instance_uid=sop, series_instance_uid=str(getattr(ds, "SeriesInstanceUID", "") or ""),
                          sop_class_uid=str(getattr(ds, "SOPClassUID", "") or ""), path=str(path),
                          n_frames=clip.n_frames, frames_used=tuple(int(i) for i in clip.indices))
            sources.append(ds)
        else:
            ref = ClipRef(sop_instance_uid=pseudo_study_uid(path) + ".1", path=str(path), n_frames=clip.n_frames,
                          frames_used=tuple(int(i) for i in clip.indices))
        inputs.append(ClipInput(ref=ref, frames=clip.frames))
    return inputs, sources


def result_dict(interp, outputs: list[str] | None = None) -> dict:
    """The ``--json`` object for one study."""
    d = interp.to_dict()
    tasks = {}
    for tid, t in interp.tasks.items():
        e = {"mode": t.mode, "title": t.title, "method": t.method}
        if t.mode in ("binary", "categorical"):
            e["score"] = t.score
        if t.mode in ("regression", "categorical"):
            e["value"] = t.value
        if t.unit:
            e["unit"] = t.unit
        if t.category is not None:
            e["category"] = t.category
        if t.scores:
            e["scores"] = dict(t.scores)
        if t.derived:
            e["derived"] = dict(t.derived)
        e.update(call=t.call, threshold=t.threshold, threshold_source=t.threshold_source,
                 per_clip=[{k: v for k, v in (("sop_instance_uid", c.sop_instance_uid), ("score", c.score),
                                              ("value", c.value)) if v is not None} for c in t.per_clip],
                 aggregation=t.aggregation, group=t.group)
        tasks[tid] = e
    d["tasks"] = tasks
    if outputs is not None:
        d["outputs"] = outputs
    return d


def _fmt(x, nd=3) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


_DERIVED_TEXT = {"lvef_lt_50": "<50 %", "lvef_lt_40": "<40 %", "lvef_lt_30": "<30 %", "hfref": "HFrEF range"}


def _derived_text(derived: dict) -> str:
    if not derived:
        return "—"
    if any(v is None for v in derived.values()):
        return "no value"
    flags = [_DERIVED_TEXT.get(k, k) for k, v in derived.items() if v]
    if flags:
        return ", ".join(flags)
    return ">=50 %" if "lvef_lt_50" in derived else "none"


def render_table(interp) -> str:
    from echonode.interpretation import DEMO_BANNER

    m = interp.model
    lines = []
    if m.demo:
        lines += [f"*** {DEMO_BANNER} ***"]
    n_frames = sum(len(c.frames_used) for c in interp.clips)
    lines.append(f"Study {interp.study_instance_uid}")
    lines.append(f"  model {m.name} ({m.architecture}, {m.tokenizer}), weights sha256 {m.weights_sha256[:16]}…, "
                 f"echonode {m.echonode_version}; {len(interp.clips)} clip(s), {n_frames} frames")
    if m.calibration:
        lines.append(f"  calibration: {m.calibration}")
    lines.append("")
    lines.append(f"  {'task':<42} {'mode':<11} {'result':<22} {'call':<22} threshold (source)")
    for t in interp.tasks.values():
        if t.mode == "binary":
            res = f"score {_fmt(t.score)}"
        elif t.mode == "regression":
            res = f"{_fmt(t.value, 1)} {t.unit or ''}".strip()
        else:
            res = f"score {_fmt(t.score)}"
        call = t.call or "—"
        if t.mode == "regression":
            call = _derived_text(t.derived)
        th = "—" if t.threshold is None else f"{t.threshold:.3f}"
        src = "" if t.mode == "regression" else f" ({t.threshold_source})"
        lines.append(f"  {t.title[:42]:<42} {t.mode:<11} {res:<22} {call[:22]:<22} {th}{src}")
    if interp.longitudinal is not None:
        lon = interp.longitudinal
        lines.append("")
        if lon.priors:
            for p in lon.priors:
                tag = ", ".join(x for x, f in (("most recent", p.most_recent), ("most similar", p.most_similar)) if f)
                lines.append(f"  prior {p.study_instance_uid} ({p.study_date or 'no date'}): similarity "
                             f"{p.similarity:.3f}{' — ' + tag if tag else ''}")
        else:
            lines.append("  EchoCLIP-R study embedding computed; no prior studies given")
    if interp.promptcams:
        lines.append("")
        for c in interp.promptcams:
            lines.append(f"  PromptCAM {c.task_id}: clip {c.sop_instance_uid}, frame {c.frame_index}, "
                         f"cosine {c.score:.3f}")
    for w in interp.warnings:
        lines.append(f"  warning: {w}")
    lines.append(f"  {interp.disclaimer}")
    return "\n".join(lines)


def _write_outputs(out: Path, interp, sources, video: bool, messages: list[str], catalog=None) -> list[str]:
    uid = interp.study_instance_uid
    if not _valid_uid(uid):
        raise ValueError("study UID unusable as a directory name")
    d = out / uid
    d.mkdir(parents=True, exist_ok=True)
    written = []
    j = d / "interpretation.json"
    j.write_text(json.dumps(interp.to_dict(), sort_keys=True, indent=1))
    written.append(str(j))
    if video:
        messages.append(f"study {uid}: video input has no DICOM source; SR and overlays not written")
        return written
    try:
        from echonode.dicom.overlays import build_overlays
        from echonode.dicom.sr import build_sr
    except ImportError as exc:
        messages.append(f"SR/overlay writers unavailable ({exc}); only interpretation.json written")
        return written
    objs = [("SR", build_sr(interp, sources, catalog=catalog))] + [("SC", o) for o in build_overlays(interp, sources)]
    for kind, ds in objs:
        sop = str(ds.SOPInstanceUID)
        if not _valid_uid(sop):
            raise ValueError(f"generated {kind} has an invalid SOP Instance UID")
        p = d / f"{kind}_{sop}.dcm"
        ds.save_as(p, enforce_file_format=True)
        written.append(str(p))
    return written


def run(args) -> int:
    from echonode.cli import settings_from_args

    settings = settings_from_args(args)
    paths = [Path(f) for f in args.files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        _err(f"file(s) not found: {', '.join(missing)}")
        return 2

    # heavy imports only now
    from echonode.interpret.engine import Interpreter
    from echonode.interpret.prompts import load_catalog
    from echonode.model.bundle import Bundle, BundleError, resolve_model

    m = settings.model
    tasks = load_catalog(m.tasks_file or None)       # a malformed site file -> ConfigError -> exit 3
    try:
        bundle = Bundle.open(args.model) if args.model else resolve_model(settings, "clip")
        r_bundle = Bundle.open(args.r_model) if args.r_model else resolve_model(settings, "r")
    except BundleError as exc:
        _err(f"model bundle: {exc}")
        return 3
    if bundle is None:
        _err("no EchoCLIP model: pass --model DIR or install one (echonode models import / download)")
        return 3
    if r_bundle is not None and r_bundle.tokenizer_kind != "template":
        _err(f"{r_bundle.path}: not an EchoCLIP-R bundle (tokenizer {r_bundle.tokenizer_kind!r}); ignored")
        r_bundle = None

    studies, problems = _group_files(paths)
    for p in problems:
        _err(p)
    if not studies:
        _err("no analysable file")
        return 1
    try:
        interpreter = Interpreter(
            bundle, r_bundle, device=args.device or m.device, precision=args.precision or m.precision,
            channel_order=m.channel_order, tasks=tasks,
            promptcam_tasks=() if args.no_promptcam else tuple(m.promptcam_tasks),
            cache_dir=settings.cache_path / "prompts")
    except (BundleError, ValueError, RuntimeError) as exc:
        _err(f"cannot load the model: {exc}")
        return 1

    try:
        from tqdm import tqdm
        bar = tqdm(total=len(studies), desc="analyze", unit="study", file=sys.stderr,
                   disable=not sys.stderr.isatty())
    except ImportError:  # pragma: no cover
        bar = None
    failed = bool(problems)
    out = Path(args.out) if args.out else None
    for uid, study in studies.items():
        warnings: list[str] = []
        inputs, sources = _load_study(study["files"], settings, warnings)
        for w in warnings:
            _err(w)
        if bar is not None:
            bar.update(1)
        if not inputs:
            _err(f"study {uid}: no clip could be decoded")
            failed = True
            continue
        interp = interpreter.interpret(uid, inputs)
        if warnings:
            from dataclasses import replace
            interp = replace(interp, warnings=interp.warnings + tuple(warnings))
        outputs = None
        if out is not None:
            messages: list[str] = []
            try:
                outputs = _write_outputs(out, interp, sources, study["video"], messages, catalog=tasks)
            except Exception as exc:  # report, keep going with the other studies
                _err(f"study {uid}: writing outputs failed: {type(exc).__name__}: {exc}")
                failed = True
                outputs = []
            for msg in messages:
                _err(msg)
        if args.json:
            print(json.dumps(result_dict(interp, outputs), sort_keys=True))
        else:
            print(render_table(interp))
            for o in outputs or ():
                print(f"  wrote {o}")
            print()
        sys.stdout.flush()
    if bar is not None:
        bar.close()
    return 1 if failed else 0
