"""Benchmark: priors from a real Orthanc (issue 17).

    python3 bench/priors.py [--priors 3] [--backfill 12] [--concurrency 2]

In one process, with the Debian Orthanc (+ DICOMweb plugin) on free loopback ports, the
shipped demo model as EchoCLIP and its weights re-written as a template-tokenizer
(EchoCLIP-R style) bundle:

1. reference: the Interpreter on the current study (2 phantom A4C clips), no priors;
2. ``fetch_and_embed_priors`` for a patient with 0 and with ``--priors`` earlier studies
   (2 clips each) in the PACS, by C-GET and by QIDO-RS + WADO-RS: seconds added per prior
   retrieved = (t(N) - t(0)) / N, and its ratio to the reference analysis time;
3. ``echonode priors backfill`` (in process) over ``--backfill`` studies: studies/minute.

Prints JSON lines. Nothing here imports tests/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _uid(*parts) -> str:
    h = hashlib.sha256("|".join(map(str, ("echonode-bench-priors",) + parts)).encode()).digest()
    return "2.25." + str(int.from_bytes(h[:16], "big"))


class Orthanc:
    def __init__(self, work: Path):
        self.work, self.dicom, self.http = work, _port(), _port()
        (work / "s").mkdir(parents=True)
        cfg = {"Name": "bench", "StorageDirectory": str(work / "s"), "IndexDirectory": str(work / "s"),
               "Plugins": [PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
               "HttpPort": self.http, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
               "DicomAet": "ORTHANC", "DicomPort": self.dicom, "DicomCheckCalledAet": False,
               "DicomAlwaysAllowFind": True, "DicomAlwaysAllowGet": True, "DicomAlwaysAllowStore": True,
               "StorageCompression": False, "ConcurrentJobs": 2}
        (work / "o.json").write_text(json.dumps(cfg))
        self.proc = subprocess.Popen(["/usr/sbin/Orthanc", str(work / "o.json")], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.http}/system", timeout=1)
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("Orthanc did not start")

    def upload(self, path: Path) -> None:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http}/instances", data=path.read_bytes(), method="POST")
        urllib.request.urlopen(req, timeout=30).read()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(15)


def study(folder: Path, pid: str, date: str, seed: int, n_clips: int = 2, issuer: str = "BENCH") -> tuple[str, list[Path]]:
    import pydicom

    from echonode.phantom import make_clip, write_dicom

    su = _uid(pid, date, seed)
    files = []
    for i in range(n_clips):
        f = write_dicom(folder / f"{su}-{i}.dcm", make_clip(seed * 10 + i, n_frames=40, rows=128, cols=128),
                        patient_id=pid, patient_name="BENCH^P", birth_date="19600101", sex="O", study_uid=su,
                        series_uid=_uid(su, i), sop_uid=_uid(su, "sop", i), study_date=date, series_number=i + 1)
        ds = pydicom.dcmread(f)
        ds.IssuerOfPatientID = issuer
        ds.save_as(f, enforce_file_format=True)
        files.append(f)
    return su, files


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--priors", type=int, default=3)
    ap.add_argument("--backfill", type=int, default=12)
    ap.add_argument("--concurrency", type=int, default=2)
    args = ap.parse_args()
    import logging
    logging.disable(logging.WARNING)
    from safetensors.torch import load_file

    from echonode.config import PriorSource, load_settings
    from echonode.model.bundle import DEMO_BUNDLE_DIR, Bundle, write_bundle
    from echonode.priors import backfill, fetch_and_embed_priors, load_interpreter, load_prior_clips
    from echonode.store import db

    tmp = Path(tempfile.mkdtemp(prefix="bench-priors-"))
    pacs = Orthanc(tmp / "orthanc")
    try:
        demo = Bundle.open(DEMO_BUNDLE_DIR)
        r = write_bundle(tmp / "demo-r", load_file(str(DEMO_BUNDLE_DIR / "open_clip_model.safetensors")),
                         name="demo-r", architecture=demo.architecture, tokenizer_kind="template",
                         source="bench: demo weights as a template-tokenizer bundle")
        base = load_settings(env={}, overrides={
            "data_dir": str(tmp / "node"), "model": {"clip_model": str(DEMO_BUNDLE_DIR), "r_model": str(r.path),
                                                     "allow_demo_model": True},
            "priors": {"enabled": True, "timeout_s": 300, "backfill_concurrency": args.concurrency}})
        db.migrate(base.db_url)
        sessions = db.session_factory(db.get_engine(base.db_url))
        interp = load_interpreter(base)
        dimse = PriorSource(name="dimse", ae_title="ORTHANC", host="127.0.0.1", port=pacs.dicom, retrieve="get")
        web = PriorSource(name="web", kind="dicomweb", url=f"http://127.0.0.1:{pacs.http}/dicom-web")
        ph = tmp / "ph"
        cur_uid, cur_files = study(ph, "CURRENT", "20250101", 1)
        inputs, _ = load_prior_clips(base, cur_files)
        t = time.perf_counter()
        interp.interpret_with_embedding(cur_uid, inputs, [])
        t_ref = time.perf_counter() - t
        print(json.dumps({"bench": "priors", "what": "reference: interpret current study (2 clips)",
                          "seconds": round(t_ref, 3)}))
        for k in range(args.priors):
            for p in ("P-DIMSE", "P-WEB"):
                _, files = study(ph, p, f"2024{k + 1:02d}15", 100 + k + (50 if p == "P-WEB" else 0))
                for f in files:
                    pacs.upload(f)
        for src, pid in ((dimse, "P-DIMSE"), (web, "P-WEB")):
            s = base.replace(priors=dataclasses.replace(base.priors, sources=(src,)))
            t = time.perf_counter()
            out0 = fetch_and_embed_priors(s, sessions, interp, study_uid=cur_uid, patient_id="NOBODY", issuer="BENCH",
                                          study_date="20250101")
            t0 = time.perf_counter() - t
            t = time.perf_counter()
            out = fetch_and_embed_priors(s, sessions, interp, study_uid=cur_uid, patient_id=pid, issuer="BENCH",
                                         study_date="20250101")
            tn = time.perf_counter() - t
            assert len(out.used) == args.priors and not out0.used, (out.statements, out0.statements)
            t = time.perf_counter()
            again = fetch_and_embed_priors(s, sessions, interp, study_uid=cur_uid, patient_id=pid, issuer="BENCH",
                                           study_date="20250101")
            t_again = time.perf_counter() - t
            assert all(not u.fetched_now for u in again.used)
            per = (tn - t0) / args.priors
            print(json.dumps({"bench": "priors", "source": src.name, "priors": args.priors,
                              "seconds_no_prior": round(t0, 3), "seconds_with_priors": round(tn, 3),
                              "seconds_added_per_prior": round(per, 3),
                              "per_prior_vs_reference_analysis": round(per / t_ref, 2),
                              "seconds_when_already_embedded": round(t_again, 3)}))
        for i in range(args.backfill):
            _, files = study(ph, f"BF{i:04d}", f"2023{(i % 12) + 1:02d}{(i % 27) + 1:02d}", 1000 + i)
            for f in files:
                pacs.upload(f)
        s = base.replace(priors=dataclasses.replace(base.priors, sources=(dimse,)))
        t = time.perf_counter()
        st = backfill(s, sessions, interp, since="20230101")
        dt_s = time.perf_counter() - t
        print(json.dumps({"bench": "priors", "what": "backfill C-GET", "studies_embedded": st.embedded,
                          "skipped": st.skipped, "failed": st.failed, "concurrency": args.concurrency,
                          "seconds": round(dt_s, 2), "studies_per_minute": round(60 * st.embedded / dt_s, 1),
                          "cpu_threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0)}))
    finally:
        pacs.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
