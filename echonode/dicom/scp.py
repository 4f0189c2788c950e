"""The DICOM SCP: C-ECHO and C-STORE for echo-lab storage classes (pynetdicom).

Transport (pynetdicom AE, optional mutual TLS) is kept apart from policy
(:class:`AssociationPolicy`: calling-AE allow-list with optional host binding,
called-AE check, concurrency cap) and from storage (:class:`echonode.dicom.spool.Spool`).

Only the SOP classes in :data:`STORAGE_SOP_CLASSES` (+ Verification) are accepted;
every other abstract syntax is refused at presentation-context negotiation
(PS3.8 §9.3.3.2 result 0x03 "abstract syntax not supported"), never acknowledged
and dropped. Datasets are stored in the transfer syntax they arrive in.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from pynetdicom import AE, _config, evt
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import Verification, register_uid

from echonode import audit
from echonode.config import NodeSettings, Settings
from echonode.dicom.spool import PROCESSING_FAILURE, Incoming, Spool

LOG = logging.getLogger("echonode.scp")

# pynetdicom knows the retired US classes only as generic UIDs: register them as storage.
for _uid, _kw in (("1.2.840.10008.5.1.4.1.1.6", "UltrasoundImageStorageRetired"),
                  ("1.2.840.10008.5.1.4.1.1.3", "UltrasoundMultiFrameImageStorageRetired")):
    try:
        from pynetdicom.sop_class import uid_to_service_class
        if uid_to_service_class(_uid) is not StorageServiceClass:
            register_uid(_uid, _kw, StorageServiceClass)
    except Exception:  # pragma: no cover - already registered
        pass


#: bound on any PDU before an association is negotiated (A-ASSOCIATE-RQ/AC/RJ, release,
#: abort; P-DATA that arrives too early). A request proposing 128 presentation contexts
#: with 20 transfer syntaxes each is about 75 KiB.
PRE_NEGOTIATION_MAX_PDU = 128 * 1024
#: bound on a P-DATA PDU when the local maximum is 0 ("unlimited")
UNLIMITED_PDU_CAP = 64 * 1024 * 1024
#: bound on an encoded DIMSE command set, and on a dataset that is not a C-STORE's
#: (C-STOREs stream to disk; the only other datasets we take are N-EVENT-REPORTs)
MAX_COMMAND_SET = 64 * 1024
MAX_OTHER_DATASET = 16 * 1024 * 1024
_RECV_FIRST = 64 * 1024


def _pdu_limit(dul, pdu_type: int) -> int:
    """The longest PDU (variable part) we read from this peer now."""
    assoc = getattr(dul, "assoc", None)
    if pdu_type != 0x04 or assoc is None or not assoc.is_established:
        return PRE_NEGOTIATION_MAX_PDU
    local = assoc.acceptor if assoc.is_acceptor else assoc.requestor
    mx = int(local.maximum_length or 0)
    # "plus header": some peers count the 6-byte PDU header in their fragment size
    return (mx + 6) if mx > 0 else UNLIMITED_PDU_CAP


def _install_transport_guards() -> None:
    """Hostile-peer guards on pynetdicom's receive path (installed once, process-wide).

    * ``AssociationSocket.recv``: ``recv_into`` one buffer (speed: a few Python calls
      per MB, not one per 4 KiB) that grows with the bytes that actually ARRIVE, never
      preallocated from the length a peer claims; the whole PDU must arrive within the
      association's network timeout (a trickling peer is cut off).
    * ``DULServiceProvider._read_pdu_data``: a PDU longer than our maximum (negotiated
      maximum + header; :data:`PRE_NEGOTIATION_MAX_PDU` before negotiation) is refused
      with an A-ABORT (event 19, "invalid PDU"), as DCMTK does ("Illegal PDU length").
    * ``DIMSEMessage.decode_msg``: a C-STORE-RQ's dataset goes to the spool's
      :class:`~echonode.dicom.spool.Incoming` file as fragments arrive (acceptor side,
      when the AE has a sink factory); command sets and other datasets are bounded.
    """
    import struct

    from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
    from pynetdicom.dul import DULServiceProvider
    from pynetdicom.transport import AssociationSocket

    if getattr(AssociationSocket.recv, "_echonode_guard", False):
        return

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        assoc = getattr(self, "_assoc", None) or getattr(self, "assoc", None)
        timeout = getattr(assoc, "network_timeout", None)
        deadline = time.monotonic() + timeout if timeout else None
        buf = bytearray(min(nr_bytes, _RECV_FIRST))
        got = 0
        try:
            while got < nr_bytes:
                if got == len(buf):  # grow with what arrived (doubling), capped at the request
                    buf.extend(bytes(min(nr_bytes, 2 * len(buf)) - len(buf)))
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError("PDU not received within the network timeout")
                    sock.settimeout(left)
                with memoryview(buf) as mv:
                    n = sock.recv_into(mv[got:], len(buf) - got)
                if not n:
                    break
                got += n
        finally:
            if deadline is not None:
                try:
                    sock.settimeout(timeout)
                except OSError:
                    pass
        if got != len(buf):
            del buf[got:]
        return buf

    recv._echonode_guard = True  # type: ignore[attr-defined]
    AssociationSocket.recv = recv

    def _read_pdu_data(self) -> None:
        sock = self.socket
        try:
            head = sock.recv(6)
        except (OSError, TimeoutError):
            self.event_queue.put("Evt17")  # transport closed / timed out
            return
        if len(head) != 6:
            self.event_queue.put("Evt17")
            return
        pdu_type, _, pdu_length = struct.unpack(">BBL", head)
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            LOG.warning("peer sent an unknown PDU type 0x%02X: aborting", pdu_type)
            self.event_queue.put("Evt19")
            return
        limit = _pdu_limit(self, pdu_type)
        if pdu_length > limit:
            LOG.warning("peer sent a PDU of type 0x%02X claiming %d bytes (at most %d accepted): "
                        "illegal PDU length, aborting", pdu_type, pdu_length, limit)
            self.event_queue.put("Evt19")
            return
        try:
            body = sock.recv(pdu_length)
        except (OSError, TimeoutError) as exc:
            LOG.warning("connection lost inside a PDU: %s", type(exc).__name__)
            self.event_queue.put("Evt17")
            return
        if len(body) != pdu_length:
            self.event_queue.put("Evt17")
            return
        try:
            pdu, event = self._decode_pdu(head + body)
        except Exception as exc:
            LOG.warning("undecodable PDU of type 0x%02X: %s", pdu_type, type(exc).__name__)
            self.event_queue.put("Evt19")
            return
        if pdu_type in (0x01, 0x02):
            # The state machine turns an A-ASSOCIATE PDU into a request outside any handler:
            # an item that decodes but is invalid there (a context ID of 0) killed the
            # reactor and left the peer unanswered. Rare and small: try it here once.
            try:
                pdu.to_primitive()
            except Exception as exc:
                LOG.warning("A-ASSOCIATE PDU of type 0x%02X cannot be read as a request: %s: aborting",
                            pdu_type, type(exc).__name__)
                self.event_queue.put("Evt19")
                return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    DULServiceProvider._read_pdu_data = _read_pdu_data

    orig_decode = DIMSEMessage.decode_msg

    def decode_msg(self, primitive, assoc=None) -> bool:
        sink_factory = None
        if assoc is not None and getattr(assoc, "is_acceptor", False):
            sink_factory = getattr(assoc.ae, "_echonode_sink", None)
        done = orig_decode(self, primitive, assoc)
        if (sink_factory is not None and isinstance(self, C_STORE_RQ)
                and type(self.data_set) is io.BytesIO and self.command_set is not None):
            # the command set is complete: from now on the dataset goes to disk
            try:
                sink = sink_factory(assoc, self.command_set, self.context_id)
            except Exception as exc:  # stays in memory, bounded below by MAX_OTHER_DATASET
                LOG.error("cannot open an incoming file: %s: %s", type(exc).__name__, str(exc)[:200])
            else:
                early = self.data_set.getvalue()
                self.data_set = sink
                if early:
                    sink.write(early)
        too_big = self.encoded_command_set.tell() > MAX_COMMAND_SET or (
            type(self.data_set) is io.BytesIO and self.data_set.tell() > MAX_OTHER_DATASET)
        if too_big:
            LOG.warning("DIMSE message above its bound (command set %d bytes): aborting",
                        self.encoded_command_set.tell())
            self.encoded_command_set = io.BytesIO()
            self.data_set = io.BytesIO()
            if assoc is not None:
                assoc.dul.event_queue.put("Evt19")
            return False
        return done

    DIMSEMessage.decode_msg = decode_msg


_install_transport_guards()

# Never let pynetdicom log identifiers (patient names/IDs) of requests/responses.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False

STORAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.3.1": "Ultrasound Multi-frame Image Storage",
    "1.2.840.10008.5.1.4.1.1.3": "Ultrasound Multi-frame Image Storage (Retired)",
    "1.2.840.10008.5.1.4.1.1.6.1": "Ultrasound Image Storage",
    "1.2.840.10008.5.1.4.1.1.6": "Ultrasound Image Storage (Retired)",
    "1.2.840.10008.5.1.4.1.1.6.2": "Enhanced US Volume Storage",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.1": "Multi-frame Single Bit Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.88.11": "Basic Text SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.35": "Extensible SR Storage",
}

TRANSFER_SYNTAXES: dict[str, str] = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian (retired)",
    "1.2.840.10008.1.2.1.98": "Encapsulated Uncompressed Explicit VR Little Endian",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline (Process 1)",
    "1.2.840.10008.1.2.4.51": "JPEG Extended (Process 2 & 4)",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless (Process 14)",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.4.201": "HTJ2K Lossless",
    "1.2.840.10008.1.2.4.202": "HTJ2K Lossless RPCL",
    "1.2.840.10008.1.2.4.203": "HTJ2K",
    "1.2.840.10008.1.2.5": "RLE Lossless",
    "1.2.840.10008.1.2.4.110": "JPEG XL Lossless",
    "1.2.840.10008.1.2.4.111": "JPEG XL JPEG Recompression",
    "1.2.840.10008.1.2.4.112": "JPEG XL",
}

VERIFICATION_TS = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"]

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 §9.3.4
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_LIMIT = (0x02, 0x03, 0x02)
# rejected-permanent, service-user, no-reason-given: the policy itself failed
REJECT_POLICY_ERROR = (0x01, 0x01, 0x01)


@dataclass(frozen=True)
class PolicyDecision:
    accept: bool
    reason: str = ""
    reject: tuple[int, int, int] = REJECT_CALLING_AE


def _host_matches(peer: str, allowed: str) -> bool:
    """``allowed`` may be an IP, a CIDR network, or a host name (resolved now)."""
    try:
        addr = ipaddress.ip_address(peer)
    except ValueError:
        return peer == allowed
    if addr.version == 6 and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    try:
        return addr in ipaddress.ip_network(allowed, strict=False)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(allowed, None)
    except OSError:
        return False
    return any(ipaddress.ip_address(i[4][0]) == addr for i in infos)


class AssociationPolicy:
    """Who may associate. Pure logic over :class:`NodeSettings`; no sockets.

    * ``allow_any_calling_ae=true`` and no ``allowed`` entries: any calling AE (the
      embedded laptop default). With entries, only those AEs (default deny).
    * ``allow_any_calling_ae=false``: only ``allowed`` entries (an empty list denies all).
    * an entry with ``hosts`` binds the AE title to those addresses/networks/host names.
    * ``require_called_ae``: the called AE title must be ``ae_title``.
    """

    def __init__(self, node: NodeSettings):
        self.node = node
        self.allowed = {}
        for peer in node.allowed:
            self.allowed.setdefault(peer.ae_title.strip(), []).extend(peer.hosts)

    @property
    def default_open(self) -> bool:
        return self.node.allow_any_calling_ae and not self.allowed

    def check(self, calling_ae: str, called_ae: str, peer_host: str) -> PolicyDecision:
        calling_ae = (calling_ae or "").strip()
        called_ae = (called_ae or "").strip()
        if self.node.require_called_ae and called_ae != self.node.ae_title.strip():
            return PolicyDecision(False, f"called AE {called_ae!r} is not {self.node.ae_title!r}", REJECT_CALLED_AE)
        if self.default_open:
            return PolicyDecision(True, "any calling AE accepted (node.allow_any_calling_ae)")
        if calling_ae not in self.allowed:
            return PolicyDecision(False, f"calling AE {calling_ae!r} not in node.allowed", REJECT_CALLING_AE)
        hosts = self.allowed[calling_ae]
        if hosts and not any(_host_matches(peer_host, h) for h in hosts):
            return PolicyDecision(False, f"calling AE {calling_ae!r} not allowed from {peer_host}", REJECT_CALLING_AE)
        return PolicyDecision(True, "allow-listed")


def make_ssl_context(node: NodeSettings) -> Optional[ssl.SSLContext]:
    """Server-side TLS context (TLS ≥ 1.2, BCP 195); mutual TLS when ``require_client_cert``."""
    tls = node.tls
    if not tls.enabled:
        return None
    from echonode.config import ConfigError

    if not tls.cert or not tls.key:
        raise ConfigError("node.tls.enabled needs node.tls.cert and node.tls.key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
        if tls.ca:
            ctx.load_verify_locations(cafile=tls.ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"node.tls: cannot load certificate/key/CA: {exc}") from None
    if tls.require_client_cert:
        if not tls.ca:
            raise ConfigError("node.tls.require_client_cert needs node.tls.ca (trusted CA bundle)")
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_OPTIONAL if tls.ca else ssl.CERT_NONE
    return ctx


@dataclass
class _AssocStats:
    calling_ae: str = ""
    peer: str = ""
    stored: int = 0
    duplicates: int = 0
    failures: int = 0
    started: float = field(default_factory=time.monotonic)
    statuses: dict = field(default_factory=dict)
    outcome: str = "closed"
    store_s: float = 0.0  # time spent in the spool (write, fsync, parse, SQL)


class EchoSCP:
    """The running SCP. ``start()`` listens in background threads; ``stop()`` drains."""

    def __init__(self, settings: Settings, spool: Spool, policy: Optional[AssociationPolicy] = None):
        self.settings = settings
        self.node = settings.node
        self.spool = spool
        self.policy = policy or AssociationPolicy(settings.node)
        self.ae = AE(ae_title=self.node.ae_title)
        # pynetdicom counts every TCP connection (even one that never sent an A-ASSOCIATE-RQ)
        # against its own limit; ours (in _on_requested) counts only associations that
        # passed the policy, so idle connections cannot lock a cart out
        self.ae.maximum_associations = 1 << 30
        self.max_associations = max(1, int(self.node.max_associations))
        self._admitted: set[int] = set()
        self._sinks: dict[int, list[Incoming]] = {}
        self.ae.maximum_pdu_size = int(self.node.max_pdu)
        self.ae.dimse_timeout = self.node.dimse_timeout_s
        self.ae.network_timeout = self.node.network_timeout_s
        self.ae.acse_timeout = self.node.acse_timeout_s
        self.ae._echonode_sink = self._open_incoming  # C-STORE datasets stream to the spool
        # policy is ours (EVT_REQUESTED); pynetdicom's own called-AE check stays off
        self.ae.require_called_aet = False
        for uid in STORAGE_SOP_CLASSES:
            self.ae.add_supported_context(uid, list(TRANSFER_SYNTAXES))
        self.ae.add_supported_context(Verification, VERIFICATION_TS)
        # Storage Commitment reports (N-EVENT-REPORT) for results we delivered (results area)
        from echonode.dicom.scu import STORAGE_COMMITMENT_PUSH
        self.ae.add_supported_context(STORAGE_COMMITMENT_PUSH, scu_role=True, scp_role=True)
        self._server = None
        self._stats: dict[int, _AssocStats] = {}
        self._lock = threading.Lock()
        self.totals = {"associations": 0, "rejected": 0, "stored": 0, "failures": 0}

    # ------------------------------------------------------------------ handlers
    def _peer(self, assoc) -> str:
        try:
            return str(assoc.requestor.address)
        except Exception:
            return "?"

    def _on_conn_open(self, event) -> None:
        # Until the A-ASSOCIATE-RQ arrives, the acceptor's ACSE wait and the ARTIM timer are
        # the only clocks: both get node.request_timeout_s, so a connection that never asks
        # is closed (and its threads end) quickly. ARTIM also bounds the wait for the peer
        # to close after we abort or reject.
        try:
            event.assoc.acse_timeout = min(float(self.node.request_timeout_s), float(self.node.acse_timeout_s))
        except Exception:  # pragma: no cover - pynetdicom internals
            LOG.exception("cannot set the request timeout")

    def _on_requested(self, event) -> None:
        """Association policy. Fails closed: any exception rejects the association."""
        assoc = event.assoc
        peer = self._peer(assoc)
        calling = "?"
        try:
            rq = assoc.requestor.primitive
            calling = str(getattr(rq, "calling_ae_title", "") or "").strip()
            called = str(getattr(rq, "called_ae_title", "") or "").strip()
            decision = self.policy.check(calling, called, peer)
            if decision.accept:
                with self._lock:
                    if len(self._admitted) >= self.max_associations:
                        decision = PolicyDecision(False, f"node.max_associations={self.max_associations} reached",
                                                  REJECT_LIMIT)
                    else:
                        self._admitted.add(id(assoc))
        except Exception as exc:
            decision = PolicyDecision(False, f"association policy failed ({type(exc).__name__}): rejected",
                                      REJECT_POLICY_ERROR)
        if not decision.accept:
            with self._lock:
                self.totals["rejected"] += 1
            LOG.warning("association rejected: calling AE %r from %s: %s", calling[:16], peer, decision.reason)
            audit.record(self.spool.sessions, audit.association(
                calling, called, peer, assoc.requestor.port, accepted=False, reason=decision.reason,
                tls_subject=audit.tls_subject(assoc)))
            try:
                assoc.acse.send_reject(*decision.reject)
                # as pynetdicom's own rejection does: wait until the A-ASSOCIATE-RJ is out and
                # the peer closed (or ARTIM expired) before the socket is shut down
                assoc.kill()
            except Exception:
                assoc.abort()

    def _open_incoming(self, assoc, command_set, context_id) -> Incoming:
        """Sink for one C-STORE dataset (called by the receive path when its command arrives)."""
        ts = str(assoc._accepted_cx[context_id].transfer_syntax[0])
        inc = self.spool.begin(str(command_set.AffectedSOPClassUID or ""),
                               str(command_set.AffectedSOPInstanceUID or ""), ts)
        with self._lock:
            pending = self._sinks.setdefault(id(assoc), [])
            pending[:] = [p for p in pending if not p.finished]
            pending.append(inc)
        return inc

    def _on_established(self, event) -> None:
        assoc = event.assoc
        with self._lock:
            self.totals["associations"] += 1
            self._stats[id(assoc)] = _AssocStats(calling_ae=str(assoc.requestor.ae_title).strip(),
                                                 peer=f"{self._peer(assoc)}:{assoc.requestor.port}")
        called = str(getattr(assoc.requestor.primitive, "called_ae_title", "") or "").strip()
        audit.record(self.spool.sessions, audit.association(
            str(assoc.requestor.ae_title).strip(), called, self._peer(assoc), assoc.requestor.port,
            accepted=True, tls_subject=audit.tls_subject(assoc)))
        rejected = [cx.abstract_syntax for cx in assoc.rejected_contexts]
        if rejected:
            LOG.info("association from %r: refused %d presentation context(s) at negotiation: %s",
                     str(assoc.requestor.ae_title).strip(), len(rejected),
                     ", ".join(sorted(set(str(r) for r in rejected)))[:300])

    def _on_close(self, event) -> None:
        with self._lock:
            self._admitted.discard(id(event.assoc))
            pending = self._sinks.pop(id(event.assoc), [])
        for inc in pending:  # a dataset cut off by an abort was never acknowledged
            if not inc.finished:
                inc.abandon()
        st = self._stats.pop(id(event.assoc), None)
        if st is None:
            return
        audit.record(self.spool.sessions, audit.association_closed(
            st.calling_ae, self.node.ae_title, st.peer, stored=st.stored, duplicates=st.duplicates,
            failures=st.failures, aborted=event.assoc.is_aborted, statuses=st.statuses,
            tls_subject=audit.tls_subject(event.assoc)))
        LOG.info("association %s: calling AE %r peer %s stored %d (duplicates %d) failures %d in %.1fs "
                 "(%.1fs storing)%s",
                 "aborted" if event.assoc.is_aborted else "released", st.calling_ae, st.peer, st.stored,
                 st.duplicates, st.failures, time.monotonic() - st.started, st.store_s,
                 (" statuses " + ",".join(f"0x{k:04X}x{v}" for k, v in sorted(st.statuses.items())))
                 if st.statuses else "")

    def _on_echo(self, event) -> int:
        return 0x0000

    def _on_store(self, event) -> int:
        st = self._stats.get(id(event.assoc)) or _AssocStats()
        result = None
        t0 = time.monotonic()
        try:
            req = event.request
            kw = dict(sop_class_uid=str(req.AffectedSOPClassUID or ""),
                      sop_instance_uid=str(req.AffectedSOPInstanceUID or ""),
                      transfer_syntax_uid=str(event.context.transfer_syntax),
                      calling_ae=st.calling_ae, peer=st.peer)
            if isinstance(req.DataSet, Incoming):  # streamed to disk as it arrived
                result = self.spool.store_incoming(req.DataSet, **kw)
            else:
                data = req.DataSet.getbuffer() if req.DataSet is not None else memoryview(b"")
                try:
                    result = self.spool.store(data=data, **kw)
                finally:
                    try:
                        data.release()
                    except BufferError:
                        pass
            status = result.status
        except Exception as exc:  # never let an exception leave a C-STORE unanswered
            # the class only: an error's text can quote header values (PHI)
            LOG.error("C-STORE handler failed: %s", type(exc).__name__)
            status = PROCESSING_FAILURE
        # the patient and UIDs come from the spool's one bounded header parse (StoreResult)
        audit.record(self.spool.sessions, audit.instance_received(
            result, status=status, calling_ae=st.calling_ae, peer=st.peer, called_ae=self.node.ae_title,
            sop_class_uid=str(getattr(event.request, "AffectedSOPClassUID", "") or ""),
            sop_instance_uid=str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")))
        with self._lock:
            st.store_s += time.monotonic() - t0
            if status == 0x0000:
                st.stored += 1
                self.totals["stored"] += 1
                if result is not None and result.duplicate:
                    st.duplicates += 1
            else:
                st.failures += 1
                self.totals["failures"] += 1
                st.statuses[status] = st.statuses.get(status, 0) + 1
        return status

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_CONN_CLOSE, self._on_close),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        if getattr(self.spool, "sessions", None) is not None:
            from echonode.dicom.scu import commitment_report_handler
            handlers.append((evt.EVT_N_EVENT_REPORT, commitment_report_handler(self.settings, self.spool.sessions)))
        ctx = make_ssl_context(self.node)
        # TLS is NOT given to pynetdicom: it would run the handshake in its listener thread
        # (one idle peer would keep every other out). The handshake runs in each
        # connection's own thread instead, bounded by node.tls.handshake_timeout_s.
        self._server = self.ae.start_server((self.node.host, int(self.node.port)), block=False,
                                            evt_handlers=handlers)
        self._guard_connections(self._server, ctx)
        LOG.info("SCP %s listening on %s:%d%s; calling AEs: %s", self.node.ae_title, self.node.host, self.port,
                 " (DICOM TLS%s)" % (", mutual" if self.node.tls.require_client_cert else "") if ctx else "",
                 "any (node.allow_any_calling_ae)" if self.policy.default_open
                 else ", ".join(sorted(self.policy.allowed)) or "none")

    def _guard_connections(self, server, ctx: Optional[ssl.SSLContext]) -> None:
        """Per-connection set-up in the connection's thread: socket timeout (a peer that
        stops reading or writing is cut off) and, with TLS, the bounded handshake."""
        inner = server.process_request_thread
        net_timeout = float(self.node.network_timeout_s)
        hs_timeout = float(self.node.tls.handshake_timeout_s)

        def process_request_thread(request, client_address):
            peer = client_address[0] if isinstance(client_address, tuple) else "?"
            try:
                if ctx is not None:
                    request.settimeout(hs_timeout)
                    request = ctx.wrap_socket(request, server_side=True)
                request.settimeout(net_timeout)
            except (OSError, ValueError) as exc:
                reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or type(exc).__name__
                LOG.warning("TLS handshake with %s failed: %s: %s", peer, type(exc).__name__,
                            getattr(exc, "reason", None) or str(exc)[:120])
                if ctx is not None:   # a peer without a trusted certificate never reaches an association event
                    audit.record(self.spool.sessions,
                                 audit.node_authentication_failed(peer, f"TLS handshake failed: {reason}"))
                try:
                    request.close()
                except OSError:
                    pass
                return
            inner(request, client_address)

        server.process_request_thread = process_request_thread
        server.daemon_threads = True
        # socketserver listens with a backlog of 5: a burst of connections (a port scan,
        # 200 idle peers) would make a cart's SYN wait for retransmission (1 s, 3 s, 7 s...)
        server.socket.listen(max(128, 8 * self.max_associations))

    @property
    def port(self) -> int:
        if self._server is not None:
            return self._server.server_address[1]
        return int(self.node.port)

    def active(self) -> int:
        return len([a for a in self.ae.active_associations if a.is_acceptor])

    def stop(self, drain_s: float = 10.0) -> None:
        """Stop listening, let in-flight associations finish for ``drain_s``, then abort the rest."""
        if self._server is not None:
            try:
                self._server.shutdown()
            except Exception:
                pass
            self._server = None
        deadline = time.monotonic() + drain_s
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.ae.active_associations:
            LOG.warning("aborting %d association(s) still active after %.0fs", len(self.ae.active_associations), drain_s)
        self.ae.shutdown()
