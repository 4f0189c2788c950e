"""Priors from the PACS: a patient's earlier echo studies, found, retrieved and embedded.

Application level (like ``analysis.py``): it composes the DICOM side (``dicom.qr``,
``dicom.web``, ``dicom.select``, ``dicom.frames``) with the model side (the Interpreter's
EchoCLIP-R study embedding) and the store (``store.interpretations.save_study_embedding`` and the
ledger ``store.priors``).

* :func:`find_and_fetch_priors` asks every ``[[priors.sources]]`` for the patient's earlier
  US studies (PatientID + IssuerOfPatientID, StudyDate before the current one), lists
  their instances, keeps the A4C clips by the node's own selection rules
  (``dicom.select.decide``) and retrieves them (C-GET, C-MOVE to the node's SCP with a
  fallback to C-GET when the PACS refuses, or WADO-RS) into ``<data_dir>/priors``. A prior
  already embedded with the same EchoCLIP-R weights is not fetched again. The whole call
  returns within ``timeout_s``; what could not be done is a statement in the outcome.
* :func:`embed_prior_study` computes the study embedding with the Interpreter's
  ``study_embedding`` (the code that embeds received studies) and stores it with
  ``save_study_embedding`` in the same transaction as the ledger's ``embedded`` state;
  then keeps or purges the retrieved pixels (``priors.keep_pixels``).
* :func:`backfill` embeds a site's history ahead of time (``echonode priors backfill``).

Logs and statements carry no patient identifier: studies are named by source, date and
a short hash of their UID.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import os
import shutil
import socket
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from echonode.dicom.uids import check_uid
from echonode.config import PriorSource, Settings

log = logging.getLogger("echonode.priors")

LEASE_MARGIN_S = 60.0
OWN_SOURCE = "this node"   # PriorUsed.source of an earlier study the node received and analysed itself


# --------------------------------------------------------------------------- outcome

@dataclass(frozen=True)
class PriorUsed:
    """A prior study whose embedding is in SQL for the current EchoCLIP-R weights."""

    study_instance_uid: str
    study_date: str
    source: str
    clips: int
    fetched_now: bool


@dataclass
class FetchedPrior:
    """A prior study retrieved now, waiting for :func:`embed_prior_study`."""

    study_instance_uid: str
    study_date: str
    source: str
    patient_key: str
    model_sha256: str
    owner: str
    files: list[Path]
    folder: Optional[Path]       # our own folder (purged unless keep_pixels); C-MOVE: copies from object storage, if any
    seconds: float = 0.0
    presampled: frozenset = frozenset()  # files holding only the frames the model uses (WADO-RS frames)


@dataclass
class PriorsOutcome:
    """What the SR and the log say about priors. Statements carry no PHI."""

    used: list[PriorUsed] = field(default_factory=list)
    fetched: list[FetchedPrior] = field(default_factory=list)
    statements: list[str] = field(default_factory=list)
    timed_out: bool = False
    seconds: float = 0.0

    @property
    def available(self) -> bool:
        return bool(self.used or self.fetched)

    def summary(self) -> str:
        """One sentence for the SR: the priors used with date and source, or why none."""
        if self.used:
            items = ", ".join(f"{_date(u.study_date)} from {u.source}" for u in self.used)
            text = f"Prior studies used: {items}."
            if self.statements:
                text += " " + " ".join(self.statements)
            return text
        why = "; ".join(self.statements) or "no earlier echo study found"
        return f"Priors not available: {why}."


def _date(d: str) -> str:
    return f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 and d.isdigit() else (d or "undated")


def short(uid: str) -> str:
    """A log name for a study UID (not the UID: it may identify a patient's study)."""
    return hashlib.sha256(uid.encode()).hexdigest()[:10]


def _owner() -> str:
    return f"{socket.gethostname()[:60]}:{os.getpid()}:{threading.get_ident() % 100000}"


# --------------------------------------------------------------------------- candidates

@dataclass(frozen=True)
class Candidate:
    study_uid: str
    study_date: str
    patient_key: str
    source: PriorSource


@dataclass(frozen=True)
class Clip:
    series_uid: str
    sop_uid: str


class SourceError(RuntimeError):
    """A source failed for this study; the text is a statement (no PHI)."""


def _patient_key(patient_id: str, issuer: str) -> str:
    from echonode.store.interpretations import patient_key
    return patient_key(patient_id, issuer)


def _norm(v: Any) -> str:
    return str(v or "").strip()


def _dimse_peer(settings: Settings, src: PriorSource):
    from echonode.dicom.qr import DimsePeer
    return DimsePeer(src.ae_title, src.host, int(src.port), src.calling_ae or settings.node.ae_title,
                     float(src.timeout_s))


def _find_studies(settings: Settings, src: PriorSource, *, patient_id: str, issuer: str, before: str,
                  since: str, limit: int, deadline: float, cancel: threading.Event) -> tuple[list[dict], list[str]]:
    """Study answers ``{uid, date, patient_id, issuer}`` of one source and statements."""
    statements: list[str] = []
    out: list[dict] = []
    if src.kind == "dimse":
        from echonode.dicom import qr
        res = qr.c_find(_dimse_peer(settings, src),
                        qr.study_query(patient_id, issuer if src.match_issuer_at_pacs else "", before=before,
                                       since=since),
                        max_results=limit, deadline=deadline, cancel=cancel)
        if res.partial:
            statements.append(f"{src.name}: partial study list ({res.reason})")
        for a in res.answers:
            uid = qr.valid_uid(a.get("StudyInstanceUID"))
            if uid:
                out.append({"uid": uid, "date": _norm(a.get("StudyDate"))[:8],
                            "patient_id": _norm(a.get("PatientID")), "issuer": _norm(a.get("IssuerOfPatientID")),
                            "modalities": [m for m in (a.get("ModalitiesInStudy") or [])] if not isinstance(
                                a.get("ModalitiesInStudy"), str) else [a.get("ModalitiesInStudy")]})
    else:
        from echonode.dicom import web
        from echonode.dicom.qr import valid_uid
        params: dict = {"ModalitiesInStudy": "US", "includefield": ["00100021", "00080061"]}
        if patient_id:
            params["PatientID"] = patient_id
        if issuer and src.match_issuer_at_pacs:
            params["IssuerOfPatientID"] = issuer
        if before:
            day = dt.datetime.strptime(before, "%Y%m%d").date() - dt.timedelta(days=1)
            params["StudyDate"] = "-" + day.strftime("%Y%m%d")
        elif since:
            params["StudyDate"] = since + "-"
        client = web.DicomWebClient(web.WebTarget.of(src))
        answers = client.qido("/studies", params, limit=limit)
        if len(answers) >= limit:
            statements.append(f"{src.name}: partial study list (more than {limit} answers, priors.max_results)")
        for a in answers:
            uid = valid_uid(web.value(a, "0020000D"))
            if uid:
                out.append({"uid": uid, "date": web.value(a, "00080020")[:8], "patient_id": web.value(a, "00100020"),
                            "issuer": web.value(a, "00100021"), "modalities": web.values(a, "00080061")})
    return out, statements


def _candidates(settings: Settings, src: PriorSource, answers: list[dict], *, patient_id: Optional[str],
                issuer: Optional[str], before: str, exclude: str, model_sha256: str) -> tuple[list[Candidate], list[str]]:
    """Keep the answers that are this patient's (same PatientID AND issuer), earlier, US."""
    out, statements = [], []
    other_issuer = later = 0
    for a in answers:
        if a["uid"] == exclude:
            continue
        if patient_id is not None and (a["patient_id"] != patient_id or a["issuer"] != (issuer or "")):
            other_issuer += 1
            continue
        if a["modalities"] and "US" not in [str(m).upper() for m in a["modalities"]]:
            continue
        if before and (not a["date"] or a["date"] >= before):
            later += 1
            continue
        out.append(Candidate(a["uid"], a["date"], _patient_key(a["patient_id"], a["issuer"]), src))
    if other_issuer:
        statements.append(f"{src.name}: {other_issuer} study(ies) of another patient or issuer not used")
        log.warning("priors: %s answered %d study(ies) whose PatientID/IssuerOfPatientID do not match; not used",
                    src.name, other_issuer)
    if later:
        statements.append(f"{src.name}: {later} study(ies) not dated before the current one not used")
    return out, statements


def _list_clips(settings: Settings, cand: Candidate, deadline: float, cancel: threading.Event,
                qs=None) -> list[Clip]:
    """The A4C clips of a prior study, by the node's selection rules on the query answers."""
    from pydicom.dataset import Dataset

    from echonode.dicom.select import decide

    src, p = cand.source, settings.priors
    picked: list[tuple[int, Clip]] = []
    n_listed = 0
    if src.kind == "dimse":
        from echonode.dicom import qr
        peer = _dimse_peer(settings, src)
        series = qr.c_find(peer, qr.series_query(cand.study_uid), max_results=p.max_results, deadline=deadline,
                           cancel=cancel, session=qs).answers
        for s in series:
            se_uid = qr.valid_uid(s.get("SeriesInstanceUID"))
            if not se_uid or _norm(s.get("Modality")).upper() not in ("US", ""):
                continue
            res = qr.c_find(peer, qr.instance_query(cand.study_uid, se_uid), max_results=p.max_instances,
                            deadline=deadline, cancel=cancel, session=qs)
            for i in res.answers:
                n_listed += 1
                ds = Dataset()
                for kw in ("Modality", "SeriesDescription", "ProtocolName"):
                    if s.get(kw):
                        setattr(ds, kw, s.get(kw))
                for kw in ("SOPClassUID", "NumberOfFrames", "ImageComments", "ViewName"):
                    if i.get(kw):
                        setattr(ds, kw, i.get(kw))
                sop = qr.valid_uid(i.get("SOPInstanceUID"))
                d = decide(ds, settings.select)
                if sop and d.analyse:
                    picked.append((0 if d.view_code or "matching" in d.reason else 1, Clip(se_uid, sop)))
    else:
        from echonode.dicom import web
        from echonode.dicom.qr import valid_uid
        client = web.DicomWebClient(web.WebTarget.of(src))
        answers = client.qido(f"/studies/{cand.study_uid}/instances",
                              {"includefield": ["00080060", "0008103E", "00181030", "00280008", "00204000", "00082127",
                                                "00540220", "00186011"]},
                              limit=p.max_instances)
        for a in answers:
            n_listed += 1
            try:
                ds = Dataset.from_json({k: v for k, v in a.items() if isinstance(v, dict) and "BulkDataURI" not in v})
            except Exception:  # a malformed answer: this instance is not used
                continue
            se_uid, sop = valid_uid(web.value(a, "0020000E")), valid_uid(web.value(a, "00080018"))
            d = decide(ds, settings.select)
            if se_uid and sop and d.analyse:
                picked.append((0 if d.view_code or "matching" in d.reason else 1, Clip(se_uid, sop)))
    picked.sort(key=lambda t: t[0])   # coded or named A4C first, unlabelled cine clips after
    return [c for _, c in picked[: p.max_clips]]


def _wado_frames(settings: Settings, client, study: str, series: str, sop: str, folder: Path) -> Path:
    """Only the frames the model uses (WADO-RS frame retrieval), as a DICOM file."""
    from echonode.dicom import web
    from echonode.model.preprocess import sample_indices

    m = settings.model
    md = client.metadata(study, series, sop)
    try:
        n = max(1, int(web.value(md, "00280008") or 1))
    except ValueError:
        raise web.DicomWebError("WADO-RS metadata: NumberOfFrames is not a number") from None
    idx = sample_indices(n, limit=m.frames * m.frame_stride, stride=m.frame_stride)
    files, ts = client.frames(study, series, sop, [i + 1 for i in idx], folder / f"{sop}.frames",
                              max_bytes=settings.priors.max_bytes)
    return web.instance_from_frames(md, files, ts, folder / f"{sop}.dcm")


def _local_copies(settings: Settings, keys: dict[str, str], folder: Path) -> tuple[list[Path], int]:
    """Files for instances the node holds (moved in by C-MOVE): the instance files of a local
    store as they are, copies in ``folder`` from object storage; and how many of the
    instances are missing from the store (skipped: the prior is embedded from the others).
    A store that cannot be reached raises StorageUnavailable (transient)."""
    from echonode.storage import open_storage

    store = open_storage(settings)
    files, missing = [], 0
    for sop, key in keys.items():
        local = store.local_path(key)
        try:
            if local is None:
                folder.mkdir(parents=True, exist_ok=True)
                local = folder / f"{check_uid(sop, 'SOP Instance UID', strict=False)}.dcm"
                with store.fetch(key) as tmp:
                    shutil.move(tmp, local)
            elif not local.is_file():
                raise FileNotFoundError(key)
        except FileNotFoundError:
            log.warning("priors: a moved instance is missing from the store")
            missing += 1
            continue
        files.append(local)
    return files, missing


def _retrieve(settings: Settings, sessions, cand: Candidate, clips: list[Clip], folder: Path,
              deadline: float, cancel: threading.Event,
              presampled: Optional[set] = None, qs=None) -> tuple[list[Path], Optional[Path], list[str]]:
    """Retrieve the clips: ``(files, our folder or None, statements)``. WADO-RS files hold
    only the sampled frames when the server supports frame retrieval (see ``_wado_frames``);
    those are added to ``presampled``."""
    src, p = cand.source, settings.priors
    statements: list[str] = []
    by_series: dict[str, list[str]] = {}
    for c in clips:
        by_series.setdefault(c.series_uid, []).append(c.sop_uid)
    if src.kind == "dicomweb":
        from echonode.dicom import web
        client = web.DicomWebClient(web.WebTarget.of(src))
        files = []
        for se, sops in by_series.items():
            for sop in sops:
                if cancel.is_set() or time.monotonic() > deadline:
                    raise SourceError(f"{src.name}: time limit reached during WADO-RS retrieve")
                if src.frames:
                    try:
                        files.append(_wado_frames(settings, client, cand.study_uid, se, sop, folder))
                        if presampled is not None:
                            presampled.add(files[-1])
                        continue
                    except web.DicomWebError as exc:  # no frame retrieval here: the whole instance
                        log.info("priors: %s: frame retrieval not used (%s); retrieving instances", src.name, exc)
                        src = dataclasses.replace(src, frames=False)
                files.append(client.instance(cand.study_uid, se, sop, folder, max_bytes=p.max_bytes))
        return files, folder, statements
    from echonode.dicom import qr
    peer = _dimse_peer(settings, src)
    if src.retrieve == "move":
        dest = src.move_destination or settings.node.ae_title
        try:
            for se, sops in by_series.items():
                qr.c_move(peer, cand.study_uid, se, sops, dest, deadline=deadline, cancel=cancel)
            from echonode.store import priors as ledger
            with sessions() as s:
                paths = ledger.instance_paths(s, [c.sop_uid for c in clips])
            missing = len(clips) - len(paths)
            if missing:
                statements.append(f"{src.name}: {missing} moved instance(s) did not arrive")
            files, gone = _local_copies(settings, paths, folder)
            if gone:
                statements.append(f"{src.name}: {gone} moved instance(s) missing from the store")
            return files, folder, statements
        except qr.MoveRefused as exc:
            statements.append(f"{src.name}: C-MOVE refused, retrieved by C-GET instead")
            log.warning("priors: %s; falling back to C-GET", exc)
    files = []
    for se, sops in by_series.items():
        res = qr.c_get(peer, cand.study_uid, se, sops, folder, max_bytes=p.max_bytes, deadline=deadline, cancel=cancel,
                       session=qs if src.retrieve == "get" else None)
        files.extend(res.files)
        if res.refused:
            statements.append(f"{src.name}: {len(res.refused)} instance(s) refused ({res.refused[0]})")
    return files, folder, statements


def _verify(settings: Settings, files: list[Path], cand: Candidate, patient_id: Optional[str],
            issuer: Optional[str]) -> tuple[list[Path], list[str]]:
    """Headers of the retrieved files: same study, same patient and issuer, still an A4C clip."""
    import pydicom

    from echonode.dicom.select import decide

    good, bad = [], 0
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            same = _norm(ds.get("StudyInstanceUID")) == cand.study_uid
            if patient_id is not None:
                same = same and _norm(ds.get("PatientID")) == patient_id and \
                    _norm(ds.get("IssuerOfPatientID")) == (issuer or "")
            if same and decide(ds, settings.select).analyse:
                good.append(f)
                continue
        except Exception:
            pass
        bad += 1
    return good, ([f"{cand.source.name}: {bad} retrieved instance(s) not used (other study/patient, not an "
                   "A4C clip, or unreadable)"] if bad else [])


def fetch_study(settings: Settings, sessions, cand: Candidate, *, model_sha256: str, owner: str,
                deadline: float, cancel: threading.Event, patient_id: Optional[str] = None,
                issuer: Optional[str] = None) -> tuple[Optional[FetchedPrior], list[str]]:
    """Claim (ledger), list, select and retrieve one prior study. ``(None, statements)``
    when it is already embedded elsewhere, has no A4C clip, or failed."""
    from echonode.store import priors as ledger

    t0 = time.perf_counter()
    lease = max(1.0, deadline - time.monotonic()) + LEASE_MARGIN_S
    with sessions() as s:
        if not ledger.claim(s, cand.study_uid, model_sha256, patient_key=cand.patient_key,
                            study_date=cand.study_date, source=cand.source.name, owner=owner, lease_s=lease):
            return None, []
    folder = settings.priors_path / "fetch" / f"{short(cand.study_uid)}-{os.getpid()}-{threading.get_ident() % 100000}"
    statements: list[str] = []
    qs = None
    try:
        if cand.source.kind == "dimse":   # one association for the study's queries (and C-GET)
            from echonode.dicom.qr import QRSession
            qs = QRSession(_dimse_peer(settings, cand.source), get=cand.source.retrieve == "get", cancel=cancel)
        clips = _list_clips(settings, cand, deadline, cancel, qs)
        if not clips:
            reason = "no A4C clip"
            with sessions() as s:
                ledger.mark_no_clips(s, cand.study_uid, model_sha256, owner, reason)
                s.commit()
            log.info("priors: study %s (%s, %s) has no A4C clip", short(cand.study_uid), cand.source.name,
                     _date(cand.study_date))
            return None, [f"{cand.source.name}: study of {_date(cand.study_date)} has no A4C clip"]
        presampled: set[Path] = set()
        files, own, st = _retrieve(settings, sessions, cand, clips, folder, deadline, cancel, presampled, qs)
        statements += st
        files, st = _verify(settings, files, cand, patient_id, issuer)
        statements += st
        if not files:
            raise SourceError(f"{cand.source.name}: no A4C clip of the study of {_date(cand.study_date)} "
                              "could be retrieved")
        return FetchedPrior(cand.study_uid, cand.study_date, cand.source.name, cand.patient_key, model_sha256,
                            owner, files, own, time.perf_counter() - t0,
                            frozenset(presampled)), statements
    except Exception as exc:
        msg = str(exc) if isinstance(exc, SourceError) else f"{cand.source.name}: {_describe(exc)}"
        with sessions() as s:
            ledger.mark_failed(s, cand.study_uid, model_sha256, owner, msg)
            s.commit()
        shutil.rmtree(folder, ignore_errors=True)
        log.warning("priors: study %s not fetched: %s", short(cand.study_uid), msg)
        return None, [msg]
    finally:
        if qs is not None:
            qs.close()


def _describe(exc: BaseException) -> str:
    from echonode.dicom.qr import QRError
    from echonode.dicom.web import DicomWebError
    if isinstance(exc, (QRError, DicomWebError)):
        return str(exc)
    return type(exc).__name__   # an unexpected error's text may quote an answer: class only


# --------------------------------------------------------------------------- the analysis' call

def r_weights_sha256(settings: Settings) -> Optional[str]:
    """The EchoCLIP-R weights checksum the priors are embedded for (None: no R model)."""
    from echonode.pipeline.modelsel import choose_models
    choice = choose_models(settings, verify=False)
    return choice.r.weights_sha256 if choice.available and choice.r is not None else None


def find_and_fetch_priors(settings: Settings, session_factory, *, study_uid: str, patient_id: str,
                          issuer: str, study_date: str, timeout_s: Optional[float] = None,
                          model_sha256: Optional[str] = None) -> PriorsOutcome:
    """Find and retrieve the patient's earlier echo studies from every configured source.

    Returns within ``timeout_s`` (default ``priors.timeout_s``) whatever the PACS does.
    ``outcome.used`` lists priors already embedded for these weights; ``outcome.fetched``
    the ones retrieved now (pass each to :func:`embed_prior_study`)."""
    t0 = time.monotonic()
    p = settings.priors
    timeout_s = float(p.timeout_s if timeout_s is None else timeout_s)
    out = PriorsOutcome()
    if not p.enabled:
        out.statements.append("priors from the PACS are off (priors.enabled = false)")
        return out
    if not p.sources:
        out.statements.append("no priors source configured (priors.sources)")
        return out
    if model_sha256 is None:
        model_sha256 = r_weights_sha256(settings)
    if not model_sha256:
        out.statements.append("no EchoCLIP-R model installed (no study embeddings to compare)")
        return out
    if not patient_id:
        out.statements.append("the study has no PatientID")
        return out
    deadline = t0 + timeout_s
    cancel = threading.Event()
    lock = threading.Lock()
    result = PriorsOutcome()

    def work() -> None:
        from echonode.store import priors as ledger
        owner = _owner()
        cands: dict[str, Candidate] = {}
        for src in p.sources:
            if cancel.is_set():
                return
            try:
                answers, st = _find_studies(settings, src, patient_id=patient_id, issuer=issuer, before=study_date,
                                            since="", limit=p.max_results, deadline=deadline, cancel=cancel)
                keep, st2 = _candidates(settings, src, answers, patient_id=patient_id, issuer=issuer,
                                        before=study_date, exclude=study_uid, model_sha256=model_sha256)
            except Exception as exc:
                msg = f"{src.name}: {_describe(exc)}"
                log.warning("priors: query failed: %s", msg)
                with lock:
                    result.statements.append(msg)
                continue
            with lock:
                result.statements.extend(st + st2)
            for c in keep:
                cands.setdefault(c.study_uid, c)
        ordered = sorted(cands.values(), key=lambda c: c.study_date, reverse=True)[: p.max_studies]
        from echonode.store.interpretations import embedded_studies
        with session_factory() as s:   # studies the node analysed itself: their embedding is there already
            own = embedded_studies(s, [c.study_uid for c in ordered], model_sha256)
        for c in ordered:
            if cancel.is_set():
                return
            if c.study_uid in own:
                with session_factory() as s:
                    e = ledger.get(s, c.study_uid, model_sha256)
                if e is None or e.state != ledger.EMBEDDED:   # not a PACS prior: no fetch, no ledger row
                    with lock:
                        result.used.append(PriorUsed(c.study_uid, c.study_date, OWN_SOURCE, 0, False))
                    continue
            with session_factory() as s:
                e = ledger.get(s, c.study_uid, model_sha256)
            if e is not None and e.state == ledger.EMBEDDED:
                with lock:
                    result.used.append(PriorUsed(c.study_uid, c.study_date, e.source, e.clips, False))
                continue
            if e is not None and e.state == ledger.NO_CLIPS:
                with lock:
                    result.statements.append(f"{c.source.name}: study of {_date(c.study_date)} has no A4C clip")
                continue
            fetched, st = fetch_study(settings, session_factory, c, model_sha256=model_sha256, owner=owner,
                                      deadline=deadline, cancel=cancel, patient_id=patient_id, issuer=issuer)
            if fetched is None and not st:   # not claimed: another process embedded it or is retrieving it
                with session_factory() as s:
                    e = ledger.get(s, c.study_uid, model_sha256)
                with lock:
                    if e is not None and e.state == ledger.EMBEDDED:
                        result.used.append(PriorUsed(c.study_uid, c.study_date, e.source, e.clips, False))
                    else:
                        result.statements.append(f"{c.source.name}: study of {_date(c.study_date)} is being "
                                                 "retrieved by another analysis")
                continue
            with lock:
                result.statements.extend(st)
                if fetched is not None:
                    if cancel.is_set():   # too late: the caller has gone on; let the lease expire
                        return
                    result.fetched.append(fetched)
        if not cands:
            with lock:
                if not result.statements:
                    result.statements.append("no earlier echo study of the patient in the PACS")

    th = threading.Thread(target=work, name="priors-fetch", daemon=True)
    th.start()
    th.join(max(0.0, deadline - time.monotonic()))
    if th.is_alive():
        cancel.set()
        out.timed_out = True
        log.warning("priors: not complete within priors.timeout_s=%.0f s; the analysis goes on without them",
                    timeout_s)
    with lock:
        out.used, out.fetched = list(result.used), list(result.fetched)
        out.statements = list(dict.fromkeys(result.statements))
    if out.timed_out:
        out.statements.append(f"the PACS did not answer within {timeout_s:g} s")
    out.seconds = time.monotonic() - t0
    log.info("priors: %d already embedded, %d retrieved in %.1f s%s", len(out.used), len(out.fetched), out.seconds,
             f"; {len(out.statements)} statement(s)" if out.statements else "")
    return out


# --------------------------------------------------------------------------- embedding

def load_prior_clips(settings: Settings, files: Sequence[Path], presampled=frozenset()) -> tuple[list, list[str]]:
    """ClipInputs for the retrieved files, frames sampled as for received studies
    (``presampled``: the files hold only those frames already)."""
    import pydicom

    from echonode.dicom.frames import FrameDecodeError, load_clip
    from echonode.interpret.engine import ClipInput
    from echonode.interpretation import ClipRef
    from echonode.model.preprocess import sample_indices

    m = settings.model
    inputs, warnings = [], []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            n = int(getattr(ds, "NumberOfFrames", 1) or 1)
            idx = None if f in presampled else sample_indices(n, limit=m.frames * m.frame_stride, stride=m.frame_stride)
            clip = load_clip(f, indices=idx, sector_mask=m.sector_mask)
        except (FrameDecodeError, OSError, pydicom.errors.InvalidDicomError, ValueError) as exc:
            warnings.append(f"a prior clip could not be decoded ({type(exc).__name__})")
            continue
        ref = ClipRef(sop_instance_uid=str(ds.SOPInstanceUID), series_instance_uid=str(ds.SeriesInstanceUID),
                      sop_class_uid=str(ds.SOPClassUID), path=str(f), n_frames=clip.n_frames,
                      frames_used=tuple(int(i) for i in clip.indices))
        inputs.append(ClipInput(ref=ref, frames=clip.frames))
    return inputs, warnings


def embed_prior_study(settings: Settings, session_factory, fetched: FetchedPrior, interpreter) -> Optional[PriorUsed]:
    """Embed a retrieved prior with ``interpreter.study_embedding`` (EchoCLIP-R), store it
    with ``save_study_embedding`` and mark the ledger in one transaction; then keep or
    purge the pixels. None when nothing could be embedded (ledger: failed)."""
    from echonode.store import priors as ledger
    from echonode.store import interpretations as rs

    try:
        inputs, warnings = load_prior_clips(settings, fetched.files, fetched.presampled)
        vec = interpreter.study_embedding(inputs) if inputs else None
        r = getattr(interpreter, "r", None)
        sha = getattr(getattr(r, "info", None), "weights_sha256", None)
        if sha is not None and sha != fetched.model_sha256:
            raise RuntimeError("the interpreter's EchoCLIP-R weights differ from those the prior was fetched for")
        with session_factory() as s:
            if vec is None:
                ledger.mark_failed(s, fetched.study_instance_uid, fetched.model_sha256, fetched.owner,
                                   "no clip of the prior could be decoded" + (f" ({warnings[0]})" if warnings else ""))
                s.commit()
                return None
            rs.save_study_embedding(s, fetched.study_instance_uid, fetched.patient_key, fetched.study_date,
                                    fetched.model_sha256, vec)
            if not ledger.mark_embedded(s, fetched.study_instance_uid, fetched.model_sha256, fetched.owner,
                                        len(inputs)):
                s.rollback()   # another process took the prior over (lease expired): its result counts
                return None
            s.commit()
        log.info("priors: study %s (%s, %s) embedded from %d clip(s)", short(fetched.study_instance_uid),
                 fetched.source, _date(fetched.study_date), len(inputs))
        return PriorUsed(fetched.study_instance_uid, fetched.study_date, fetched.source, len(inputs), True)
    finally:
        if fetched.folder is not None and not settings.priors.keep_pixels:
            shutil.rmtree(fetched.folder, ignore_errors=True)


def fetch_and_embed_priors(settings: Settings, session_factory, interpreter, *, study_uid: str, patient_id: str,
                           issuer: str, study_date: str, timeout_s: Optional[float] = None) -> PriorsOutcome:
    """What the analysis calls before interpreting: find, retrieve and embed the priors
    (bounded by ``priors.timeout_s`` for the PACS part); then ``store.interpretations.prior_embeddings``
    returns them with the node's own earlier studies."""
    r = getattr(interpreter, "r", None)
    if r is None:
        out = PriorsOutcome()
        out.statements.append("no EchoCLIP-R model installed (no study embeddings to compare)")
        return out
    out = find_and_fetch_priors(settings, session_factory, study_uid=study_uid, patient_id=patient_id,
                                issuer=issuer, study_date=study_date, timeout_s=timeout_s,
                                model_sha256=r.info.weights_sha256)
    for f in out.fetched:
        used = embed_prior_study(settings, session_factory, f, interpreter)
        if used is not None:
            out.used.append(used)
        else:
            out.statements.append(f"{f.source}: the prior of {_date(f.study_date)} could not be embedded")
    out.used.sort(key=lambda u: u.study_date, reverse=True)
    return out


def load_interpreter(settings: Settings):
    """The Interpreter the worker uses (the worker runtime's loader), for backfill and tools."""
    from echonode.pipeline.modelsel import choose_models
    from echonode.pipeline.tasks import WorkerRuntime

    choice = choose_models(settings, verify=False)
    if not choice.available:
        raise RuntimeError(choice.message)
    if choice.r is None:
        raise RuntimeError("no EchoCLIP-R model installed (model.r_model): priors cannot be embedded")
    return WorkerRuntime(settings).interpreter(choice)


# --------------------------------------------------------------------------- backfill

def parse_window(text: str) -> Optional[tuple[dt.time, dt.time]]:
    """``"19:00-06:00"`` -> (start, end) local times; may wrap past midnight."""
    if not text:
        return None
    try:
        a, b = text.split("-", 1)
        return dt.time.fromisoformat(a.strip()), dt.time.fromisoformat(b.strip())
    except ValueError:
        raise ValueError(f"--window: expected HH:MM-HH:MM, got {text!r}") from None


def in_window(window: Optional[tuple[dt.time, dt.time]], now: Optional[dt.datetime] = None) -> bool:
    if window is None:
        return True
    t = (now or dt.datetime.now()).time()
    a, b = window
    return a <= t < b if a <= b else (t >= a or t < b)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def release_dead_claims(session_factory) -> int:
    """Rows claimed by processes of this host that no longer run (kill -9): claimable again."""
    from echonode.store import priors as ledger

    host = socket.gethostname()[:60]
    with session_factory() as s:
        dead = []
        for o in ledger.fetching_owners(s):
            h, _, rest = o.partition(":")
            pid = rest.split(":", 1)[0]
            if h == host and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                dead.append(o)
        return ledger.release_owners(s, dead, "the process that was fetching it stopped")


@dataclass
class BackfillStats:
    found: int = 0
    embedded: int = 0
    skipped: int = 0          # already embedded / no clips / claimed elsewhere
    no_clips: int = 0
    failed: int = 0
    seconds: float = 0.0
    statements: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def backfill(settings: Settings, session_factory, interpreter, *, since: str, limit: Optional[int] = None,
             rate_per_min: Optional[float] = None, window: Optional[tuple[dt.time, dt.time]] = None,
             progress: Optional[Callable[[int, int], None]] = None, stop: Optional[threading.Event] = None,
             concurrency: Optional[int] = None) -> BackfillStats:
    """Embed every US study since ``since`` (YYYYMMDD) of every source, once per weights.

    Resumable: the ledger (SQL) says what is done; claims of dead processes of this host
    are released first. Load on the PACS is bounded by ``concurrency`` retrieves at once
    (``priors.backfill_concurrency``), ``rate_per_min`` studies started per minute and the
    local-time ``window`` (outside it, backfill waits)."""
    from echonode.store import priors as ledger

    t0 = time.monotonic()
    stop = stop or threading.Event()
    p = settings.priors
    stats = BackfillStats()
    sha = interpreter.r.info.weights_sha256
    release_dead_claims(session_factory)
    cap = int(limit) if limit else p.max_results
    todo: list[Candidate] = []
    seen: set[str] = set()
    for src in p.sources:
        try:
            answers, st = _find_studies(settings, src, patient_id="", issuer="", before="", since=since,
                                        limit=cap, deadline=time.monotonic() + 10 * src.timeout_s, cancel=stop)
        except Exception as exc:
            stats.statements.append(f"{src.name}: {_describe(exc)}")
            continue
        stats.statements += st
        cands, _ = _candidates(settings, src, answers, patient_id=None, issuer=None, before="", exclude="",
                               model_sha256=sha)
        for c in sorted(cands, key=lambda c: c.study_date):
            if c.study_uid not in seen:
                seen.add(c.study_uid)
                todo.append(c)
    stats.found = len(todo)
    with session_factory() as s:
        done = {e.study_instance_uid for e in ledger.entries(s, sha) if e.state in ledger.FINAL}
        # a study the node analysed itself has its embedding already: not fetched again
        from echonode.store.interpretations import embedded_studies
        done |= embedded_studies(s, [c.study_uid for c in todo], sha)
    pending = [c for c in todo if c.study_uid not in done]
    stats.skipped = len(todo) - len(pending)
    if limit:
        pending = pending[: int(limit)]
    total = len(pending)
    finished = 0
    if progress:
        progress(0, total)
    owner = _owner()
    interval = 60.0 / rate_per_min if rate_per_min else 0.0
    next_start = time.monotonic()
    workers = int(concurrency or p.backfill_concurrency)

    def job(c: Candidate):
        timeout = c.source.timeout_s * 10
        return fetch_study(settings, session_factory, c, model_sha256=sha, owner=owner,
                           deadline=time.monotonic() + timeout, cancel=stop)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="backfill") as pool:
        running: set[Future] = set()
        queue = list(pending)
        while (queue or running) and not stop.is_set():
            while queue and len(running) < workers and not stop.is_set():
                if not in_window(window):
                    break
                now = time.monotonic()
                if now < next_start:
                    break
                running.add(pool.submit(job, queue.pop(0)))
                next_start = max(now, next_start) + interval
            if not running:
                stop.wait(1.0 if not in_window(window) else max(0.05, min(1.0, next_start - time.monotonic())))
                continue
            done_f, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
            for f in done_f:
                running.discard(f)
                fetched, st = f.result()
                stats.statements += st
                if fetched is None:
                    if any("no A4C clip" in x for x in st):
                        stats.no_clips += 1
                    elif st:
                        stats.failed += 1
                    else:
                        stats.skipped += 1
                elif embed_prior_study(settings, session_factory, fetched, interpreter) is not None:
                    stats.embedded += 1
                else:
                    stats.failed += 1
                finished += 1
                if progress:
                    progress(finished, total)
    stats.statements = list(dict.fromkeys(stats.statements))[:50]
    stats.seconds = time.monotonic() - t0
    return stats
