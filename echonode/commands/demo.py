"""``echonode demo``: phantom studies through the whole loop on embedded defaults.

A temporary node (SQLite, the embedded broker, its own worker) receives synthetic
apical-4-chamber studies by C-STORE, analyses them, and sends the SR and overlays to a
local Orthanc (when ``Orthanc`` is installed) or keeps them in its results folder; then
the command prints what came back next to the phantoms' known truth.

The model: installed EchoCLIP weights when there are (``models_dir`` of your
configuration), else the tiny phantom-trained demo model shipped with echonode — and
then every output (console, SR, overlays) says DEMO MODEL — NOT FOR CLINICAL USE. The
demo is the only place where ``model.allow_demo_model`` is switched on by echonode.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from echonode.sandbox import LocalOrthanc, clean_env, echo, find_orthanc, free_port, send, write_toml

SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
US_MULTIFRAME_CLASS = "1.2.840.10008.5.1.4.1.1.3.1"

def register(sub, parents):
    p = sub.add_parser("demo", parents=parents, help="run phantom studies through the whole loop",
                       description="Send synthetic echo studies through a temporary echonode (embedded "
                                   "defaults) and print what came back. Without installed EchoCLIP weights "
                                   "the tiny demo model is used: DEMO MODEL — NOT FOR CLINICAL USE.")
    p.add_argument("--studies", type=int, default=3,
                   help="phantom studies to send (default 3: two visits of one patient, one of another)")
    p.add_argument("--model", metavar="DIR", default=None,
                   help="model bundle to use (default: installed EchoCLIP weights, else the demo model)")
    p.add_argument("--r-model", metavar="DIR", default=None, help="EchoCLIP-R bundle for longitudinal comparison")
    p.add_argument("--data-dir", metavar="DIR", default=None,
                   help="where the demo node keeps its data (default: a temporary folder, removed afterwards)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument("--no-orthanc", action="store_true", help="do not start a local Orthanc as the PACS")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds (default 600)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _make_studies(folder: Path, n: int) -> list[dict]:
    """n phantom studies: patient DEMO-0001 twice (a year apart), then one study per patient."""
    from echonode.dicom.uids import derived_uid
    from echonode.phantom import make_clip, write_dicom

    def _uid(*parts) -> str:
        return derived_uid("echonode-demo", *parts)

    out = []
    for i in range(n):
        pat = 1 if i < 2 else i
        date = "20240115" if i == 0 else "20250120" if i == 1 else f"2025{(i % 12) + 1:02d}10"
        pid = f"DEMO-{pat:04d}"
        clip = make_clip(1000 + i, n_frames=40, rows=224, cols=224)
        study_uid = _uid(pid, date, "study")
        path = write_dicom(folder / f"study{i + 1}.dcm", clip, patient_id=pid, patient_name=f"DEMO^PATIENT{pat}",
                           birth_date="19500101", sex="O", study_uid=study_uid,
                           series_uid=_uid(pid, date, "series"), sop_uid=_uid(pid, date, "sop"),
                           study_date=date, accession=f"DEMO{i + 1:04d}")
        out.append({"file": path, "study_uid": study_uid, "patient": pid, "date": date, "truth": clip.truth})
    return out


def _truth_line(truth) -> str:
    devices = [d for d in ("pacemaker", "impella", "tavr", "mitraclip") if getattr(truth, d, False)]
    return f"LVEF {truth.lvef:.0f} %" + (f", devices: {', '.join(devices)}" if devices else ", no device")


class _DemoError(Exception):
    """The demo cannot go on (the message says why and where the log is)."""


def run(args) -> int:
    from echonode.cli import EXIT_FAILURE, EXIT_USAGE, settings_from_args
    from echonode.interpretation import DEMO_BANNER
    from echonode.pipeline.modelsel import choose_models

    if args.studies < 1:
        print("echonode demo: --studies must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    for opt, given in (("--model", args.model), ("--r-model", args.r_model)):
        if given and not Path(given).is_dir():
            print(f"echonode demo: {opt} {given}: no model bundle there (`echonode models import` installs "
                  "published weights)", file=sys.stderr)
            return EXIT_FAILURE
    base = settings_from_args(args)
    work = Path(args.data_dir).resolve() if args.data_dir else Path(tempfile.mkdtemp(prefix="echonode-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    remove = not (args.keep or args.data_dir)
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    node_port = free_port()
    orthanc = node = None
    try:
        orthanc = None if args.no_orthanc else _start_orthanc(work, node_port, say)
        settings, cfg_path = _write_config(work, base, args, node_port, orthanc)
        choice = choose_models(settings)
        if not choice.available:
            raise _DemoError(choice.message)
        if choice.demo:
            say(DEMO_BANNER)
        say(f"model: {choice.message}")
        studies = _make_studies(work / "phantoms", args.studies)
        node = _start_node(work, cfg_path, node_port)
        say(f"demo node on port {node_port} (data in {work}); sending {len(studies)} phantom studies")
        statuses = send(node_port, [s["file"] for s in studies])
        if any(st != 0 for st in statuses):
            raise _DemoError(f"C-STORE statuses {statuses}")
        _wait_until_through(settings, studies, orthanc, node, work, args.timeout)
        report = _collect_report(settings, studies, orthanc, choice)
        if args.json:
            print(json.dumps(report, sort_keys=True))
        else:
            _print_report(report)
        ok = all(s["state"] == "done" for s in report["studies"])
        return 0 if ok else EXIT_FAILURE
    except _DemoError as exc:
        print(f"echonode demo: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        from echonode.pipeline.service import terminate
        if node is not None:
            terminate(node, 60)
        if orthanc is not None:
            orthanc.stop()
        if remove:
            shutil.rmtree(work, ignore_errors=True)
        elif not args.json:
            print(f"demo data kept in {work}")


def _start_orthanc(work: Path, node_port: int, say) -> Optional[LocalOrthanc]:
    """A local Orthanc as the PACS, when it is installed; None otherwise (results stay local)."""
    exe = find_orthanc()
    if not exe:
        return None
    orthanc = LocalOrthanc(exe, work / "orthanc", "ECHONODE", node_port)
    if orthanc.wait():
        return orthanc
    say(f"Orthanc did not start (see {work / 'orthanc' / 'orthanc.log'}); results stay in the results folder")
    orthanc.stop()
    return None


def _write_config(work: Path, base, args, node_port: int, orthanc: Optional[LocalOrthanc]):
    """The demo node's configuration file (embedded defaults, the demo model allowed)."""
    from echonode.config import load_settings

    model_cfg = {"models_dir": str(base.models_path), "allow_demo_model": True, "promptcam_tasks": ["pacemaker"]}
    if args.model:
        model_cfg["clip_model"] = str(Path(args.model).resolve())
    if args.r_model:
        model_cfg["r_model"] = str(Path(args.r_model).resolve())
    cfg = {
        "data_dir": str(work / "node"), "log_level": "INFO",
        "node": {"ae_title": "ECHONODE", "host": "127.0.0.1", "port": node_port, "min_free_mb": 64},
        "stable": {"delay_s": 2.0, "poll_s": 0.5},
        "model": model_cfg,
        "queue": {"embedded_worker": True},
        "metrics": {"enabled": True, "port": free_port()},
        "delivery": {"backoff_initial_s": 1.0, "backoff_max_s": 10.0, "destinations": (
            [{"name": "orthanc", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}]
            if orthanc else [])},
    }
    cfg_path = work / "demo.toml"
    write_toml(cfg_path, cfg)
    return load_settings(cfg_path, env={}), cfg_path


def _start_node(work: Path, cfg_path: Path, node_port: int) -> subprocess.Popen:
    """``echonode serve`` with the demo's configuration only; returns once it answers C-ECHO."""
    env = clean_env()
    log = open(work / "node.log", "ab")
    node = subprocess.Popen([sys.executable, "-m", "echonode", "serve", "--config", str(cfg_path)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while not echo(node_port):
        if node.poll() is not None or time.monotonic() > deadline:
            from echonode.pipeline.service import terminate
            terminate(node, 10)
            raise _DemoError(f"the demo node did not start (log: {work / 'node.log'})")
        time.sleep(0.3)
    return node


def _wait_until_through(settings, studies: list[dict], orthanc, node, work: Path, timeout: float) -> None:
    """Until every study is analysed (done, failed or waiting for a model) and, with a PACS,
    its SR is there."""
    from tqdm import tqdm

    from echonode.store import db, outbox, status

    Session = db.session_factory(db.get_engine(settings.db_url))
    uids = [s["study_uid"] for s in studies]
    deadline = time.monotonic() + timeout
    finished: set[str] = set()
    with tqdm(total=len(uids), desc="studies analysed and delivered", file=sys.stderr, disable=None) as bar:
        while len(finished) < len(uids):
            with Session() as s:
                jobs = status.study_jobs(s, uids)
                pending_outbox = outbox.due_count(s)
            for uid, (state, _err) in jobs.items():
                if uid in finished or state not in ("done", "failed", "waiting_model"):
                    continue
                if state != "done" or not orthanc or any(o["sop_class_uid"].startswith(SR_CLASS_PREFIX)
                                                         for o in orthanc.study_objects(uid)):
                    finished.add(uid)
                    bar.update(1)
            if len(finished) == len(uids):
                return
            if node.poll() is not None:
                raise _DemoError(f"the demo node stopped (log: {work / 'node.log'})")
            if time.monotonic() > deadline:
                raise _DemoError(f"timed out after {timeout:.0f} s; jobs {jobs}, outbox due {pending_outbox} "
                                 f"(log: {work / 'node.log'})")
            time.sleep(0.5)


def _collect_report(settings, studies: list[dict], orthanc, choice) -> dict:
    """What came back for each study, next to the phantom's truth."""
    from echonode.storage import RESULTS, describe, open_storage
    from echonode.store import db, interpretations, status

    Session = db.session_factory(db.get_engine(settings.db_url))
    store = open_storage(settings)
    report = {"model": choice.message, "demo": choice.demo, "pacs": "orthanc" if orthanc else None,
              "results_store": describe(settings), "studies": []}
    for st in studies:
        uid = st["study_uid"]
        with Session() as s:
            interp = interpretations.latest_interpretation(s, uid)
            state, err = status.study_jobs(s, [uid]).get(uid, (None, None))
        back = orthanc.study_objects(uid) if orthanc else []
        # keys in the node's store (local directory or object storage alike)
        files = sorted(o.key for o in store.list(f"{RESULTS}/{uid}"))
        report["studies"].append({
            "study_instance_uid": uid, "patient": st["patient"], "study_date": st["date"],
            "state": state, "error": err, "truth": _truth_line(st["truth"]),
            "interpretation": interp, "result_keys": files,
            "in_pacs": [o for o in back if not o["sop_class_uid"].startswith(US_MULTIFRAME_CLASS)],
        })
    return report


def _print_report(report: dict) -> None:
    from echonode.interpretation import DEMO_BANNER

    banner = report["demo"]
    if banner:
        print("=" * len(DEMO_BANNER))
        print(DEMO_BANNER)
        print("=" * len(DEMO_BANNER))
    for st in report["studies"]:
        print(f"\nstudy {st['study_instance_uid']}  patient {st['patient']}  date {st['study_date']}: {st['state']}")
        print(f"  phantom truth: {st['truth']}")
        if st["error"] and st["state"] != "done":
            print(f"  error: {st['error']}")
        interp = st["interpretation"] or {}
        tasks = interp.get("tasks", {})
        shown = ["ejection_fraction", "pulmonary_artery_pressure", "pacemaker", "impella", "tavr", "mitraclip",
                 "left_ventricle_size", "lv_hypertrophy", "pericardial_effusion", "cardiac_tamponade"]
        for tid in [t for t in shown if t in tasks]:
            t = tasks[tid]
            if t.get("mode") == "regression":
                val = f"{t['value']:.1f} {t.get('unit') or ''}".strip() if t.get("value") is not None else "-"
            elif t.get("mode") == "categorical":
                val = t.get("category") or (f"level {t['value']:.0f}" if t.get("value") is not None else "no call")
            else:
                val = f"score {t['score']:.3f} → {t.get('call')}" if t.get("score") is not None else "-"
            print(f"  {tid:28} {val}  ({t.get('threshold_source', '')})")
        lon = interp.get("longitudinal") or {}
        for p in lon.get("priors", ()) or ():
            print(f"  compared with prior study {p['study_instance_uid']} ({p['study_date']}): "
                  f"similarity {p['similarity']:.3f}")
        if st["in_pacs"]:
            kinds = {}
            for o in st["in_pacs"]:
                k = "SR" if o["sop_class_uid"].startswith("1.2.840.10008.5.1.4.1.1.88.") else "overlay"
                kinds[k] = kinds.get(k, 0) + 1
            print("  back in the PACS (same study): " + ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())))
        elif st["result_keys"]:
            print(f"  results written: {len(st['result_keys'])} object(s) in {report['results_store']}:")
            for key in st["result_keys"]:
                print(f"    {key}")
        if banner:
            print(f"  {DEMO_BANNER}")
    print(f"\n{len(report['studies'])} of {len(report['studies'])} phantom studies through the loop; "
          "(uncalibrated) = score only, no yes/no call without a calibration.")
    if banner:
        print(DEMO_BANNER)
