"""The SCP end to end: DCMTK storescu/echoscu and raw DIMSE against ``echonode serve``."""

from __future__ import annotations

import functools
import hashlib
import random
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from echonode.dicom.spool import version_name_ok
from echonode.store import db
from echonode.store.models import Instance, InstanceHistory, Patient, Series, Study
from tests.fixtures.node import dataset_bytes, dcmtk, send_raw, storescu_ts_flag

pytestmark = pytest.mark.timeout(240)

# DCMTK 3.6.7 cannot send these real-world files itself: two fail its parser
# ("Parse error in sequence item", broken meta group length) and JPEG XL is a transfer
# syntax it does not know. They are sent with the raw DIMSE sender instead.
DCMTK_CANNOT_SEND = {"fo-dicom__DIRW0007.dcm", "fo-dicom__GH364.dcm", "dcm4che__will-jxl.dcm"}


# In this file the File Meta's Media Storage SOP Instance UID differs from the dataset's
# SOP Instance UID. Sent raw (command UID taken from the meta) it must be refused with
# 0xA900: the UID that names the file would not be the one acknowledged. A sender that
# takes the UID from the dataset (as DCMTK does) gets it stored.
META_UID_MISMATCH = "fo-dicom__GH364.dcm"


def with_dataset_uids(src: Path, out: Path) -> Path:
    """The same dataset bytes under a file meta whose UIDs are the dataset's own."""
    from echonode.dicom.spool import file_meta_bytes

    ds = header(src)
    out.write_bytes(file_meta_bytes(str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                                    str(ds.file_meta.TransferSyntaxUID)) + dataset_bytes(src))
    return out


def send_realworld_raw(port: int, files: list[Path], tmp_path: Path) -> list[Path]:
    """Raw-send ``files``; the meta-mismatch file is refused first, then sent with fixed meta."""
    plain = [f for f in files if f.name != META_UID_MISMATCH]
    assert send_raw(port, plain) == [0] * len(plain)
    sent = list(plain)
    for f in files:
        if f.name == META_UID_MISMATCH:
            assert send_raw(port, [f]) == [0xA900]
            fixed = with_dataset_uids(f, tmp_path / f.name)
            assert send_raw(port, [fixed]) == [0]
            sent.append(fixed)
    return sent


def realworld_files(realworld_dir: Path) -> list[Path]:
    files = sorted(realworld_dir.glob("*/*.dcm"))
    assert len(files) == 22, f"expected the 22 real-world files, found {len(files)}"
    return files


def sessions_for(node):
    engine = db.make_engine(node.settings.db_url)
    return engine, db.session_factory(engine)


def instances_by_uid(node) -> dict[str, Instance]:
    engine, sessions = sessions_for(node)
    try:
        with sessions() as s:
            return {i.sop_instance_uid: i for i in s.scalars(select(Instance))}
    finally:
        engine.dispose()


@functools.lru_cache(maxsize=512)
def _header(path: Path, mtime: float) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def header(path: Path) -> pydicom.Dataset:
    path = Path(path)
    return _header(path, path.stat().st_mtime)


def _opt_str(ds, kw, n=64):
    v = ds.get(kw)
    return (str(v).strip()[:n] or None) if v not in (None, "") else None


def _da(ds, kw):
    v = _opt_str(ds, kw, 16)
    return v.replace(".", "") if v and re.fullmatch(r"\d{4}\.\d{2}\.\d{2}", v) else (v[:8] if v else None)


def check_index(node, files: list[Path], *, exact_bytes: bool) -> dict:
    """Every file's last-sent version is stored, with a correct sha256 and index attributes."""
    last_by_uid: dict[str, Path] = {}
    for f in files:
        last_by_uid[str(header(f).SOPInstanceUID)] = f
    rows = instances_by_uid(node)
    assert set(rows) == set(last_by_uid), "stored SOP Instance UIDs differ from the files sent"
    data = node.data_dir
    for uid, f in last_by_uid.items():
        row, ds = rows[uid], header(f)
        stored = data / row.path
        assert stored.is_file(), row.path
        # a replaced instance's current version has a name of its own (docs/durability.md)
        assert Path(row.path).parent == Path(f"instances/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}")
        assert version_name_ok(Path(row.path).name, uid), row.path
        blob = stored.read_bytes()
        assert hashlib.sha256(blob).hexdigest() == row.sha256
        assert len(blob) == row.size
        if exact_bytes:
            assert dataset_bytes(stored) == dataset_bytes(f), f"{f.name}: bytes changed on receive"
        meta = pydicom.dcmread(stored, stop_before_pixels=True)
        assert str(meta.file_meta.TransferSyntaxUID) == row.transfer_syntax_uid
        assert row.sop_class_uid == str(ds.SOPClassUID)
        if exact_bytes or row.transfer_syntax_uid != "1.2.840.10008.1.2.1":
            assert row.transfer_syntax_uid == str(header(f).file_meta.TransferSyntaxUID), f.name
        assert row.rows == (int(ds.Rows) if "Rows" in ds else None), f.name
        assert row.columns == (int(ds.Columns) if "Columns" in ds else None)
        nf = ds.get("NumberOfFrames")
        assert row.number_of_frames == (int(nf) if nf not in (None, "") else None), f.name
        ft = ds.get("FrameTime")
        assert row.frame_time_ms == (pytest.approx(float(ft)) if ft not in (None, "") else None), f.name
        assert row.manufacturer == _opt_str(ds, "Manufacturer")
        assert row.model_name == _opt_str(ds, "ManufacturerModelName")
        assert row.calling_ae in ("STORESCU", "RAWSCU")
        assert row.decision in ("analyse", "skip") and row.reason
    engine, sessions = sessions_for(node)
    try:
        with sessions() as s:
            for uid, f in last_by_uid.items():
                ds = header(f)
                st = s.scalars(select(Study).where(Study.study_instance_uid == str(ds.StudyInstanceUID))).one()
                # study attributes come from the first instance of the study
                same_study = [header(g) for g in last_by_uid.values()
                              if str(header(g).StudyInstanceUID) == st.study_instance_uid]
                assert st.study_date in {_da(h, "StudyDate") for h in same_study}
                assert st.accession_number in {_opt_str(h, "AccessionNumber") for h in same_study}
                pat = s.get(Patient, st.patient_pk)
                assert pat.patient_id in {(_opt_str(h, "PatientID") or "") for h in same_study}
                # patients are keyed by (PatientID, issuer): several files may share one
                same = [header(g) for g in last_by_uid.values()
                        if (_opt_str(header(g), "PatientID") or "") == pat.patient_id]
                assert pat.birth_date in {_da(h, "PatientBirthDate") for h in same}
                assert pat.sex in {_opt_str(h, "PatientSex", 16) for h in same}
                if len(same) == 1:
                    assert (pat.birth_date, pat.sex) == (_da(same[0], "PatientBirthDate"),
                                                         _opt_str(same[0], "PatientSex", 16))
                se = s.scalars(select(Series).where(Series.series_instance_uid == str(ds.SeriesInstanceUID))).one()
                assert se.modality == _opt_str(ds, "Modality", 16)
            history = list(s.scalars(select(InstanceHistory)))
    finally:
        engine.dispose()
    return {"rows": rows, "history": history, "last_by_uid": last_by_uid}


def send_realworld_storescu(node, files: list[Path], tmp_path: Path) -> list[Path]:
    """storescu each real-world file proposing its own transfer syntax (grouped by option,
    one association per group); the files DCMTK 3.6.7 cannot send go raw. Returns the send order."""
    groups: dict[str, list[Path]] = {}
    cannot = [f for f in files if f.name in DCMTK_CANNOT_SEND]
    for f in files:
        if f.name not in DCMTK_CANNOT_SEND:
            flag = storescu_ts_flag(f)
            assert flag, f.name
            groups.setdefault(flag, []).append(f)
    order: list[Path] = []
    for flag, group in groups.items():
        res = node.storescu(group, flag)
        assert res.returncode == 0, (flag, [g.name for g in group], res.stderr[-2000:])
        order += group
    # assert exactly which files DCMTK cannot send, and that it really cannot
    assert {f.name for f in cannot} == DCMTK_CANNOT_SEND
    for f in cannot:
        flag = storescu_ts_flag(f)
        res = node.storescu([f], flag) if flag else None
        assert res is None or res.returncode != 0, f.name
    return order + send_realworld_raw(node.port, cannot, tmp_path)


def test_realworld_storescu(node, realworld_dir, tmp_path):
    """Every real-world file through DCMTK storescu (its own transfer syntax proposed)."""
    files = realworld_files(realworld_dir)
    order = send_realworld_storescu(node, files, tmp_path)
    found = check_index(node, order, exact_bytes=False)
    # the real-world set holds 2 pairs of different files with one SOP Instance UID each
    # (a clip and its re-encoded copy): the newer one is kept and the replacement recorded
    assert len(found["rows"]) == 20
    assert len(found["history"]) == 2
    assert all(r.replaced_count <= 1 for r in found["rows"].values())
    # the first version of each stays on disk, named by its history row
    for h in found["history"]:
        assert hashlib.sha256((node.data_dir / h.old_path).read_bytes()).hexdigest() == h.old_sha256
    status = node.status()
    assert status["instances"] == 20
    assert status["patients"] >= 1 and status["series"] >= 1
    assert isinstance(status["studies"], list) and status["study_count"] == len(status["studies"])
    assert sum(s["instances"] for s in status["studies"]) == 20
    log = node.log_text()
    # one line per association, with calling AE, peer, counts; never a patient ID
    assert re.search(r"association released: calling AE 'STORESCU' peer 127\.0\.0\.1:\d+ stored 1 ", log)
    for f in files:
        pid = header(f).get("PatientID")
        if pid and len(str(pid)) >= 4:
            assert str(pid) not in log, f"patient ID of {f.name} in the log"


def _realworld_raw_bytes_exact(node, realworld_dir, tmp_path):
    """Every real-world file as raw DIMSE bytes: stored byte for byte, never transcoded."""
    files = send_realworld_raw(node.port, realworld_files(realworld_dir), tmp_path)
    found = check_index(node, files, exact_bytes=True)
    assert len(found["rows"]) == 20
    # resending identical bytes: success, no second copy, no history
    before = {p for p in (node.data_dir / "instances").rglob("*.dcm")}
    again = [found["last_by_uid"][u] for u in sorted(found["last_by_uid"])][:5]
    assert send_raw(node.port, again) == [0] * 5
    assert {p for p in (node.data_dir / "instances").rglob("*.dcm")} == before
    assert len(check_index(node, files, exact_bytes=True)["history"]) == 2


def test_association_policy_unit():
    from echonode.config import AllowedPeer, NodeSettings
    from echonode.dicom.scp import REJECT_CALLED_AE, REJECT_CALLING_AE, AssociationPolicy

    open_default = AssociationPolicy(NodeSettings())
    assert open_default.default_open and open_default.check("ANY", "ECHONODE", "10.1.2.3").accept
    assert open_default.check("ANY", "OTHER", "10.1.2.3").reject == REJECT_CALLED_AE
    deny = AssociationPolicy(NodeSettings(allow_any_calling_ae=False))
    assert not deny.check("ANY", "ECHONODE", "127.0.0.1").accept      # empty allow-list denies all
    pol = AssociationPolicy(NodeSettings(allowed=(AllowedPeer("CART1", ("10.0.0.0/24",)),
                                                  AllowedPeer("PACS", ("127.0.0.1",)), AllowedPeer("ROAM"))))
    assert not pol.default_open                                          # a list closes the open default
    assert pol.check("CART1", "ECHONODE", "10.0.0.7").accept
    assert pol.check("CART1", "ECHONODE", "::ffff:10.0.0.7").accept    # IPv4-mapped peer address
    assert not pol.check("CART1", "ECHONODE", "10.0.1.7").accept
    assert pol.check("PACS", "ECHONODE", "127.0.0.1").accept
    assert pol.check("ROAM", "ECHONODE", "192.168.9.9").accept
    d = pol.check("STRANGER", "ECHONODE", "10.0.0.7")
    assert not d.accept and d.reject == REJECT_CALLING_AE and "STRANGER" in d.reason
    assert AssociationPolicy(NodeSettings(require_called_ae=False)).check("X", "WHATEVER", "1.2.3.4").accept


def _ct_file(path: Path) -> Path:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "CT", "CT-TEST"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 15, 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.zeros((8, 8), np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


def test_policy_ct_and_truncated(node_factory, realworld_dir, tmp_path):
    """Allow-list with host binding, called-AE check, CT refused at negotiation,
    truncated dataset answered with a failure status while the node keeps serving."""
    n = node_factory({"node": {"allow_any_calling_ae": False,
                               "allowed": [{"ae_title": "CART1", "hosts": ["127.0.0.1"]},
                                           {"ae_title": "CART2", "hosts": ["10.99.99.99"]},
                                           {"ae_title": "STORESCU"}, {"ae_title": "RAWSCU"}],
                               "max_associations": 2}})
    n.start(echo_ae="CART1")  # ECHOSCU, the default probe, is not allowed here
    assert n.echo(calling_ae="CART1") == 0
    assert n.echo(calling_ae="UNKNOWN") != 0
    assert n.echo(calling_ae="CART2") != 0          # allowed AE, wrong host
    assert subprocess.run([dcmtk("echoscu"), "-aet", "CART1", "-aec", "NOTECHONODE", "127.0.0.1", str(n.port)],
                          capture_output=True).returncode != 0
    log = n.log_text()
    assert "association rejected: calling AE 'UNKNOWN'" in log
    assert "calling AE 'CART2' not allowed from 127.0.0.1" in log

    # concurrency cap: two associations held open, a third is rejected, then room again
    from pynetdicom import AE as _AE

    cap_ae = _AE(ae_title="RAWSCU")
    cap_ae.add_requested_context("1.2.840.10008.1.1")
    held = [cap_ae.associate("127.0.0.1", n.port, ae_title="ECHONODE") for _ in range(2)]
    assert all(a.is_established for a in held)
    third = cap_ae.associate("127.0.0.1", n.port, ae_title="ECHONODE")
    assert third.is_rejected
    for a in held:
        a.release()
    deadline = time.monotonic() + 15  # the node's association threads end asynchronously (slow under load)
    while True:
        again = cap_ae.associate("127.0.0.1", n.port, ae_title="ECHONODE")
        if again.is_established or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert again.is_established
    again.release()
    cap_ae.shutdown()

    # CT: refused at presentation-context negotiation, nothing stored
    ct = _ct_file(tmp_path / "ct.dcm")
    res = n.storescu([ct], "-xe")
    assert res.returncode != 0
    assert "No Acceptable Presentation Contexts" in (res.stdout + res.stderr)
    from pynetdicom import AE

    ae = AE(ae_title="RAWSCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ExplicitVRLittleEndian)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.3.1", ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", n.port, ae_title="ECHONODE")
    assert assoc.is_established
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    rejected = {str(cx.abstract_syntax): cx.result for cx in assoc.rejected_contexts}
    assoc.release()
    ae.shutdown()
    assert accepted == {"1.2.840.10008.5.1.4.1.1.3.1"}
    assert rejected == {"1.2.840.10008.5.1.4.1.1.2": 0x03}  # abstract syntax not supported

    # truncated dataset: failure status + quarantine, node keeps serving
    src = realworld_dir / "us_multiframe" / "pydicom__examples_ybr_color.dcm"
    blob = src.read_bytes()
    _, off = __import__("pynetdicom.dsutils", fromlist=["split_dataset"]).split_dataset(src)
    bad = tmp_path / "truncated.dcm"
    bad.write_bytes(blob[: off + 200])           # cut inside the dataset header
    t0 = time.monotonic()
    status = send_raw(n.port, [bad])[0]
    assert status is not None and (status & 0xF000 == 0xC000 or status == 0xA900), hex(status or 0)
    assert time.monotonic() - t0 < 10
    q = list((n.data_dir / "quarantine").glob("*.dcm"))
    assert len(q) == 1 and re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{12}\.dcm", q[0].name)
    assert "rejected instance with status 0x" in n.log_text()
    assert send_raw(n.port, [src]) == [0]
    assert n.echo(calling_ae="CART1") == 0
    assert str(header(src).SOPInstanceUID) in instances_by_uid(n)
    assert len(instances_by_uid(n)) == 1


def _small_clip(i: int, study: str, series: str, path: Path) -> Path:
    rng = np.random.default_rng(i)
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality, ds.PatientID, ds.InstanceNumber = "US", "KILL-TEST", i + 1
    ds.NumberOfFrames, ds.Rows, ds.Columns = 4, 64, 64
    ds.FrameTime = 33.3
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = rng.integers(0, 255, (4, 64, 64, 3), dtype=np.uint8).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


def test_kill9_during_send_loses_nothing_acknowledged(node, tmp_path):
    """kill -9 in the middle of a 200-file storescu send; after restart every instance
    that storescu saw acknowledged with Success is present with its sha256 and bytes."""
    study, series = generate_uid(), generate_uid()
    src = tmp_path / "clips"
    src.mkdir()
    files = [_small_clip(i, study, series, src / f"{i:03d}.dcm") for i in range(200)]
    cmd = [dcmtk("storescu"), "-v", "-R", "-xe", "-aet", "STORESCU", "-aec", "ECHONODE", "-to", "20", "-ta", "20",
           "-td", "20", "127.0.0.1", str(node.port), *map(str, files)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # kill once about a quarter has been acknowledged
        if sum("Received Store Response (Success)" in ln for ln in list(lines)) >= 50:
            break
        time.sleep(0.01)
    node.kill9()
    proc.wait(60)
    reader.join(10)
    assert proc.returncode != 0
    # storescu -v: "Sending Store Request (MsgID n, ...)" then "Received Store Response (Success)",
    # files in command-line order, message IDs 1..n, halting at the first failure
    acked: list[int] = []
    current = None
    for ln in lines:
        m = re.search(r"Sending Store Request \(MsgID (\d+)", ln)
        if m:
            current = int(m.group(1))
        elif "Received Store Response (Success)" in ln and current is not None:
            acked.append(current)
            current = None
    assert acked == list(range(1, len(acked) + 1))
    assert 50 <= len(acked) < 200, len(acked)
    node.start()
    rows = instances_by_uid(node)
    for msg_id in acked:
        f = files[msg_id - 1]
        uid = str(header(f).SOPInstanceUID)
        assert uid in rows, f"acknowledged instance {msg_id} lost"
        stored = node.data_dir / rows[uid].path
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == rows[uid].sha256
        assert dataset_bytes(stored) == dataset_bytes(f)
    # no half-written file is left in place of an instance
    assert not list((node.data_dir / "instances" / ".incoming").glob("*.part"))
    # and the rest can be sent again after the restart
    res = node.storescu(files[len(acked):], "-xe", timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    assert len(instances_by_uid(node)) == 200


def _mutations(blob: bytes, off: int, rng: random.Random, n: int) -> list[bytes]:
    out = []
    body = blob[off:]
    for k in range(n):
        b = bytearray(body)
        kind = k % 5
        if kind == 0:    # random byte flips
            for _ in range(rng.randint(1, 20)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif kind == 1:  # truncation
            b = b[: rng.randrange(1, len(b))]
        elif kind == 2:  # a length field made huge or odd
            p = rng.randrange(0, max(1, min(len(b) - 4, 4096)))
            b[p:p + 4] = rng.choice([b"\xff\xff\xff\xff", b"\xf0\xff\xff\x7f", b"\x01\x00\x00\x00", b"\xff\xff\x00\x00"])
        elif kind == 3:  # garbage inserted
            p = rng.randrange(len(b))
            b[p:p] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        else:            # a chunk removed
            p = rng.randrange(len(b))
            del b[p:p + rng.randint(1, 256)]
        out.append(blob[:off] + bytes(b))
    return out


def test_raw_bytes_exact_then_fuzz_then_sigterm(node, realworld_dir, tmp_path):
    """One node: (1) every real-world file as raw DIMSE bytes is stored byte for byte;
    (2) mutated real datasets are each answered quickly and the node keeps serving;
    (3) SIGTERM stops it cleanly (exit 0)."""
    from pynetdicom.dsutils import split_dataset

    _realworld_raw_bytes_exact(node, realworld_dir, tmp_path)
    q_before = len(list((node.data_dir / "quarantine").glob("*.dcm")))

    rng = random.Random(20240601)
    srcs = [realworld_dir / "sr" / "pydicom__test-SR.dcm", realworld_dir / "sr" / "dcm4che__report_dfl.dcm",
            realworld_dir / "us_singleframe" / "pydicom-data__US1_J2KI.dcm",
            realworld_dir / "us_multiframe" / "pydicom-data__OBXXXX1A_rle_2frame.dcm",
            realworld_dir / "us_singleframe" / "dcm4che__US-RGB-8-esopecho.dcm"]
    fuzz_dir = tmp_path / "fuzz"
    fuzz_dir.mkdir()
    files = []
    for s in srcs:
        blob = s.read_bytes()
        _, off = split_dataset(s)
        for j, m in enumerate(_mutations(blob, off, rng, 12)):
            p = fuzz_dir / f"{s.stem}-{j}.dcm"
            p.write_bytes(m)
            files.append(p)
    t0 = time.monotonic()
    statuses = []
    for chunk in range(0, len(files), 10):
        statuses += send_raw(node.port, files[chunk:chunk + 10], timeout=10)
    elapsed = time.monotonic() - t0
    assert None not in statuses, statuses
    assert all(s == 0 or s in (0xA900, 0xC210, 0xC211) for s in statuses), [hex(s) for s in statuses]
    assert elapsed < 10 * len(files)  # every answer well inside the DIMSE timeout
    assert node.proc.poll() is None
    assert node.echo() == 0
    assert send_raw(node.port, [srcs[0]]) == [0]
    failures = sum(1 for s in statuses if s != 0)
    assert failures > 0
    assert len(list((node.data_dir / "quarantine").glob("*.dcm"))) - q_before == failures
    assert node.stop() == 0
    assert "echonode stopped" in node.log_text()


@pytest.mark.postgres
def test_realworld_storescu_postgres(node_factory, pg_url, realworld_dir, tmp_path):
    """The core store path against PostgreSQL."""
    n = node_factory(database_url=pg_url).start()
    files = realworld_files(realworld_dir)
    found = check_index(n, send_realworld_storescu(n, files, tmp_path), exact_bytes=False)
    assert len(found["rows"]) == 20 and len(found["history"]) == 2
    assert n.status()["instances"] == 20


def make_pki(d: Path) -> Path:
    """Test PKI with the openssl CLI: ``ca`` and ``rogue-ca``; leaves ``server`` and ``cart``
    signed by ``ca``, ``rogue`` by ``rogue-ca`` (SAN IP:127.0.0.1, DNS:localhost)."""
    if not shutil.which("openssl"):  # a skip would hide untested TLS; .ci/run installs it
        pytest.fail("openssl CLI not installed (apt-get install openssl)")
    d.mkdir(parents=True, exist_ok=True)

    def ossl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    def ca(name):
        ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt",
             "-days", "2", "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")

    def leaf(name, ca_name):
        ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}")
        (d / f"{name}.ext").write_text("basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
        ossl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca_name}.crt", "-CAkey", f"{ca_name}.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")

    ca("ca")
    ca("rogue-ca")
    leaf("server", "ca")
    leaf("cart", "ca")
    leaf("rogue", "rogue-ca")
    return d


def tls_node_config(d: Path, **extra) -> dict:
    return {"node": {"tls": {"enabled": True, "cert": str(d / "server.crt"), "key": str(d / "server.key"),
                             "ca": str(d / "ca.crt"), "require_client_cert": True, **extra}}}


def tls_args(d: Path, who: str = "cart") -> list[str]:
    """DCMTK options for a TLS client with ``who``'s certificate, trusting ``ca``."""
    return ["+tls", str(d / f"{who}.key"), str(d / f"{who}.crt"), "+cf", str(d / "ca.crt")]


def test_tls_mutual(node_factory, tmp_path, realworld_dir):
    """Mutual DICOM TLS: a client with a certificate from the trusted CA succeeds; a client
    with a certificate from another CA, or without TLS, is refused."""
    d = make_pki(tmp_path / "pki")
    n = node_factory(tls_node_config(d))
    trusted = tls_args(d, "cart")
    untrusted = tls_args(d, "rogue")
    n.start(echo_extra=trusted)
    assert n.echo(extra=untrusted) != 0
    assert n.echo() != 0  # plain TCP to a TLS port
    f = realworld_dir / "sr" / "pydicom__test-SR.dcm"
    assert n.storescu([f], "-xe", *trusted).returncode == 0
    assert n.storescu([f], "-xe", *untrusted).returncode != 0
    assert str(header(f).SOPInstanceUID) in instances_by_uid(n)


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_parallel_associations_all_stored(node_factory, tmp_path, backend, request):
    """Four storescu processes store into one study at once (several instances per series, the
    series spread over the associations): every C-STORE is answered Success, every instance has
    its row and its file with the indexed sha256, and rows written at the same moment shared
    COMMITs (the group commit's count in the log at stop)."""
    url = request.getfixturevalue("pg_url") if backend == "postgresql" else ""
    node = node_factory(database_url=url).start()
    study, series = generate_uid(), [generate_uid() for _ in range(6)]
    src = tmp_path / "clips"
    src.mkdir()
    files = [_small_clip(i, study, series[i % len(series)], src / f"{i:03d}.dcm") for i in range(60)]
    procs = [subprocess.Popen([dcmtk("storescu"), "-v", "-R", "-xe", "-aet", "STORESCU", "-aec", "ECHONODE",
                               "-to", "20", "-ta", "20", "-td", "20", "127.0.0.1", str(node.port),
                               *map(str, files[k::4])], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for k in range(4)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    assert [o.count("Received Store Response (Success)") for o in outs] == [15] * 4
    found = check_index(node, files, exact_bytes=True)
    assert len(found["rows"]) == len(files) and found["history"] == []
    assert len({r.series_pk for r in found["rows"].values()}) == len(series)
    assert node.stop() == 0
    m = re.search(r"index and audit rows: (\d+) writes in (\d+) commits", node.log_text())
    assert m is not None and int(m[2]) < int(m[1]), m and m[0]
