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
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ORTHANC_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc", "/usr/local/bin/Orthanc")


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def _write_toml(path: Path, cfg: dict) -> None:
    lines = [f"{k} = {_toml(v)}" for k, v in cfg.items() if not isinstance(v, dict)]
    for k, v in cfg.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines += [f"{kk} = {_toml(vv)}" for kk, vv in v.items()]
    path.write_text("\n".join(lines) + "\n")


class _Orthanc:
    def __init__(self, exe: str, folder: Path, node_aet: str, node_port: int):
        self.folder = folder
        self.http_port, self.dicom_port, self.aet = _free_port(), _free_port(), "ORTHANC"
        (folder / "storage").mkdir(parents=True, exist_ok=True)
        cfg = {
            "Name": "echonode-demo-pacs", "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"), "Plugins": [], "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomAet": self.aet,
            "DicomPort": self.dicom_port, "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True, "UnknownSopClassAccepted": True, "SaveJobs": False,
            "DicomModalities": {"echonode": [node_aet, "127.0.0.1", node_port]}, "DeidentifyLogs": True,
        }
        (folder / "orthanc.json").write_text(json.dumps(cfg, indent=1))
        self.log = open(folder / "orthanc.log", "ab")
        self.proc = subprocess.Popen([exe, "--no-jobs", str(folder / "orthanc.json")], stdout=self.log,
                                     stderr=subprocess.STDOUT, cwd=folder, start_new_session=True)

    def get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            return json.loads(r.read())

    def wait(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                self.get("/system")
                return True
            except OSError:
                time.sleep(0.2)
        return False

    def study_objects(self, study_uid: str) -> list[dict]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/tools/find", method="POST",
                                     data=json.dumps({"Level": "Instance", "Expand": True,
                                                      "Query": {"StudyInstanceUID": study_uid}}).encode())
        with urllib.request.urlopen(req, timeout=10) as r:
            found = json.loads(r.read())
        out = []
        for inst in found:
            tags = self.get(f"/instances/{inst['ID']}/simplified-tags")
            out.append({"sop_class_uid": tags.get("SOPClassUID", ""), "sop_instance_uid": tags.get("SOPInstanceUID", ""),
                        "series_description": tags.get("SeriesDescription", "")})
        return out

    def stop(self) -> None:
        from echonode.pipeline.service import terminate
        terminate(self.proc, 15)
        self.log.close()


def _make_studies(folder: Path, n: int) -> list[dict]:
    """n phantom studies: patient DEMO-0001 twice (a year apart), then one study per patient."""
    import hashlib

    from echonode.phantom import make_clip, write_dicom

    def _uid(*parts) -> str:
        h = hashlib.sha256("|".join(map(str, ("echonode-demo",) + parts)).encode()).digest()
        return "2.25." + str(int.from_bytes(h[:16], "big"))

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


def _send(port: int, files: list[Path]) -> list[int]:
    import pydicom
    from pynetdicom import AE

    ae = AE(ae_title="DEMOCART")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    dss = [pydicom.dcmread(f) for f in files]
    for ds in dss:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="ECHONODE")
    if not assoc.is_established:
        raise RuntimeError("the demo node refused the association")
    try:
        return [int(getattr(assoc.send_c_store(ds), "Status", -1)) for ds in dss]
    finally:
        assoc.release()


def _echo(port: int) -> bool:
    from pynetdicom import AE

    ae = AE(ae_title="DEMOCART")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.network_timeout = 3
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="ECHONODE")
    except Exception:
        return False
    if not assoc.is_established:
        return False
    ok = getattr(assoc.send_c_echo(), "Status", None) == 0
    assoc.release()
    return ok


def _truth_line(truth) -> str:
    devices = [d for d in ("pacemaker", "impella", "tavr", "mitraclip") if getattr(truth, d, False)]
    return f"LVEF {truth.lvef:.0f} %" + (f", devices: {', '.join(devices)}" if devices else ", no device")


def run(args) -> int:
    from echonode.cli import EXIT_FAILURE, EXIT_USAGE, settings_from_args
    from echonode.interpretation import DEMO_BANNER

    if args.studies < 1:
        print("echonode demo: --studies must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    base = settings_from_args(args)
    work = Path(args.data_dir).resolve() if args.data_dir else Path(tempfile.mkdtemp(prefix="echonode-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    remove = not (args.keep or args.data_dir)
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    node_port, metrics_port = _free_port(), _free_port()
    orthanc = None
    procs: list[subprocess.Popen] = []
    try:
        exe = next((c for c in ORTHANC_CANDIDATES if os.access(c, os.X_OK)), shutil.which("Orthanc"))
        if exe and not args.no_orthanc:
            orthanc = _Orthanc(exe, work / "orthanc", "ECHONODE", node_port)
            if not orthanc.wait():
                say(f"Orthanc did not start (see {work / 'orthanc' / 'orthanc.log'}); results stay in the results folder")
                orthanc.stop()
                orthanc = None
        for opt, given in (("--model", args.model), ("--r-model", args.r_model)):
            if given and not Path(given).is_dir():
                print(f"echonode demo: {opt} {given}: no model bundle there (`echonode models import` installs "
                      "published weights)", file=sys.stderr)
                return EXIT_FAILURE
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
            "metrics": {"enabled": True, "port": metrics_port},
            "delivery": {"backoff_initial_s": 1.0, "backoff_max_s": 10.0, "destinations": (
                [{"name": "orthanc", "ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}]
                if orthanc else [])},
        }
        cfg_path = work / "demo.toml"
        _write_toml(cfg_path, cfg)
        from echonode.config import load_settings
        settings = load_settings(cfg_path, env={})

        from echonode.pipeline.modelsel import choose_models
        choice = choose_models(settings)
        if not choice.available:
            print(f"echonode demo: {choice.message}", file=sys.stderr)
            return EXIT_FAILURE
        if choice.demo:
            say(DEMO_BANNER)
        say(f"model: {choice.message}")
        studies = _make_studies(work / "phantoms", args.studies)

        env = {k: v for k, v in os.environ.items() if not k.startswith("ECHONODE_")}  # only the demo's config
        log = open(work / "node.log", "ab")
        node = subprocess.Popen([sys.executable, "-m", "echonode", "serve", "--config", str(cfg_path)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        procs.append(node)
        deadline = time.monotonic() + 90
        while not _echo(node_port):
            if node.poll() is not None or time.monotonic() > deadline:
                print(f"echonode demo: the demo node did not start (log: {work / 'node.log'})", file=sys.stderr)
                return EXIT_FAILURE
            time.sleep(0.3)
        say(f"demo node on port {node_port} (data in {work}); sending {len(studies)} phantom studies")
        statuses = _send(node_port, [s["file"] for s in studies])
        if any(st != 0 for st in statuses):
            print(f"echonode demo: C-STORE statuses {statuses}", file=sys.stderr)
            return EXIT_FAILURE

        from tqdm import tqdm

        from echonode.store import db
        from echonode.store import interpretations, outbox
        from echonode.store.models import AnalysisJob
        Session = db.session_factory(db.get_engine(settings.db_url))
        uids = {s["study_uid"] for s in studies}
        want = len(studies)
        deadline = time.monotonic() + args.timeout
        bar = tqdm(total=want, desc="studies analysed and delivered", file=sys.stderr, disable=None)
        finished: dict[str, str] = {}
        while True:
            with Session() as s:
                jobs = {j.study_instance_uid: (j.state, j.error) for j in s.query(AnalysisJob)
                        if j.study_instance_uid in uids}
                pending_outbox = outbox.due_count(s)
            for uid, (state, err) in jobs.items():
                if state in ("done", "failed", "waiting_model") and uid not in finished:
                    if state != "done" or not orthanc or any(
                            o["sop_class_uid"].startswith("1.2.840.10008.5.1.4.1.1.88.")
                            for o in orthanc.study_objects(uid)):
                        finished[uid] = state
                        bar.update(1)
            if len(finished) == want:
                break
            if node.poll() is not None:
                print(f"echonode demo: the demo node stopped (log: {work / 'node.log'})", file=sys.stderr)
                return EXIT_FAILURE
            if time.monotonic() > deadline:
                print(f"echonode demo: timed out after {args.timeout:.0f} s; jobs {jobs}, outbox due "
                      f"{pending_outbox} (log: {work / 'node.log'})", file=sys.stderr)
                return EXIT_FAILURE
            time.sleep(0.5)
        bar.close()

        report = {"model": choice.message, "demo": choice.demo, "pacs": "orthanc" if orthanc else None,
                  "results_dir": str(settings.results_path), "studies": []}
        for st in studies:
            with Session() as s:
                interp = interpretations.latest_interpretation(s, st["study_uid"])
                state, err = s.query(AnalysisJob.state, AnalysisJob.error).filter(
                    AnalysisJob.study_instance_uid == st["study_uid"]).order_by(AnalysisJob.id.desc()).first()
            back = orthanc.study_objects(st["study_uid"]) if orthanc else []
            files = sorted(p.name for p in (settings.results_path / st["study_uid"]).glob("*.dcm")) \
                if (settings.results_path / st["study_uid"]).is_dir() else []
            report["studies"].append({
                "study_instance_uid": st["study_uid"], "patient": st["patient"], "study_date": st["date"],
                "state": state, "error": err, "truth": _truth_line(st["truth"]),
                "interpretation": interp, "results_files": files,
                "in_pacs": [o for o in back if not o["sop_class_uid"].startswith("1.2.840.10008.5.1.4.1.1.3.1")],
            })
        if args.json:
            print(json.dumps(report, sort_keys=True))
        else:
            _print_report(report)
        ok = all(s["state"] == "done" for s in report["studies"])
        return 0 if ok else EXIT_FAILURE
    finally:
        from echonode.pipeline.service import terminate
        for p in procs:
            terminate(p, 60)
        if orthanc is not None:
            orthanc.stop()
        if remove:
            shutil.rmtree(work, ignore_errors=True)
        elif not args.json:
            print(f"demo data kept in {work}")


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
        elif st["results_files"]:
            print(f"  results written: {len(st['results_files'])} file(s) in {report['results_dir']}")
        if banner:
            print(f"  {DEMO_BANNER}")
    print(f"\n{len(report['studies'])} of {len(report['studies'])} phantom studies through the loop; "
          "(uncalibrated) = score only, no yes/no call without a calibration.")
    if banner:
        print(DEMO_BANNER)
