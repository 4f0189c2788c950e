#!/usr/bin/env python3
"""Fuzz the receive path: echonode vs DCMTK storescp, same cases, same run.

Half of the ``--n`` cases are mutated datasets of the real clips (byte flips, truncation,
huge or odd length fields, inserted garbage, removed chunks), sent as C-STORE with the
bytes exactly as mutated; the other half are mutated PDUs on raw sockets (unknown PDU
types, lengths claiming up to 4 GiB, A-ASSOCIATE-RQ with mutated items, truncated
streams, P-DATA with broken PDVs inside an association). Every case gets the same bytes
at both receivers; the cases depend on ``--seed`` and the clips only (not on the workers).

Cases run concurrently, most of their time being spent waiting on a peer: per receiver,
``--dataset-workers`` associations send the dataset cases (each association reused until
it breaks) and ``--pdu-workers`` connections run the PDU cases. echonode is one process
serving all of them; storescp serves one association at a time, so it runs as one process
per worker (peak RSS: the largest of them; alive: all of them).

A dataset whose SOP class / transfer syntax a receiver did not accept at negotiation
(storescp knows fewer) counts as *not_negotiated* for it. A case is *answered* (a DIMSE
response, an A-ASSOCIATE-AC/RJ) or *aborted* (A-ABORT, or the connection closed) within
``--case-timeout`` seconds (default 5, timed per case), else it counts as *unanswered*.
``bad_success``: Success for a dataset whose header pydicom cannot parse as the node
does (up to the pixel data; a Deflated dataset inflated whole), or that lacks one of the
four identifying UIDs (it must never happen). At the end: peak RSS (VmHWM) and whether
the receiver still answers a C-ECHO (``alive``). One JSON line per receiver and a summary.
``--keep-failures DIR`` writes every unanswered, refused or bad-Success case there as sent;
``--only echonode`` replays a seed's cases against one receiver.

    python3 bench/fuzz.py [--n 10000] [--clips DIR] [--seed 1] [--max-mb 1]
                          [--dataset-workers 2] [--pdu-workers 6] [--only echonode|storescp]
                          [--keep-failures DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.datadirs import default_data_dir  # noqa: E402
from echonode.commands.serve import quiet_libraries  # noqa: E402
from echonode.sandbox import dcmtk, free_port  # noqa: E402

US_MF = "1.2.840.10008.5.1.4.1.1.3.1"
VERIFICATION = "1.2.840.10008.1.1"
APP_CONTEXT = "1.2.840.10008.3.1.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"




def vm_hwm_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return float("nan")


def echo_ok(port: int, aet: str) -> bool:
    return subprocess.run([dcmtk("echoscu"), "-to", "10", "-ta", "10", "-aec", aet, "127.0.0.1", str(port)],
                          capture_output=True, timeout=30).returncode == 0


# --------------------------------------------------------------------------- receivers

class Receiver:
    def __init__(self, name: str, aet: str, work: Path):
        self.name, self.aet, self.work = name, aet, work
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.peak_mb = 0.0
        self._lock = threading.Lock()  # workers sharing a process restart it once

    def cmd(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict:
        return dict(os.environ)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd(), cwd=str(ROOT), env=self.env(), stdout=subprocess.DEVNULL,
                                     stderr=open(self.work / f"{self.name}.log", "ab"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited at start ({self.proc.returncode})")
            if echo_ok(self.port, self.aet):
                return
            time.sleep(0.2)
        raise SystemExit(f"{self.name} did not answer C-ECHO")

    def ensure_alive(self) -> None:
        with self._lock:
            if self.proc is None or self.proc.poll() is not None:
                self.restarts += 1
                self.start()

    def sample(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.peak_mb = max(self.peak_mb, vm_hwm_mb(self.proc.pid))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class StoreSCP(Receiver):
    def cmd(self) -> list[str]:
        out = self.work / f"{self.name}-out"  # one folder per process: the same UID may arrive at two at once
        out.mkdir(exist_ok=True)
        # +xa: accept every transfer syntax it knows (the mutated clips use many)
        return [dcmtk("storescp"), "+xa", "-aet", self.aet, "-od", str(out), str(self.port)]


class EchoNode(Receiver):
    def cmd(self) -> list[str]:
        cfg = self.work / "echonode.toml"
        data = self.work / "echonode-data"
        cfg.write_text("\n".join([
            f'data_dir = "{data}"', 'log_level = "WARNING"',
            "[node]", f"port = {self.port}", 'host = "127.0.0.1"', "min_free_mb = 1", "require_called_ae = false",
            "[stable]", "delay_s = 3600.0", "[queue]", "embedded_worker = false", "[metrics]", "enabled = false"]) + "\n")
        return [sys.executable, "-m", "echonode", "serve", "--config", str(cfg), "--drain", "2"]

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ECHONODE_")}
        env["PYTHONPATH"] = str(ROOT)
        return env


# --------------------------------------------------------------------------- cases

def _mutate(body: bytes, rng: random.Random) -> bytes:
    b = bytearray(body)
    kind = rng.randrange(5)
    if kind == 0:
        for _ in range(rng.randint(1, 20)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == 1:
        b = b[: rng.randrange(1, len(b))]
    elif kind == 2:
        p = rng.randrange(0, max(1, min(len(b) - 4, 4096)))
        b[p:p + 4] = rng.choice([b"\xff\xff\xff\xff", b"\xf0\xff\xff\x7f", b"\x01\x00\x00\x00", b"\xff\xff\x00\x00"])
    elif kind == 3:
        p = rng.randrange(len(b))
        b[p:p] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    else:
        p = rng.randrange(len(b))
        del b[p:p + rng.randint(1, 256)]
    return bytes(b)


def header_parses(path: Path) -> bool:
    """pydicom can read the header and the four identifying UIDs (the node's minimum).
    Deferred values stay unread (a header-only parse never needs them); pydicom inflates
    a Deflated dataset whole, so a cut deflate stream does not parse."""
    from pydicom import dcmread

    try:
        ds = dcmread(path, stop_before_pixels=True, defer_size=4096)
        return all(str(ds.get(k, "") or "").strip() for k in
                   ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"))
    except Exception:
        return False


def _uid_item(item_type: int, uid: str) -> bytes:
    v = uid.encode()
    return struct.pack(">BBH", item_type, 0, len(v)) + v


def associate_rq(called: str = "ECHONODE", calling: str = "FUZZ", contexts=((1, VERIFICATION),),
                 max_pdu: int = 16384) -> bytes:
    items = _uid_item(0x10, APP_CONTEXT)
    for cid, abstract in contexts:
        sub = _uid_item(0x30, abstract) + _uid_item(0x40, IMPLICIT_LE) + _uid_item(0x40, EXPLICIT_LE)
        items += struct.pack(">BBHBBBB", 0x20, 0, 4 + len(sub), cid, 0, 0, 0) + sub
    ui = struct.pack(">BBHL", 0x51, 0, 4, max_pdu) + _uid_item(0x52, "1.2.826.0.1.3680043.9.9999")
    items += struct.pack(">BBH", 0x50, 0, len(ui)) + ui
    body = struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode() + b"\x00" * 32 + items
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def echo_pdata(cid: int = 1) -> bytes:
    """A P-DATA-TF carrying a C-ECHO-RQ command (Implicit VR LE)."""
    def el(group, elem, value: bytes) -> bytes:
        return struct.pack("<HHL", group, elem, len(value)) + value
    uid = VERIFICATION.encode() + (b"\x00" if len(VERIFICATION) % 2 else b"")
    rest = el(0, 2, uid) + el(0, 0x100, struct.pack("<H", 0x30)) + el(0, 0x110, struct.pack("<H", 1)) \
        + el(0, 0x800, struct.pack("<H", 0x0101))
    cmd = el(0, 0, struct.pack("<L", len(rest))) + rest
    pdv = struct.pack(">LBB", len(cmd) + 2, cid, 0x03) + cmd
    return struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv


def pdu_case(rng: random.Random) -> tuple[str, list[bytes], bool]:
    """(kind, chunks to send, associate first). Sending ends with a half-close (EOF)."""
    kind = rng.randrange(6)
    rq = associate_rq()
    if kind == 0:
        t = rng.choice([0x00, 0x08, 0x10, 0x41, 0xFF])
        return "unknown-type", [struct.pack(">BBL", t, 0, rng.randrange(0, 64)) + b"\x00" * 8], False
    if kind == 1:
        return "huge-length", [struct.pack(">BBL", rng.choice([1, 4, 5, 6, 7]), 0,
                                           rng.choice([1 << 30, (1 << 32) - 1, 1 << 24, 10 << 20]))], False
    if kind == 2:
        return "mutated-rq", [_mutate(rq[:6], rng)[:6] + _mutate(rq[6:], rng)
                              if rng.random() < 0.3 else rq[:6] + _mutate(rq[6:], rng)], False
    if kind == 3:
        return "truncated-rq", [rq[: rng.randrange(1, len(rq))]], False
    pd = echo_pdata()
    if kind == 4:
        return "mutated-pdata", [rq, pd[:6] + _mutate(pd[6:], rng)], True
    return "pdata-length", [rq, struct.pack(">BBL", 0x04, 0, rng.choice([1 << 30, 0, 3, len(pd) + 100])) + pd[6:]], True


def run_pdu_case(port: int, chunks: list[bytes], assoc_first: bool, timeout: float) -> str:
    """'answered', 'aborted' or 'unanswered' (nothing, connection still open after timeout)."""
    t_end = time.monotonic() + timeout
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError:
        return "refused"
    try:
        s.settimeout(max(0.01, t_end - time.monotonic()))
        if assoc_first:
            s.sendall(chunks[0])
            head = _recv_exact(s, 6)
            if len(head) < 6 or head[0] != 0x02:
                return "aborted" if not head or head[0] in (0x03, 0x07) else "answered"
            _recv_exact(s, struct.unpack(">L", head[2:])[0])
            chunks = chunks[1:]
        for c in chunks:
            s.sendall(c)
        head = b""
        # give the receiver time to answer before the stream ends (an EOF right after a
        # complete request may otherwise close the connection before the answer is out)
        s.settimeout(max(0.01, min(1.0, (t_end - time.monotonic()) / 2)))
        try:
            head = _recv_exact(s, 6) or b"\x07"  # closed without a word: aborted
        except socket.timeout:
            head = b""
        if not head:
            try:
                s.shutdown(socket.SHUT_WR)  # a truncated stream ends: the peer sees EOF
            except OSError:
                pass
            s.settimeout(max(0.01, t_end - time.monotonic()))
            head = _recv_exact(s, 6)
        if not head:
            return "aborted"
        if head[0] == 0x07:
            return "aborted"
        return "answered"
    except socket.timeout:
        return "unanswered"
    except (ConnectionResetError, BrokenPipeError):
        return "aborted"
    finally:
        s.close()


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


class DatasetSender:
    """C-STORE of files exactly as they are (pynetdicom chunked send); one association
    reused until it breaks."""

    def __init__(self, port: int, aet: str, contexts: set[tuple[str, str]], timeout: float):
        from pynetdicom import AE, _config

        _config.STORE_SEND_CHUNKED_DATASET = True
        self.port, self.aet = port, aet
        self.ae = AE(ae_title="FUZZSCU")
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = timeout
        for sop, ts in sorted(contexts)[:128]:
            self.ae.add_requested_context(sop, ts)
        self.assoc = None

    def send(self, path: Path, sop: str, ts: str) -> str | int:
        if self.assoc is None or not self.assoc.is_established:
            self.assoc = self.ae.associate("127.0.0.1", self.port, ae_title=self.aet)
            if not self.assoc.is_established:
                self.assoc = None
                return "refused"
        if not any(str(cx.abstract_syntax) == sop and str(cx.transfer_syntax[0]) == ts
                   for cx in self.assoc.accepted_contexts):
            return "not_negotiated"  # the receiver does not take this SOP class / transfer syntax
        try:
            st = self.assoc.send_c_store(path)
        except Exception:
            st = None
        if st is not None and "Status" in st:
            return int(st.Status)
        self.assoc = None
        return "aborted"

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            try:
                self.assoc.release()
            except Exception:
                pass
        self.ae.shutdown()


class Case:
    """One generated case. Every receiver gets the same bytes; a dataset case's file is
    removed when the last receiver is done with it."""

    def __init__(self, index: int, kind: str, users: int, *, path: Path | None = None, sop: str = "",
                 ts: str = "", parses: bool = True, chunks: list[bytes] | None = None, assoc_first: bool = False):
        self.index, self.kind, self.path, self.sop, self.ts, self.parses = index, kind, path, sop, ts, parses
        self.chunks, self.assoc_first = chunks or [], assoc_first
        self._left = users
        self._lock = threading.Lock()

    def done(self) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last and self.path is not None:
            self.path.unlink(missing_ok=True)


class Failures:
    """``--keep-failures DIR``: each case that a receiver left unanswered, refused or answered
    with a bad Success is written there as sent (``case<N>.dcm``: file meta + mutated dataset;
    ``case<N>.<receiver>.json``: the PDU chunks in hex), one line per failure in failures.jsonl."""

    def __init__(self, folder: str):
        self.dir = Path(folder) if folder else None
        self._lock = threading.Lock()
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    def record(self, case: Case, receiver: str, outcome: str, seconds: float, chunks: list[bytes]) -> None:
        if self.dir is None:
            return
        with self._lock:
            if case.path is not None:
                name = f"case{case.index:05d}.dcm"
                if not (self.dir / name).exists():
                    shutil.copyfile(case.path, self.dir / name)
            else:
                name = f"case{case.index:05d}.{receiver}.json"
                (self.dir / name).write_text(json.dumps({"assoc_first": case.assoc_first,
                                                         "chunks": [c.hex() for c in chunks]}) + "\n")
            with open(self.dir / "failures.jsonl", "a") as fh:
                fh.write(json.dumps({"case": case.index, "kind": case.kind, "receiver": receiver,
                                     "outcome": outcome, "seconds": round(seconds, 3), "file": name}) + "\n")


class Target:
    """One receiver as reported: echonode is one process that every worker shares; storescp
    (one association at a time) is one process per worker, so no case waits in its backlog."""

    def __init__(self, name: str, aet: str, procs: list[Receiver]):
        self.name, self.aet, self.procs = name, aet, procs
        self.lock = threading.Lock()
        self.stats = {"cases": 0, "answered": 0, "aborted": 0, "unanswered": 0, "refused": 0, "success": 0,
                      "bad_success": 0, "not_negotiated": 0, "slowest_s": 0.0, "by_kind": {}}

    def proc(self, worker: int) -> Receiver:
        return self.procs[worker % len(self.procs)]

    def count(self, case: Case, out: str | int, dt: float, timeout: float) -> str:
        """Adds one outcome; returns it as counted ('bad_success' where that applies)."""
        with self.lock:
            st = self.stats
            st["cases"] += 1
            st["slowest_s"] = max(st["slowest_s"], round(dt, 3))
            if case.path is None:  # a PDU case
                st[out] += 1
                bk = st["by_kind"].setdefault(case.kind, {})
                bk[out] = bk.get(out, 0) + 1
                return str(out)
            if isinstance(out, int):
                counted = "answered" if dt <= timeout else "unanswered"
                st[counted] += 1
                if out == 0:
                    st["success"] += 1
                    if not case.parses:
                        st["bad_success"] += 1
                        return "bad_success"
                return counted
            if out == "not_negotiated":
                st["not_negotiated"] += 1
                return out
            counted = out if dt <= timeout else "unanswered"
            st[counted] += 1
            return counted


def dataset_worker(t: Target, proc: Receiver, q: queue.Queue, contexts, timeout: float, failures: Failures,
                   errors: list) -> None:
    """C-STORE the dataset cases on one association, reused until it breaks."""
    sender = None
    while (case := q.get()) is not None:
        try:
            if errors:
                continue
            proc.ensure_alive()
            if sender is None:
                sender = DatasetSender(proc.port, t.aet, contexts, timeout)
            t0 = time.monotonic()
            out = sender.send(case.path, case.sop, case.ts)
            dt = time.monotonic() - t0
            counted = t.count(case, out, dt, timeout)
            if counted in ("unanswered", "refused", "bad_success"):
                failures.record(case, t.name, counted, dt, [])
            if isinstance(out, str) and out not in ("refused", "not_negotiated"):
                sender.close()
                sender = None
        except BaseException as exc:  # a receiver that cannot be restarted: stop the run
            errors.append(exc)
        finally:
            case.done()
    if sender is not None:
        sender.close()


def pdu_worker(t: Target, proc: Receiver, q: queue.Queue, timeout: float, failures: Failures,
               errors: list) -> None:
    while (case := q.get()) is not None:
        try:
            if errors:
                continue
            proc.ensure_alive()
            chunks = case.chunks
            if case.assoc_first:  # called AE must match each receiver
                chunks = [associate_rq(called=t.aet)] + chunks[1:]
            t0 = time.monotonic()
            out = run_pdu_case(proc.port, chunks, case.assoc_first, timeout)
            dt = time.monotonic() - t0
            if t.count(case, out, dt, timeout) in ("unanswered", "refused"):
                failures.record(case, t.name, out, dt, chunks)
        except BaseException as exc:
            errors.append(exc)
        finally:
            case.done()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--clips", default=str(default_data_dir("realworld")))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-mb", type=float, default=1.0, help="use real files up to this size")
    ap.add_argument("--case-timeout", type=float, default=5.0)
    ap.add_argument("--dataset-workers", type=int, default=2,
                    help="associations per receiver sending the dataset cases at the same time")
    ap.add_argument("--pdu-workers", type=int, default=6,
                    help="connections per receiver running the PDU cases at the same time")
    ap.add_argument("--only", choices=("echonode", "storescp"), default="",
                    help="run the cases against one receiver (the cases stay those of the seed)")
    ap.add_argument("--keep-failures", default="", metavar="DIR",
                    help="write each unanswered, refused or bad-Success case there, as sent")
    ap.add_argument("--workdir", default="")
    args = ap.parse_args()
    quiet_libraries()  # headers are read as `echonode serve` reads them (no value validation)

    from pynetdicom.dsutils import split_dataset

    clips = Path(args.clips)
    files = sorted(p for p in clips.rglob("*.dcm") if p.stat().st_size <= args.max_mb * 1e6)
    if not files:
        raise SystemExit(f"no DICOM files under {clips}")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="echonode-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "cases").mkdir(exist_ok=True)
    srcs = []
    contexts: set[tuple[str, str]] = set()
    for f in files:
        try:
            meta, off = split_dataset(f)
            contexts.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
            srcs.append((f.read_bytes(), off, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
        except Exception:
            continue
    rng = random.Random(args.seed)
    nd, npdu = max(1, args.dataset_workers), max(1, args.pdu_workers)
    targets = [Target("echonode", "ECHONODE", [EchoNode("echonode", "ECHONODE", work)]),
               Target("storescp", "STORESCP",
                      [StoreSCP(f"storescp{k}", "STORESCP", work) for k in range(nd + npdu)])]
    targets = [t for t in targets if args.only in ("", t.name)]
    procs = [p for t in targets for p in t.procs]
    failures = Failures(args.keep_failures)
    errors: list[BaseException] = []
    kinds: dict[str, int] = {}
    t_start = time.monotonic()
    try:
        for p in procs:
            p.start()
        threads, queues = [], []
        for t in targets:
            dq: queue.Queue = queue.Queue(maxsize=2 * nd)
            pq: queue.Queue = queue.Queue(maxsize=2 * npdu)
            queues.append((t, dq, pq))
            for k in range(nd):
                threads.append(threading.Thread(target=dataset_worker, daemon=True,
                                                args=(t, t.proc(npdu + k), dq, contexts, args.case_timeout,
                                                      failures, errors)))
            for k in range(npdu):
                threads.append(threading.Thread(target=pdu_worker, daemon=True,
                                                args=(t, t.proc(k), pq, args.case_timeout, failures, errors)))
        for th in threads:
            th.start()
        for i in range(args.n):
            if errors:
                break
            if i % 2 == 0:
                blob, off, sop, ts = srcs[rng.randrange(len(srcs))]
                path = work / "cases" / f"{i}.dcm"
                path.write_bytes(blob[:off] + _mutate(blob[off:], rng))
                case = Case(i, "dataset", len(targets), path=path, sop=sop, ts=ts, parses=header_parses(path))
            else:
                kind, chunks, assoc_first = pdu_case(rng)
                case = Case(i, kind, len(targets), chunks=chunks, assoc_first=assoc_first)
            kinds[case.kind] = kinds.get(case.kind, 0) + 1
            for t, dq, pq in queues:
                (dq if case.path is not None else pq).put(case)
            if i % 100 == 0:
                for p in procs:
                    p.sample()
                done = min(t.stats["cases"] for t in targets)
                print(f"fuzz: {i}/{args.n} cases generated, {done} done, {time.monotonic() - t_start:.0f} s",
                      file=sys.stderr, flush=True)
        for t, dq, pq in queues:
            for _ in range(nd):
                dq.put(None)
            for _ in range(npdu):
                pq.put(None)
        for th in threads:
            th.join()
        if errors:
            raise SystemExit(f"fuzz stopped: {errors[0]}")
        for t in targets:
            for p in t.procs:
                p.sample()
            alive = all(p.proc is not None and p.proc.poll() is None and echo_ok(p.port, t.aet) for p in t.procs)
            st = t.stats
            st.update({"peak_rss_mb": max(p.peak_mb for p in t.procs), "alive": alive,
                       "restarts": sum(p.restarts for p in t.procs), "processes": len(t.procs),
                       "all_within_timeout": st["unanswered"] == 0 and st["refused"] == 0})
            print(json.dumps({"bench": "fuzz", "receiver": t.name, **st}), flush=True)
        node = next((t.stats for t in targets if t.name == "echonode"), None)
        print(json.dumps({"bench": "fuzz", "summary": True, "n": args.n, "seed": args.seed,
                          "clips": len(srcs), "case_timeout_s": args.case_timeout, "kinds": kinds,
                          "workers": {"dataset": nd, "pdu": npdu},
                          "seconds": round(time.monotonic() - t_start, 1),
                          "echonode_ok": None if node is None else
                          node["bad_success"] == 0 and node["all_within_timeout"] and node["alive"]}), flush=True)
    finally:
        for p in procs:
            p.stop()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
