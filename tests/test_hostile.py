"""Hostile peers against a real ``echonode serve`` (issue 12), DCMTK as the legitimate cart.

Every test asserts three things: the hostile peer is answered or aborted within a stated
bound; the node's peak RSS (VmHWM) grows by less than 300 MB; a legitimate C-ECHO and
C-STORE (DCMTK echoscu/storescu) succeed afterwards.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.fixtures.node import ROOT, dcmtk, send_raw
from tests.test_scp import make_pki, tls_args, tls_node_config

pytestmark = pytest.mark.timeout(240)

RSS_BOUND_KB = 300 * 1024
US_MF = "1.2.840.10008.5.1.4.1.1.3.1"
DEFLATED = "1.2.840.10008.1.2.1.99"


def vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def small_clip(path: Path, frames: int = 4, size: int = 64, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    ds = Dataset()
    ds.SOPClassUID = US_MF
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.InstanceNumber = "US", "HOSTILE-TEST", 1
    ds.NumberOfFrames, ds.Rows, ds.Columns, ds.FrameTime = frames, size, size, 33.3
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = rng.integers(0, 255, (frames, size, size), dtype=np.uint8).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


class Watch:
    """The node's VmHWM at the start; ``legit()`` checks C-ECHO + C-STORE + RSS growth."""

    def __init__(self, node, tmp_path: Path, echo_extra=(), calling_ae: str = "ECHOSCU"):
        self.node, self.tmp, self.extra, self.ae = node, tmp_path, list(echo_extra), calling_ae
        self.hwm0 = vm_hwm_kb(node.proc.pid)
        self.n = 0

    def legit(self) -> None:
        n = self.node
        assert n.proc.poll() is None, "node died"
        assert n.echo(calling_ae=self.ae, extra=self.extra) == 0, "legitimate C-ECHO failed"
        self.n += 1
        clip = small_clip(self.tmp / f"legit{self.n}.dcm", seed=self.n)
        res = n.storescu([clip], "-xe", *self.extra, calling_ae=self.ae, timeout=60)
        assert res.returncode == 0, f"legitimate C-STORE failed:\n{res.stdout}\n{res.stderr}"
        grown = vm_hwm_kb(n.proc.pid) - self.hwm0
        assert grown < RSS_BOUND_KB, f"peak RSS grew by {grown // 1024} MB"


def closed_or_aborted(sock: socket.socket, bound: float) -> tuple[float, bytes]:
    """Wait until the node closes the connection (reading everything it sends); returns
    (seconds, first bytes received)."""
    t0 = time.monotonic()
    sock.settimeout(bound)
    first = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            first = first or chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    except socket.timeout:
        raise AssertionError(f"connection still open after {bound}s")
    return time.monotonic() - t0, first


def associate(port: int, calling_ae: str = "RAWSCU"):
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(US_MF, ExplicitVRLittleEndian)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="ECHONODE")
    return ae, assoc


# --------------------------------------------------------------------------- 1. PDUs

def test_pdu_lengths_claimed_by_peer(node, tmp_path):
    """Four peers claim a 1 GiB A-ASSOCIATE-RQ, one claims a 1 GiB P-DATA inside an
    association: each is aborted within 10 s, nothing is allocated from the claim."""
    w = Watch(node, tmp_path)
    socks = []
    for _ in range(4):
        s = socket.create_connection(("127.0.0.1", node.port), timeout=10)
        s.sendall(struct.pack(">BBL", 0x01, 0, 1 << 30))
        socks.append(s)
    for s in socks:
        dt, first = closed_or_aborted(s, 10)
        assert first[:1] in (b"\x07", b""), first[:8]  # A-ABORT PDU, then closed
        s.close()

    ae, assoc = associate(node.port)
    assert assoc.is_established
    assoc.dul.socket.socket.sendall(struct.pack(">BBL", 0x04, 0, 1 << 30) + b"\x00" * 1024)
    deadline = time.monotonic() + 10
    while not assoc.is_aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted, "a 1 GiB P-DATA claim was not aborted within 10 s"
    ae.shutdown()
    assert "illegal PDU length" in node.log_text()
    w.legit()


def _uid_item(item_type: int, uid: str) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(uid)) + uid.encode()


def test_associate_rq_with_item_that_cannot_be_read(node_factory, tmp_path):
    """bench/fuzz.py --seed 7, case 9219: an A-ASSOCIATE-RQ whose User Information holds a
    presentation context item with context ID 0 decodes as a PDU but cannot become a
    request; pynetdicom's reactor died on it and the peer heard nothing until the request
    timeout. It is aborted at once (request timeout set to 60 s here, bound 10 s), as
    DCMTK storescp does."""
    n = node_factory({"node": {"request_timeout_s": 60, "acse_timeout_s": 60}}).start()
    w = Watch(n, tmp_path)
    sub = _uid_item(0x30, "1.2.840.10008.1.1") + _uid_item(0x40, "1.2.840.10008.1.2")
    items = (_uid_item(0x10, "1.2.840.10008.3.1.1.1") + struct.pack(">BBHBBBB", 0x20, 0, 4 + len(sub), 1, 0, 0, 0)
             + sub)
    ui = struct.pack(">BBHBBBB", 0x20, 0, 4, 0, 0, 0x6B, 0x40) + _uid_item(0x52, "1.2.826.0.1.3680043.9.9999")
    items += struct.pack(">BBH", 0x50, 0, len(ui)) + ui
    body = struct.pack(">HH", 1, 0) + b"ECHONODE".ljust(16) + b"FUZZ".ljust(16) + b"\x00" * 32 + items
    for _ in range(3):  # the node keeps answering it
        s = socket.create_connection(("127.0.0.1", n.port), timeout=10)
        s.sendall(struct.pack(">BBL", 0x01, 0, len(body)) + body)
        _, first = closed_or_aborted(s, 10)
        s.close()
        assert first[:1] == b"\x07", first[:8]  # A-ABORT, not silence until a timeout
    assert "cannot be read as a request" in n.log_text()
    w.legit()


# --------------------------------------------------------------------------- 2. streaming, limits, Deflate

def deflate_bomb(path: Path, inflated_mb: int = 1024) -> Path:
    """A Deflated Explicit VR LE instance whose ~1 MB on the wire inflates to ``inflated_mb``."""
    from echonode.dicom.spool import file_meta_bytes

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = US_MF, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "US", "BOMB"
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    head = buf.getvalue() + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, inflated_mb << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    h = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)
    # after a full flush the compressor starts afresh: one 16 MiB block repeated is a valid stream
    block = c.compress(b"\x00" * (16 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    tail = c.flush()
    path.write_bytes(file_meta_bytes(US_MF, str(ds.SOPInstanceUID), DEFLATED) + h
                     + block * (inflated_mb // 16) + tail)
    return path


def tiny_element_header(path: Path, mb: int = 10) -> Path:
    """Valid UIDs followed by ``mb`` MiB of empty private elements (8 bytes each): only
    the size of the header is hostile."""
    from echonode.dicom.spool import file_meta_bytes

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = US_MF, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "US", "WIDE"
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    n = (mb << 20) // 8
    body = bytearray()
    group = 0x0021
    while n > 0:  # private groups after (0020,000E): the dataset stays in tag order
        k = min(n, 0xFF00)
        body += b"".join(struct.pack("<HH2sH", group, e, b"LO", 0) for e in range(0x0100, 0x0100 + k))
        n -= k
        group += 2
    path.write_bytes(file_meta_bytes(US_MF, str(ds.SOPInstanceUID), ExplicitVRLittleEndian)
                     + buf.getvalue() + bytes(body))
    return path


def _audited(node, event: str, status: str) -> bool:
    """Whether the node's audit trail holds ``event`` with DICOM ``status`` (recorded
    before the C-STORE response, so no wait is needed)."""
    import json

    from echonode.store import audit as store
    from echonode.store import db

    engine = db.make_engine(node.settings.db_url)
    try:
        with db.session_factory(engine)() as s:
            return any(r.event == event and json.loads(r.summary).get("status") == status
                       for r in store.query(s, limit=1000))
    finally:
        engine.dispose()


def test_streamed_receive_limits_and_deflate_bomb(node_factory, tmp_path):
    """max_instance_mb answers 0xA700; a 1 MB Deflated dataset that inflates to 1 GiB and a
    10 MiB header of empty elements are answered 0xC210 within 30 s; a 40 MB clip streams
    in without its size in memory."""
    n = node_factory({"node": {"max_instance_mb": 32}}).start()
    w = Watch(n, tmp_path)
    big = small_clip(tmp_path / "big.dcm", frames=40, size=1024)           # ~40 MB
    t0 = time.monotonic()
    assert send_raw(n.port, [big], timeout=60) == [0xA700]
    assert time.monotonic() - t0 < 60
    assert "above node.max_instance_mb=32" in n.log_text()
    assert not list((n.data_dir / "instances" / ".incoming").glob("*.part"))

    bomb = deflate_bomb(tmp_path / "bomb.dcm")
    assert bomb.stat().st_size < 2 << 20
    t0 = time.monotonic()
    assert send_raw(n.port, [bomb], timeout=30) == [0xC210]
    assert time.monotonic() - t0 < 30
    assert "inflates beyond" in n.log_text()
    # the C-STORE was audited (always on: events go to SQL) without the audit inflating the
    # quarantined bomb again: the peak RSS stays bounded right after it
    assert _audited(n, "instance-quarantined", "0xC210")
    grown = vm_hwm_kb(n.proc.pid) - w.hwm0
    assert grown < RSS_BOUND_KB, f"peak RSS grew by {grown // 1024} MB after the Deflate bomb"

    wide = tiny_element_header(tmp_path / "wide.dcm")                  # 10 MiB of empty elements
    t0 = time.monotonic()
    assert send_raw(n.port, [wide], timeout=30) == [0xC210]
    assert time.monotonic() - t0 < 30
    assert "dataset header above" in n.log_text()
    w.legit()

    n2 = node_factory({"node": {"max_instance_mb": 100}}).start()
    w2 = Watch(n2, tmp_path)
    assert send_raw(n2.port, [big], timeout=60) == [0]
    stored = list((n2.data_dir / "instances").rglob("*.dcm"))
    assert len(stored) == 1 and stored[0].stat().st_size > 40 << 20
    # a sender killed in the middle of a dataset: its partial temp file goes with the association
    big2 = small_clip(tmp_path / "big2.dcm", frames=40, size=1024, seed=9)
    incoming = n2.data_dir / "instances" / ".incoming"
    proc = subprocess.Popen([dcmtk("storescu"), "-xe", "-aec", "ECHONODE", "127.0.0.1", str(n2.port), str(big2)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not list(incoming.glob("*.part")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    assert list(incoming.glob("*.part")), "the dataset never streamed into a temp file"
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 15
    while list(incoming.glob("*.part")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list(incoming.glob("*.part")), "partial temp file left behind after the sender died"
    w2.legit()


def test_cut_deflate_stream_is_quarantined(node, realworld_dir, tmp_path):
    """A Deflated dataset cut inside its deflate stream (bench/fuzz.py --seed 5, case 668:
    the dcm4che SR cut to 417 of 1678 bytes) inflates to a prefix whose header parses, UIDs
    included, but the file can never be read whole: answered 0xC210 and quarantined with
    the exact bytes received; the whole dataset is still stored."""
    from pynetdicom.dsutils import split_dataset

    w = Watch(node, tmp_path)
    src = realworld_dir / "sr" / "dcm4che__report_dfl.dcm"
    meta, off = split_dataset(src)
    assert str(meta.TransferSyntaxUID) == DEFLATED
    blob = src.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(blob[:off + 417])
    t0 = time.monotonic()
    assert send_raw(node.port, [cut]) == [0xC210]
    assert time.monotonic() - t0 < 10
    q = list((node.data_dir / "quarantine").glob("*.dcm"))
    assert len(q) == 1 and q[0].read_bytes().endswith(blob[off:off + 417])
    assert "deflate stream ends before its final block" in q[0].with_suffix(".txt").read_text()
    assert not list((node.data_dir / "instances").rglob("*.dcm"))

    assert send_raw(node.port, [src]) == [0]
    assert len(list((node.data_dir / "instances").rglob("*.dcm"))) == 1
    w.legit()


# --------------------------------------------------------------------------- 3. TLS

def _tls_client(port: int, *, max_version=None, min_version=None, timeout: float = 10) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # our side would offer these old protocols
    if min_version:
        ctx.minimum_version = min_version
    if max_version:
        ctx.maximum_version = max_version
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw) as s:
            s.recv(1)


def test_tls_idle_old_versions_rogue_ca(node_factory, tmp_path):
    """With TLS: an idle TCP peer on the TLS port neither blocks others nor stays longer
    than the handshake timeout; TLS 1.0/1.1 clients and a certificate from another CA fail."""
    d = make_pki(tmp_path / "pki")
    n = node_factory(tls_node_config(d, handshake_timeout_s=3.0))
    cart = tls_args(d, "cart")
    n.start(echo_extra=cart)
    w = Watch(n, tmp_path, echo_extra=cart)
    idle = [socket.create_connection(("127.0.0.1", n.port), timeout=10) for _ in range(3)]
    t0 = time.monotonic()
    assert n.echo(extra=cart, timeout=10) == 0               # not held up by the idle peers
    assert time.monotonic() - t0 < 10
    for s in idle:
        dt, _ = closed_or_aborted(s, 3.0 + 10)               # handshake timeout + margin
        s.close()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
            with pytest.raises(ssl.SSLError) as exc:
                _tls_client(n.port, min_version=version, max_version=version)
            assert "NO_PROTOCOLS_AVAILABLE" not in str(exc.value), "the client could not even try"
    assert n.echo(extra=tls_args(d, "rogue")) != 0
    assert "TLS handshake with 127.0.0.1 failed" in n.log_text()
    w.legit()


# --------------------------------------------------------------------------- 4. policy fails closed

def test_policy_fails_closed(tmp_path):
    """An allow-list entry that makes the policy raise (a host name label over 63 characters:
    the resolver raises UnicodeError) rejects the association instead of accepting it; the
    same entry in a config file stops the node at load (exit 3, naming the key)."""
    from pynetdicom import AE

    from echonode.config import AllowedPeer, NodeSettings, Settings
    from echonode.dicom.scp import EchoSCP
    from echonode.dicom.spool import Spool
    from echonode.store import db
    from tests.fixtures.node import write_config

    bad_host = "h" * 70 + ".example"
    cfg = write_config(tmp_path / "bad.toml", {"data_dir": str(tmp_path / "bad-data"),
                                                "node": {"allowed": [{"ae_title": "CART", "hosts": [bad_host]}]}})
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECHONODE_")}
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run([sys.executable, "-m", "echonode", "serve", "--config", str(cfg)], cwd=str(ROOT), env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 3 and "node.allowed[0].hosts[0]" in res.stderr, res.stderr

    # the same entry built in code (past the loader): the policy raises, the node refuses
    data = tmp_path / "data"
    settings = Settings(data_dir=str(data), node=NodeSettings(
        host="127.0.0.1", port=0, min_free_mb=1, allowed=(AllowedPeer("CART", (bad_host,)),
                                                          AllowedPeer("ECHOSCU"), AllowedPeer("STORESCU"))))
    data.mkdir()
    db.migrate(settings.db_url)
    engine = db.get_engine(settings.db_url)
    spool = Spool(settings, db.session_factory(engine))
    scp = EchoSCP(settings, spool)
    scp.start()
    hwm0 = vm_hwm_kb(os.getpid())
    try:
        ae = AE(ae_title="CART")
        ae.add_requested_context("1.2.840.10008.1.1")
        t0 = time.monotonic()
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="ECHONODE")
        assert assoc.is_rejected and not assoc.is_established
        assert time.monotonic() - t0 < 10
        ae.shutdown()
        echo = subprocess.run([dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", "ECHONODE", "127.0.0.1", str(scp.port)],
                              capture_output=True, timeout=30)
        assert echo.returncode == 0
        clip = small_clip(tmp_path / "c.dcm")
        st = subprocess.run([dcmtk("storescu"), "-xe", "-aet", "STORESCU", "-aec", "ECHONODE", "127.0.0.1",
                             str(scp.port), str(clip)], capture_output=True, timeout=60)
        assert st.returncode == 0, st.stderr
        assert vm_hwm_kb(os.getpid()) - hwm0 < RSS_BOUND_KB
    finally:
        scp.stop(2)
        spool.close()
        engine.dispose()


# --------------------------------------------------------------------------- 7. files, open node

def test_file_modes_and_open_node(node_factory, tmp_path):
    n = node_factory().start()
    w = Watch(n, tmp_path)
    bad = small_clip(tmp_path / "bad.dcm")
    blob = bad.read_bytes()
    bad.write_bytes(blob[:len(blob) - 4096 * 4 + 7])  # truncated pixel data
    t0 = time.monotonic()
    assert send_raw(n.port, [bad])[0] in (0xC210, 0xA900, 0x0000)
    assert time.monotonic() - t0 < 30
    w.legit()
    log = n.log_text()
    assert re.search(r"WARNING echonode.serve: open node", log)
    status = subprocess.run([sys.executable, "-m", "echonode", "status", "--config", str(n.settings_path)],
                            cwd=str(ROOT), env=n.env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "open node" in status.stdout
    for top in ("instances", "quarantine"):
        for p in [n.data_dir / top, *(n.data_dir / top).rglob("*")]:
            mode = stat.S_IMODE(p.stat().st_mode)
            assert mode == (0o750 if p.is_dir() else 0o640), f"{p}: {oct(mode)}"
    assert list((n.data_dir / "instances").rglob("*.dcm"))

    closed = node_factory({"node": {"allowed": [{"ae_title": "ECHOSCU"}, {"ae_title": "STORESCU"}]}}).start()
    assert "open node" not in closed.log_text()
    assert closed.status()["open_node"] is False
    for unit in (ROOT / "deploy" / "systemd").glob("*.service"):
        assert "\nUMask=0027\n" in unit.read_text(), unit.name


# --------------------------------------------------------------------------- 8. idle and slow peers

def test_idle_slow_and_too_many_peers(node_factory, tmp_path):
    """200 idle TCP connections held open: a cart still gets in within 10 s; a connection
    that sends nothing is closed after node.request_timeout_s; a peer that stops inside a
    PDU is cut off after node.network_timeout_s; above max_associations: A-ASSOCIATE-RJ."""
    n = node_factory({"node": {"request_timeout_s": 3.0, "network_timeout_s": 4.0, "max_associations": 2}}).start()
    w = Watch(n, tmp_path)
    idle = []
    for _ in range(200):
        idle.append(socket.create_connection(("127.0.0.1", n.port), timeout=10))
    t0 = time.monotonic()
    assert n.echo(timeout=10) == 0
    assert time.monotonic() - t0 < 10, "a cart waited behind idle connections"
    for s in idle[:5]:
        dt, _ = closed_or_aborted(s, 3.0 + 15)
    for s in idle:
        s.close()

    slow = socket.create_connection(("127.0.0.1", n.port), timeout=10)
    slow.sendall(struct.pack(">BBL", 0x01, 0, 2000) + b"\x00\x01")  # a request that never completes
    dt, _ = closed_or_aborted(slow, 4.0 + 15)
    slow.close()

    from pynetdicom import AE

    ae = AE(ae_title="RAWSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    held = [ae.associate("127.0.0.1", n.port, ae_title="ECHONODE") for _ in range(2)]
    assert all(a.is_established for a in held)
    t0 = time.monotonic()
    third = ae.associate("127.0.0.1", n.port, ae_title="ECHONODE")
    assert third.is_rejected and time.monotonic() - t0 < 10
    rj = third.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)  # local limit exceeded
    for a in held:
        a.release()
    ae.shutdown()
    time.sleep(0.5)
    w.legit()
