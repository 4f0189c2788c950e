"""Nothing acknowledged is lost: versions of one SOP Instance UID, failures between placing a
file and its commit, kill -9 at any moment, disk full at each write step, and the reconciler
(``echonode fsck``). Real ``echonode serve``, DCMTK storescu, real SQLite/PostgreSQL, real tmpfs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session

from echonode.store.models import Instance, InstanceHistory
from tests.fixtures.node import ROOT, dataset_bytes, dcmtk

pytestmark = pytest.mark.timeout(300)


# --------------------------------------------------------------------------- helpers

def clip(path: Path, sop: str, study: str, series: str, *, desc: str = "A4C", frames: int = 4, size: int = 64,
         seed: int = 0) -> Path:
    """A small RGB multi-frame US clip; ``desc`` varies the bytes of one SOP Instance UID."""
    rng = np.random.default_rng(seed)
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = sop, study, series
    ds.Modality, ds.PatientID, ds.SeriesDescription, ds.InstanceNumber = "US", "DURABLE", desc, 1
    ds.NumberOfFrames, ds.Rows, ds.Columns, ds.FrameTime = frames, size, size, 33.3
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = rng.integers(0, 255, (frames, size, size, 3), dtype=np.uint8).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


def db_session(node) -> Session:
    engine = create_engine(node.settings.db_url)
    return Session(engine)


def versions(node) -> dict[str, dict[str, str]]:
    """sop -> {dataset-bytes sha256: stored path} over every file the index names."""
    out: dict[str, dict[str, str]] = {}
    with db_session(node) as s:
        for i in s.scalars(select(Instance)):
            out.setdefault(i.sop_instance_uid, {})[i.path] = i.sha256
        for h in s.scalars(select(InstanceHistory)):
            for p, sha in ((h.old_path, h.old_sha256), (h.new_path, h.new_sha256)):
                if p:
                    out.setdefault(h.sop_instance_uid, {})[p] = sha
        s.get_bind().dispose()
    by_payload: dict[str, dict[str, str]] = {}
    for sop, paths in out.items():
        for p, sha in paths.items():
            f = node.data_dir / p
            assert f.is_file(), f"indexed file missing: {p}"
            assert hashlib.sha256(f.read_bytes()).hexdigest() == sha, f"sha256 of {p} disagrees with the index"
            by_payload.setdefault(sop, {})[hashlib.sha256(dataset_bytes(f)).hexdigest()] = p
    return by_payload


def payload_sha(path: Path) -> str:
    return hashlib.sha256(dataset_bytes(path)).hexdigest()


def current(node, sop: str) -> Instance:
    with db_session(node) as s:
        row = s.scalars(select(Instance).where(Instance.sop_instance_uid == sop)).one()
        s.get_bind().dispose()
    return row


def fsck(node, *args: str) -> tuple[int, dict]:
    res = subprocess.run([sys.executable, "-m", "echonode", "fsck", "--json", "--config", str(node.settings_path),
                          *args], cwd=str(ROOT), env=node.env, capture_output=True, text=True, timeout=120)
    assert res.stdout.strip(), res.stderr
    return res.returncode, json.loads(res.stdout.strip().splitlines()[-1])


def statuses(res: subprocess.CompletedProcess) -> list[str]:
    """storescu -v: the status text of every Store Response, in order."""
    return re.findall(r"Received Store Response \(([^)]*)\)", res.stdout + res.stderr)


def send(node, files, *args) -> subprocess.CompletedProcess:
    return node.storescu(files, "-v", "-xe", *args, timeout=120)


# DCMTK's words for 0xA7xx and 0xCxxx (0xC211 included)
REFUSED = re.compile(r"Refused: OutOfResources|Error: CannotUnderstand")


# --------------------------------------------------------------------------- same UID, different bytes

def _install_failure(node, backend: str) -> None:
    """Make the transaction that records a second version fail after the file is placed:
    PostgreSQL at COMMIT (a deferred constraint trigger), SQLite at the history INSERT."""
    engine = create_engine(node.settings.db_url)
    with engine.begin() as c:
        if backend == "postgresql":
            c.execute(text("CREATE FUNCTION echonode_test_fail() RETURNS trigger LANGUAGE plpgsql AS "
                           "$$ BEGIN RAISE EXCEPTION 'injected commit failure'; END $$"))
            c.execute(text("CREATE CONSTRAINT TRIGGER echonode_test_fail AFTER INSERT ON instance_history "
                           "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION echonode_test_fail()"))
        else:
            c.execute(text("CREATE TRIGGER echonode_test_fail BEFORE INSERT ON instance_history "
                           "BEGIN SELECT RAISE(ABORT, 'injected failure'); END"))
    engine.dispose()


def _remove_failure(node, backend: str) -> None:
    engine = create_engine(node.settings.db_url)
    with engine.begin() as c:
        if backend == "postgresql":
            c.execute(text("DROP TRIGGER echonode_test_fail ON instance_history"))
            c.execute(text("DROP FUNCTION echonode_test_fail()"))
        else:
            c.execute(text("DROP TRIGGER echonode_test_fail"))
    engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_second_version_whose_commit_fails_loses_nothing(node_factory, tmp_path, backend, request):
    url = request.getfixturevalue("pg_url") if backend == "postgresql" else ""
    node = node_factory(database_url=url).start()
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    v1 = clip(tmp_path / "v1.dcm", sop, study, series, desc="first", seed=1)
    v2 = clip(tmp_path / "v2.dcm", sop, study, series, desc="second", seed=2)
    assert statuses(send(node, [v1])) == ["Success"]
    first = current(node, sop)
    first_file = node.data_dir / first.path
    first_bytes = first_file.read_bytes()

    _install_failure(node, backend)
    res = send(node, [v2])
    assert res.returncode != 0 and statuses(res) and statuses(res)[0] != "Success", res.stdout + res.stderr
    # the acknowledged object is untouched and still current; the index agrees with it
    assert first_file.read_bytes() == first_bytes
    row = current(node, sop)
    assert (row.path, row.sha256) == (first.path, hashlib.sha256(first_bytes).hexdigest())
    # the second object's file stayed beside it (never acknowledged): fsck finds it (beside
    # the running node fsck leaves young files alone unless told otherwise)
    assert fsck(node)[1]["recent"] != []
    rc, rep = fsck(node, "--min-age", "0")
    assert rc == 1 and rep["missing"] == [] and rep["sha_mismatch"] == [], rep
    assert rep["recent"] == [] and len(rep["unindexed"]) == 1, rep
    [orphan] = rep["unindexed"]
    assert payload_sha(node.data_dir / orphan) == payload_sha(v2)

    _remove_failure(node, backend)
    node.stop()
    # the reconciler at start indexes it as a recorded, non-current version
    node.start()
    found = versions(node)[sop]
    assert set(found) == {payload_sha(v1), payload_sha(v2)}
    assert current(node, sop).path == first.path
    # the cart sends it again: Success, and (node.on_conflict = replace) it becomes current
    assert statuses(send(node, [v2])) == ["Success"]
    assert current(node, sop).path == orphan
    assert set(versions(node)[sop]) == {payload_sha(v1), payload_sha(v2)}
    assert first_file.read_bytes() == first_bytes
    node.stop()
    rc, rep = fsck(node)
    assert rc == 0 and rep["problems"] == 0 and rep["files"] == 2, rep


def test_keep_first_and_config_validation(node_factory, tmp_path):
    node = node_factory({"node": {"on_conflict": "keep-first"}}).start()
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    v1 = clip(tmp_path / "v1.dcm", sop, study, series, desc="first", seed=1)
    v2 = clip(tmp_path / "v2.dcm", sop, study, series, desc="second", seed=2)
    assert statuses(send(node, [v1, v2, v2])) == ["Success"] * 3
    row = current(node, sop)
    assert payload_sha(node.data_dir / row.path) == payload_sha(v1) and row.replaced_count == 0
    with db_session(node) as s:
        [h] = s.scalars(select(InstanceHistory)).all()  # the repeat of v2 is a duplicate
        s.get_bind().dispose()
    assert h.current == "old" and h.old_path == row.path
    assert payload_sha(node.data_dir / h.new_path) == payload_sha(v2)
    assert Path(h.new_path).name == f"{sop}.{h.new_sha256[:16]}.dcm"
    node.stop()
    assert fsck(node)[0] == 0

    bad = node_factory({"node": {"on_conflict": "newest"}})
    res = subprocess.run([sys.executable, "-m", "echonode", "status", "--config", str(bad.settings_path)],
                         cwd=str(ROOT), env=bad.env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 3 and "node.on_conflict" in res.stderr, res.stderr


def test_retention_removes_only_old_noncurrent_versions(node_factory, tmp_path):
    node = node_factory().start()
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    v = [clip(tmp_path / f"v{i}.dcm", sop, study, series, desc=f"v{i}", seed=i) for i in range(3)]
    assert statuses(send(node, v)) == ["Success"] * 3
    node.stop()
    assert len(list((node.data_dir / "instances").rglob("*.dcm"))) == 3

    def retention(*args):
        res = subprocess.run([sys.executable, "-m", "echonode", "retention", "--json", "--config",
                              str(node.settings_path), *args], cwd=str(ROOT), env=node.env,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout), res.stderr

    out, _ = retention("--instance-history-older-than", "1")
    assert out["files"] == [] and out["history_rows"] == 0
    out, _ = retention("--instance-history-older-than", "0")  # dry run: names both old versions
    assert len(out["files"]) == 2 and not out["apply"]
    assert len(list((node.data_dir / "instances").rglob("*.dcm"))) == 3
    out, log = retention("--instance-history-older-than", "0", "--apply")
    assert len(out["files"]) == 2 and out["history_rows"] == 2
    assert all(f in log for f in out["files"])  # every removal is logged
    [left] = list((node.data_dir / "instances").rglob("*.dcm"))
    assert payload_sha(left) == payload_sha(v[2]) and str(left.relative_to(node.data_dir)) == current(node, sop).path
    assert fsck(node)[0] == 0


# --------------------------------------------------------------------------- kill -9 at any step

def test_kill9_while_versions_arrive(node_factory, tmp_path):
    """Rounds of: send a batch of new versions of stored instances, kill -9 at a moment that
    moves through the store steps (temp write, fsync, link, dir fsync, statements, COMMIT,
    response), restart. After each: every acknowledged object is indexed with its sha256,
    every version that reached the index stays recoverable, fsck finds nothing wrong."""
    node = node_factory().start()
    study, series = generate_uid(), generate_uid()
    n = 16
    sops = [generate_uid() for _ in range(n)]
    src = tmp_path / "src"
    src.mkdir()
    base = [clip(src / f"v0-{i}.dcm", sops[i], study, series, desc="v0", seed=i) for i in range(n)]
    assert statuses(send(node, base)) == ["Success"] * n
    acked: dict[str, set[str]] = {sop: {payload_sha(f)} for sop, f in zip(sops, base)}
    rng = random.Random(14)
    for rnd in range(1, 3):
        files = [clip(src / f"v{rnd}-{i}.dcm", sops[i], study, series, desc=f"v{rnd}", seed=100 * rnd + i)
                 for i in range(n)]
        cmd = [dcmtk("storescu"), "-v", "-R", "-xe", "-aet", "STORESCU", "-aec", "ECHONODE", "-to", "20",
               "-ta", "20", "-td", "20", "127.0.0.1", str(node.port), *map(str, files)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        target = rng.randrange(2, n - 3)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum("Received Store Response" in ln for ln in list(lines)) < target:
            time.sleep(0.001)
        time.sleep(rng.random() * 0.02)  # somewhere inside the next store
        node.kill9()
        proc.wait(60)
        reader.join(10)
        current_msg = None
        for ln in lines:
            m = re.search(r"Sending Store Request \(MsgID (\d+)", ln)
            if m:
                current_msg = int(m.group(1))
            elif "Received Store Response (Success)" in ln and current_msg is not None:
                acked[sops[current_msg - 1]].add(payload_sha(files[current_msg - 1]))
        node.start()  # the reconciler runs before the SCP listens
        found = versions(node)
        for sop, shas in acked.items():
            assert shas <= set(found.get(sop, {})), f"round {rnd}: an acknowledged version was lost"
        node.stop()
        rc, rep = fsck(node)
        assert rc == 0 and rep["problems"] == 0 and rep["unindexed"] == [] and rep["incoming"] == [], rep
        assert not list((node.data_dir / "orphans").glob("*.dcm")), "a stored object could not be indexed"
        node.start()


# --------------------------------------------------------------------------- reconciler

def test_fsck_indexes_orphan_moves_junk_reports_missing(node_factory, tmp_path):
    from echonode.dicom.spool import file_meta_bytes

    node = node_factory().start()
    study, series = generate_uid(), generate_uid()
    sops = [generate_uid() for _ in range(3)]
    files = [clip(tmp_path / f"{i}.dcm", sops[i], study, series, seed=i) for i in range(3)]
    assert statuses(send(node, files[:2])) == ["Success"] * 2
    node.stop()
    assert fsck(node)[0] == 0
    inst = node.data_dir / "instances" / study / series
    # an orphan: the spool's bytes for the third object in their place, without a row
    orphan = inst / f"{sops[2]}.dcm"
    orphan.write_bytes(file_meta_bytes("1.2.840.10008.5.1.4.1.1.3.1", sops[2], ExplicitVRLittleEndian)
                       + dataset_bytes(files[2]))
    junk = inst / "notes.txt"
    junk.write_bytes(b"not DICOM")
    stale = node.data_dir / "instances" / ".incoming" / "abc.part"
    stale.write_bytes(b"partial")
    # a row without a file
    gone_row = current(node, sops[1])
    gone = node.data_dir / gone_row.path
    shutil.move(gone, tmp_path / "moved-away.dcm")
    # a file whose bytes disagree with its row (same size)
    changed = node.data_dir / current(node, sops[0]).path
    original = changed.read_bytes()
    changed.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))

    rc, rep = fsck(node)  # read-only: reports, changes nothing
    assert rc == 1
    assert rep["missing"] == [gone_row.path] and rep["sha_mismatch"] == [str(changed.relative_to(node.data_dir))]
    assert sorted(rep["unindexed"]) == sorted(str(p.relative_to(node.data_dir)) for p in (orphan, junk))
    assert rep["incoming"] == ["abc.part"] and stale.exists() and orphan.exists() and junk.exists()
    assert fsck(node, "--quick")[1]["sha_mismatch"] == []  # --quick compares sizes only

    rc, rep = fsck(node, "--repair")
    assert rc == 1  # the missing file and the changed bytes cannot be repaired, and stay reported
    assert rep["indexed"] == [str(orphan.relative_to(node.data_dir))]
    [moved] = rep["orphaned"]
    assert moved["path"] == str(junk.relative_to(node.data_dir)) and "cannot be indexed" in moved["reason"]
    assert (node.data_dir / moved["orphan"]).read_bytes() == b"not DICOM"
    assert "notes.txt" in (node.data_dir / moved["orphan"]).with_suffix(".txt").read_text()
    assert not stale.exists() and not junk.exists()
    row = current(node, sops[2])
    assert row.path == str(orphan.relative_to(node.data_dir)) and row.sha256 == hashlib.sha256(orphan.read_bytes()).hexdigest()
    rc, rep = fsck(node)
    assert rep["unindexed"] == [] and rep["missing"] == [gone_row.path] and rc == 1
    # the lost file comes back (from a backup): clean
    shutil.move(tmp_path / "moved-away.dcm", gone)
    changed.write_bytes(original)
    assert fsck(node)[0] == 0


# --------------------------------------------------------------------------- disk full

@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(name, size="20m", inodes=None) -> Path``: a small tmpfs mounted for this test."""
    mounts: list[Path] = []

    def mount(name: str, size: str = "20m", inodes: int | None = None) -> Path:
        d = tmp_path / name
        d.mkdir()
        opts = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True, text=True)
        if res.returncode != 0:  # fail, not skip: the disk-full cases need it
            pytest.fail(f"cannot mount a tmpfs (needs root): {res.stderr}")
        mounts.append(d)
        return d

    yield mount
    for d in reversed(mounts):
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def fill_bytes(d: Path, leave: int = 0) -> Path:
    """Fill the file system of ``d`` until ENOSPC, then give back ``leave`` bytes."""
    filler = d / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    chunk = b"\0" * (1 << 16)
    try:
        while True:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
        size = os.fstat(fd).st_size
        os.ftruncate(fd, max(0, size - leave))
    finally:
        os.close(fd)
    return filler


def fill_inodes(d: Path, leave: int) -> list[Path]:
    """Use every free inode of ``d``'s file system but ``leave``."""
    folder = d / "inode-filler"
    folder.mkdir()
    made = []
    while True:
        p = folder / f"{len(made)}"
        try:
            p.touch()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            break
        made.append(p)
    for p in made[len(made) - leave:]:
        p.unlink()
    return made[:len(made) - leave]


def test_disk_full_spool_and_placement(node_factory, tmpfs, tmp_path):
    data = tmpfs("data", "20m", inodes=400)
    node = node_factory({"data_dir": str(data / "node")})
    node.data_dir = data / "node"
    node.start()
    study, series = generate_uid(), generate_uid()
    ok = clip(tmp_path / "ok.dcm", generate_uid(), study, series, seed=1)
    assert statuses(send(node, [ok])) == ["Success"]

    # 1. the spool's temp file: 2 MiB free, a 3 MiB clip
    big = clip(tmp_path / "big.dcm", generate_uid(), study, series, frames=4, size=512, seed=2)
    filler = fill_bytes(data, leave=2 << 20)
    res = send(node, [big])
    assert statuses(res) == ["Refused: OutOfResources"], res.stdout + res.stderr
    assert "could not write instance: No space left" in node.log_text()
    assert not list((node.data_dir / "instances" / ".incoming").iterdir())
    filler.unlink()  # space returns: the same node takes it
    assert statuses(send(node, [big])) == ["Success"]

    # 2. placement: bytes are free but no inode for the new study's directories
    other = clip(tmp_path / "other.dcm", generate_uid(), generate_uid(), generate_uid(), seed=3)
    used = fill_inodes(data, leave=2)  # the temp file and one directory; the next mkdir fails
    res = send(node, [other])
    assert statuses(res) and REFUSED.search(statuses(res)[0]), res.stdout + res.stderr
    assert "could not store instance: No space left" in node.log_text()  # at placement, not the temp file
    assert node.wait_log("statuses 0xA700x1", 2).count("statuses 0xA700x1") == 2
    for p in used:
        p.unlink()
    assert statuses(send(node, [other])) == ["Success"]
    assert len(versions(node)) == 3
    node.stop()
    rc, rep = fsck(node)
    assert rc == 0 and rep["files"] == 3, rep


def test_disk_full_database(node_factory, tmpfs, tmp_path):
    dbfs = tmpfs("db", "20m")
    node = node_factory(database_url=f"sqlite:///{dbfs}/echonode.sqlite3").start()
    files = [clip(tmp_path / f"{i}.dcm", generate_uid(), generate_uid(), generate_uid(), seed=i) for i in range(8)]
    assert statuses(send(node, files[:1])) == ["Success"]
    filler = fill_bytes(dbfs)
    refused_at = None
    for i, f in enumerate(files[1:], 1):  # WAL space already there may take a few commits
        st = statuses(send(node, [f]))
        assert len(st) == 1
        if st[0] != "Success":
            assert REFUSED.search(st[0]), st
            refused_at = i
            break
    assert refused_at is not None, "the database never ran out of space"
    assert "could not index instance" in node.log_text()  # the SQL step, not the file steps
    assert "statuses 0xC211x1" in node.wait_log("statuses 0xC211x1")
    acknowledged = files[:refused_at]
    found = versions(node)
    assert all(payload_sha(f) in {s for v in found.values() for s in v} for f in acknowledged)
    filler.unlink()  # space returns: the same node, no restart, takes the refused object
    assert statuses(send(node, [files[refused_at]])) == ["Success"]
    assert len(versions(node)) == refused_at + 1
    node.stop()
    rc, rep = fsck(node)
    assert rc == 0 and rep["files"] == refused_at + 1, rep


def test_results_write_on_full_disk_leaves_nothing_partial(tmpfs):
    """The atomic write used for results (echonode.dicom.scu.write_results) on a full disk:
    raises ENOSPC, leaves no temp file and no partial result; works once space returns."""
    from echonode.dicom.scu import write_results
    from echonode.storage.local import LocalStorage

    d = tmpfs("results", "4m")
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    ds.SOPInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "SR"
    ds.TextValue = "x" * (256 << 10)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    filler = fill_bytes(d, leave=64 << 10)
    with pytest.raises(OSError) as err:
        write_results(LocalStorage(d / "out"), [ds])
    # pydicom re-raises the write error as a plain OSError naming the tag (errno None), so
    # the errno is only in the message
    assert err.value.errno == errno.ENOSPC or "No space left on device" in str(err.value), repr(err.value)
    assert [p for p in (d / "out").rglob("*") if p.is_file()] == []
    filler.unlink()
    [obj] = write_results(LocalStorage(d / "out"), [ds])
    assert (d / "out" / obj.path).stat().st_size > 256 << 10


# --------------------------------------------------------------------------- kill -9 at one chosen step

STEPS = {
    # strace holds the node's thread at one system call of the store for a few seconds; the
    # test kills the node with SIGKILL meanwhile. The first fsync after attaching is the temp
    # file's (the database fsyncs come after the link).
    "temp-file-fsync": "fsync:delay_enter=3000000:when=1",
    "before-link": "link,linkat:delay_enter=3000000",
    "after-link-before-commit": "link,linkat:delay_exit=3000000",
}


@pytest.mark.parametrize("step", sorted(STEPS))
def test_kill9_at_a_store_step(node_factory, tmp_path, step):
    node = node_factory().start()
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    v1 = clip(tmp_path / "v1.dcm", sop, study, series, desc="first", seed=1)
    v2 = clip(tmp_path / "v2.dcm", sop, study, series, desc="second", seed=2)
    assert statuses(send(node, [v1])) == ["Success"]
    first = current(node, sop)
    first_bytes = (node.data_dir / first.path).read_bytes()
    threads = [a for t in sorted(Path(f"/proc/{node.proc.pid}/task").iterdir()) for a in ("-p", t.name)]
    tracer = subprocess.Popen(["strace", "-f", "-o", str(tmp_path / "strace.log"), "-e",
                               f"inject={STEPS[step]}", *threads],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)  # attached to every thread
        assert tracer.poll() is None, tracer.stderr.read()
        cart = subprocess.Popen([dcmtk("storescu"), "-v", "-R", "-xe", "-aet", "STORESCU", "-aec", "ECHONODE",
                                 "-to", "20", "-ta", "20", "-td", "20", "127.0.0.1", str(node.port), str(v2)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(1.5)  # the store is now held at the step
        incoming = list((node.data_dir / "instances" / ".incoming").glob("*.part"))
        placed = sorted((node.data_dir / first.path).parent.glob("*.dcm"))
        node.kill9()
        out, _ = cart.communicate(timeout=60)
    finally:
        tracer.kill()
        tracer.wait(10)
    assert "Received Store Response (Success)" not in out, out
    # where the store was held shows on disk: the temp file, and after the link the second file
    assert len(incoming) == 1
    assert len(placed) == (2 if step == "after-link-before-commit" else 1)
    assert (node.data_dir / first.path).read_bytes() == first_bytes

    node.start()  # the reconciler: temp files removed, a placed file indexed as a non-current version
    rep = node.log_text().rsplit("reconciler: ", 1)[1].splitlines()[0]
    assert "1 temp files removed" in rep, rep
    assert ("1 indexed now" if step == "after-link-before-commit" else "0 indexed now") in rep, rep
    found = versions(node)[sop]
    assert payload_sha(v1) in found and current(node, sop).path == first.path
    assert (payload_sha(v2) in found) == (step == "after-link-before-commit")
    # the cart sends again: Success, current (node.on_conflict = replace), both recoverable
    assert statuses(send(node, [v2])) == ["Success"]
    assert set(versions(node)[sop]) == {payload_sha(v1), payload_sha(v2)}
    assert payload_sha(node.data_dir / current(node, sop).path) == payload_sha(v2)
    node.stop()
    rc, rep = fsck(node)
    assert rc == 0 and rep["files"] == 2 and rep["incoming"] == [], rep
