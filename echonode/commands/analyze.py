"""``echonode analyze``: run the zero-shot Interpretation on files, offline, as the node would.

DICOM files are grouped by StudyInstanceUID (one Interpretation per study, all its files
as its A4C clips); every video file (AVI, MP4, ...) is a pseudo-study of its own with a
deterministic ``2.25.`` UID derived from its path. The analysis itself is the node's
(:mod:`echonode.analysis`): the same Interpreter with the site's task catalogue, the
same frame sampling and decoding, the same SR and overlays.

Output: a readable table per study, or with ``--json`` one JSON object per study (one
per line): ``{"study_instance_uid", "model", "tasks": {ID: {"mode", "score" | "value",
"call", "threshold", "threshold_source", ...}}, "clips", "promptcams", "longitudinal",
"warnings", "timings", "disclaimer"[, "banner"]}``.

``--out DIR``: for DICOM studies writes ``DIR/<study uid>/`` with the SR, the PromptCAM
Secondary Captures and ``interpretation.json``; video studies have no DICOM source, so
only ``interpretation.json`` is written for them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


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


def _valid_uid(uid: str) -> bool:
    """Safe as a path component: the node's own UID check (echonode.dicom.uids, lenient form)."""
    from echonode.dicom.uids import is_valid_uid

    return is_valid_uid(uid, strict=False)


def _err(msg: str) -> None:
    print(f"echonode analyze: {msg}", file=sys.stderr)


def _group_files(paths: list[Path]) -> tuple[dict, list[str]]:
    """{study uid: {"video": bool, "clips": [ClipSource]}} in argument order. Each DICOM file
    is parsed once here; the analysis decodes from that parse."""
    from echonode.analysis import ClipSource, pseudo_study_uid, read_instance
    from echonode.dicom.frames import VIDEO_SUFFIXES

    studies: dict[str, dict] = {}
    problems: list[str] = []
    for p in paths:
        if p.suffix.lower() in VIDEO_SUFFIXES:
            studies.setdefault(pseudo_study_uid(p), {"video": True, "clips": []})["clips"].append(ClipSource(p))
            continue
        try:
            ds = read_instance(p)
        except Exception as exc:  # pydicom raises many types on damaged files (struct.error, ...)
            problems.append(f"{p}: not a readable DICOM file ({type(exc).__name__})")
            continue
        uid = str(getattr(ds, "StudyInstanceUID", "") or "")
        if not _valid_uid(uid):
            problems.append(f"{p}: missing or invalid StudyInstanceUID")
            continue
        studies.setdefault(uid, {"video": False, "clips": []})["clips"].append(ClipSource(p, header=ds))
    return studies, problems


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


def _write_outputs(out: Path, result, video: bool, messages: list[str], *, pdf: bool = False) -> list[str]:
    """``out/<study>/``: interpretation.json, and for DICOM studies the result objects the
    node would send, each named by its kind: ``SR_``, ``PAGE_``, ``PDF_`` (``results.pdf``)
    ``SC_`` (PromptCAM overlays) and ``CINE_`` (their cine versions), as the outbox names them,
    followed by the SOP Instance UID."""
    from echonode.analysis import result_datasets
    from echonode.dicom.scu import result_kind
    from echonode.files import atomic_write, atomic_write_bytes

    interp = result.interp
    uid = interp.study_instance_uid
    if not _valid_uid(uid):
        raise ValueError("study UID unusable as a directory name")
    d = out / uid
    written = [str(atomic_write_bytes(d / "interpretation.json",
                                      json.dumps(interp.to_dict(), sort_keys=True, indent=1).encode()))]
    if video:
        messages.append(f"study {uid}: video input has no DICOM source; SR and overlays not written")
        return written
    for ds in result_datasets(interp, result.headers, pdf=pdf):
        kind = (result_kind(str(ds.SOPClassUID), ds.get("SeriesNumber")) or "obj").upper()
        sop = str(ds.SOPInstanceUID)
        if not _valid_uid(sop):
            raise ValueError(f"generated {kind} has an invalid SOP Instance UID")
        p = atomic_write(d / f"{kind}_{sop}.dcm", lambda fh, ds=ds: ds.save_as(fh, enforce_file_format=True))
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
    from echonode import analysis
    from echonode.model.bundle import Bundle, BundleError, resolve_model

    analysis.load_task_catalog(settings)       # a malformed site file -> ConfigError -> exit 3, before the model
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
        interpreter = analysis.make_interpreter(settings, bundle, r_bundle, device=args.device,
                                                precision=args.precision,
                                                promptcam_tasks=() if args.no_promptcam else None)
    except (BundleError, ValueError, RuntimeError) as exc:
        _err(f"cannot load the model: {exc}")
        return 1

    from tqdm import tqdm
    bar = tqdm(total=len(studies), desc="analyze", unit="study", file=sys.stderr,
               disable=not sys.stderr.isatty())
    failed = bool(problems)
    out = Path(args.out) if args.out else None
    for uid, study in studies.items():
        try:
            result = analysis.analyse(settings, interpreter, uid, study["clips"])
        except analysis.AnalysisError as exc:
            _err(f"study {uid}: {exc}")
            failed = True
            continue
        finally:
            bar.update(1)
        for w in result.interp.warnings:
            if " not analysed: " in w:
                _err(w)
        outputs = None
        if out is not None:
            messages: list[str] = []
            try:
                outputs = _write_outputs(out, result, study["video"], messages, pdf=settings.results.pdf)
            except Exception as exc:  # report, keep going with the other studies
                _err(f"study {uid}: writing outputs failed: {type(exc).__name__}: {exc}")
                failed = True
                outputs = []
            for msg in messages:
                _err(msg)
        if args.json:
            print(json.dumps(result_dict(result.interp, outputs), sort_keys=True))
        else:
            print(render_table(result.interp))
            for o in outputs or ():
                print(f"  wrote {o}")
            print()
        sys.stdout.flush()
    bar.close()
    return 1 if failed else 0
