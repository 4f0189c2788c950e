"""A local node to try things on: free ports, a config file, a throw-away Orthanc as the
PACS, a tiny cart (C-ECHO, C-STORE). Used by ``echonode demo`` and the benchmarks, which
start a real ``echonode serve`` against it; nothing here is used by the node itself.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Optional

ORTHANC_CANDIDATES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc", "/usr/local/bin/Orthanc")


def find_orthanc() -> Optional[str]:
    """The Orthanc executable, or None when it is not installed."""
    return next((c for c in ORTHANC_CANDIDATES if os.access(c, os.X_OK)), shutil.which("Orthanc"))


def dcmtk(tool: str) -> str:
    """Path of a DCMTK tool (never pynetdicom's console script of the same name)."""
    for cand in (f"/usr/bin/{tool}", f"/usr/local/bin/{tool}"):
        if os.access(cand, os.X_OK):
            return cand
    raise SystemExit(f"DCMTK {tool} not found (apt-get install dcmtk)")


def free_port() -> int:
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


def write_toml(path: Path, cfg: dict) -> None:
    lines = [f"{k} = {_toml(v)}" for k, v in cfg.items() if not isinstance(v, dict)]
    for k, v in cfg.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines += [f"{kk} = {_toml(vv)}" for kk, vv in v.items()]
    path.write_text("\n".join(lines) + "\n")


class LocalOrthanc:
    """A throw-away Orthanc on free loopback ports that knows the local node (``node_aet`` on
    ``node_port``) as a modality, so storage-commitment reports come back to it."""

    def __init__(self, exe: str, folder: Path, node_aet: str, node_port: int):
        self.folder = folder
        self.http_port, self.dicom_port, self.aet = free_port(), free_port(), "ORTHANC"
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
        self.exe = exe
        self.log = None
        self.start()

    def start(self) -> None:
        """Start (again) on the same ports and storage: its defaults, OverwriteInstances false."""
        self.log = open(self.folder / "orthanc.log", "ab")
        self.proc = subprocess.Popen([self.exe, "--no-jobs", str(self.folder / "orthanc.json")], stdout=self.log,
                                     stderr=subprocess.STDOUT, cwd=self.folder, start_new_session=True)

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

    def count_instances(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def find_sr(self) -> list[dict]:
        """Every SR instance held: SOP Instance UID, study UID and the Predecessor Documents
        Sequence's referenced SOP Instance UIDs (from the stored tags)."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/tools/find", method="POST",
                                     data=json.dumps({"Level": "Instance", "Query": {"Modality": "SR"}}).encode())
        with urllib.request.urlopen(req, timeout=30) as r:
            ids = json.loads(r.read())
        out = []
        for oid in ids:
            tags = self.get(f"/instances/{oid}/tags?short")
            preds = [sop.get("0008,1155") for item in tags.get("0040,a360") or []
                     for ser in item.get("0008,1115") or [] for sop in ser.get("0008,1199") or []]
            out.append({"sop_instance_uid": tags.get("0008,0018", ""), "study_instance_uid": tags.get("0020,000d", ""),
                        "predecessors": [p for p in preds if p]})
        return out

    def stop(self) -> None:
        from echonode.pipeline.service import terminate
        terminate(self.proc, 15)
        if self.log is not None:
            self.log.close()
            self.log = None


def send(port: int, files: list[Path]) -> list[int]:
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


def echo(port: int) -> bool:
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
