"""SQL side of receiving an instance: patient/study/series/instance upserts, history.

Called by ``echonode.dicom.spool`` (which owns files and DICOM parsing); this module
owns the SQL. Each instance is recorded inside a transaction; ``place_file`` runs inside
it, after the duplicate check, and its ``wait`` is awaited before the commit, so a
committed row always names a durable file. Instances recorded at the same moment by
several associations share one transaction and one COMMIT (:class:`GroupCommit`); none
is answered before that COMMIT, and one that fails there is retried alone
(``echonode.store.group``).
A different object with a stored SOP Instance UID never replaces a file: it gets a file
of its own and an ``instance_history`` row naming both (see ``docs/durability.md``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from sqlalchemy import bindparam, case, insert, select, update
from sqlalchemy.exc import IntegrityError, OperationalError

from echonode.store.group import group_commit
from echonode.store.models import (STUDY_RECEIVING, VERSION_CURRENT_NEW, VERSION_CURRENT_OLD, Instance,
                                   InstanceHistory, Patient, Series, Study, utcnow)

_INSTANCE_ATTRS = ("instance_number", "image_type", "rows", "columns", "number_of_frames",
                   "frame_time_ms", "cine_rate", "photometric", "manufacturer", "model_name")


@dataclass
class InstanceRecord:
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str
    size: int
    sha256: str
    calling_ae: Optional[str]
    decision: str
    reason: str
    view_code: Optional[str] = None
    view_name: Optional[str] = None
    attrs: dict = field(default_factory=dict)


@dataclass
class RecordOutcome:
    duplicate: bool = False
    replaced: bool = False     # the arriving version became current
    kept_first: bool = False   # the arriving version was recorded but the current one stayed
    path: str = ""
    old_path: Optional[str] = None
    known_path: bool = False   # adopt: the file was already named by the index


ON_CONFLICT_REPLACE = "replace"
ON_CONFLICT_KEEP_FIRST = "keep-first"

#: ``place_file(versioned, reuse) -> (path relative to data_dir, wait or None)``: puts the
#: received file in place without overwriting anything; ``versioned``: another version of
#: this SOP Instance UID is already indexed; ``reuse``: a path of a known version holding
#: the same bytes (nothing to write). ``wait`` is awaited after the statements, before COMMIT.
PlaceFile = Callable[[bool, Optional[str]], tuple[str, Optional[Callable[[], None]]]]


def record_instance(sessions, rec: InstanceRecord, place_file: PlaceFile, *,
                    exists: Callable[[str], bool] = lambda p: True, retries: int = 5,
                    on_conflict: str = ON_CONFLICT_REPLACE, adopt: bool = False) -> RecordOutcome:
    """Index one stored instance; retries on unique-key races and busy databases.

    ``place_file`` runs inside the transaction after the duplicate check (see
    :data:`PlaceFile`). ``adopt``: the file is already at ``rec.path`` (the reconciler);
    it never changes which version is current.

    Concurrent calls on one ``sessions`` (several associations) share a transaction and
    its COMMIT (:class:`echonode.store.group.GroupCommit`); the outcome is returned only after that COMMIT."""
    return group_commit(sessions).run(_RecordJob(sessions, rec, place_file, exists, retries, on_conflict, adopt))


class _RecordJob:
    """One :func:`record_instance` call as a group-commit job (``echonode.store.group``)."""

    def __init__(self, sessions, rec, place_file, exists, retries, on_conflict, adopt):
        self.sessions, self.rec, self.place_file, self.exists = sessions, rec, place_file, exists
        self.retries, self.on_conflict, self.adopt = retries, on_conflict, adopt
        self.final_error: Optional[BaseException] = None

    def statements(self, session):
        """The statements inside a shared transaction: (outcome, wait or None). An error of
        the file steps (``place_file`` or its ``wait``) is this record's answer, never
        retried: a failed fsync is not tried again as if the first had not happened."""
        def place(versioned: bool, reuse: Optional[str]):
            try:
                path, wait = self.place_file(versioned, reuse)
            except BaseException as exc:
                self.final_error = exc
                raise
            if wait is None:
                return path, None

            def checked_wait() -> None:
                try:
                    wait()
                except BaseException as exc:
                    self.final_error = exc
                    raise
            return path, checked_wait

        return _record_statements(session, self.rec, place, self.exists, self.on_conflict, self.adopt)

    def alone(self) -> RecordOutcome:
        """A transaction of its own, with retries on unique-key races and busy databases."""
        last: Exception | None = None
        for attempt in range(self.retries):
            try:
                with self.sessions() as session, session.begin():
                    outcome, wait = _record_statements(session, self.rec, self.place_file, self.exists,
                                                       self.on_conflict, self.adopt)
                    if wait:
                        wait()
                    return outcome
            except (IntegrityError, OperationalError) as exc:
                last = exc
                time.sleep(0.05 * (attempt + 1))
        assert last is not None
        raise last


_I, _S, _ST, _P, _H = (m.__table__ for m in (Instance, Series, Study, Patient, InstanceHistory))
# Built once: a statement built per call costs more Python than the database spends on it.
# Parameters are bound at execution (the names are prefixed where SET clauses reserve them).
_FIND_INSTANCE = select(_I.c.sha256, _I.c.path, _I.c.size, _I.c.received_at, _I.c.calling_ae,
                        _I.c.replaced_count).where(_I.c.sop_instance_uid == bindparam("b_sop"))
_ADD_INSTANCE = insert(_I)
_REPLACE_INSTANCE = update(_I).where(_I.c.sop_instance_uid == bindparam("b_sop"))
_ADD_HISTORY = insert(_H)
_FIND_SERIES = select(_S.c.id, _S.c.study_pk).where(_S.c.series_instance_uid == bindparam("b_uid"))
_ADD_SERIES = insert(_S)
_FIND_STUDY = select(_ST.c.id).where(_ST.c.study_instance_uid == bindparam("b_uid"))
_ADD_STUDY = insert(_ST)
# One atomic statement: if a scheduler just made the study stable/queued, the row lock
# serialises us behind it and the version moves on, so a new job follows later.
_TOUCH_STUDY = update(_ST).where(_ST.c.id == bindparam("b_pk")).values(
    last_received_at=bindparam("b_now"),
    version=case((_ST.c.state == STUDY_RECEIVING, _ST.c.version), else_=_ST.c.version + 1),
    state=STUDY_RECEIVING)
_FIND_PATIENT = select(_P.c.id, _P.c.birth_date, _P.c.sex).where(_P.c.patient_id == bindparam("b_pid"),
                                                                 _P.c.issuer == bindparam("b_issuer"))
_ADD_PATIENT = insert(_P)
_FILL_PATIENT = update(_P).where(_P.c.id == bindparam("b_pk"))


def _path_known(session, path: str) -> bool:
    return session.scalar(select(Instance.id).where(Instance.path == path).limit(1)) is not None or \
        session.scalar(select(InstanceHistory.id).where(
            (InstanceHistory.old_path == path) | (InstanceHistory.new_path == path)).limit(1)) is not None


def _known_version(session, sop: str, sha: str, exists: Callable[[str], bool]) -> Optional[str]:
    """The path of a recorded (non-current) version of ``sop`` with these bytes, if its file is there."""
    for old_sha, old_path, new_sha, new_path in session.execute(
            select(InstanceHistory.old_sha256, InstanceHistory.old_path, InstanceHistory.new_sha256,
                   InstanceHistory.new_path).where(InstanceHistory.sop_instance_uid == sop)
            .order_by(InstanceHistory.id.desc())).all():
        for h, p in ((new_sha, new_path), (old_sha, old_path)):
            if h == sha and p and exists(p):
                return p
    return None


def _record_statements(session, rec: InstanceRecord, place_file: PlaceFile, exists, on_conflict: str,
                       adopt: bool) -> tuple[RecordOutcome, Optional[Callable[[], None]]]:
    """The statements recording one instance, in the caller's transaction: (outcome, the
    ``wait`` of ``place_file`` to await before COMMIT, or None). Core statements, not ORM
    units of work: they run once per received instance."""
    a = rec.attrs
    conn = session.connection()
    existing = conn.execute(_FIND_INSTANCE, {"b_sop": rec.sop_instance_uid}).first()
    if adopt and _path_known(session, rec.path):
        return RecordOutcome(duplicate=True, path=rec.path, known_path=True), None
    if existing is not None and existing.sha256 == rec.sha256 and exists(existing.path):
        return RecordOutcome(duplicate=True, path=existing.path), None
    keep_old = adopt or on_conflict == ON_CONFLICT_KEEP_FIRST
    reuse = None
    if existing is not None:
        reuse = _known_version(session, rec.sop_instance_uid, rec.sha256, exists)
        if reuse is not None and keep_old:
            return RecordOutcome(duplicate=True, path=reuse), None
    path, wait = place_file(existing is not None, reuse)
    now = utcnow()
    values = dict(sop_class_uid=rec.sop_class_uid,
                  transfer_syntax_uid=rec.transfer_syntax_uid, path=path, size=rec.size,
                  sha256=rec.sha256, received_at=now, calling_ae=rec.calling_ae, decision=rec.decision,
                  reason=rec.reason, view_code=rec.view_code, view_name=rec.view_name,
                  **{k: a.get(k) for k in _INSTANCE_ATTRS})
    if existing is None:
        study_pk, series_pk = _upsert_hierarchy(conn, a, rec.study_instance_uid, rec.series_instance_uid, now)
        conn.execute(_ADD_INSTANCE, dict(values, sop_instance_uid=rec.sop_instance_uid, replaced_count=0,
                                         series_pk=series_pk, study_pk=study_pk))
        return RecordOutcome(path=path), wait
    conn.execute(_ADD_HISTORY, dict(
        sop_instance_uid=rec.sop_instance_uid, old_sha256=existing.sha256, new_sha256=rec.sha256,
        old_size=existing.size, old_received_at=existing.received_at, old_calling_ae=existing.calling_ae,
        replaced_at=now, calling_ae=rec.calling_ae, old_path=existing.path, new_path=path, new_size=rec.size,
        current=VERSION_CURRENT_OLD if keep_old else VERSION_CURRENT_NEW))
    if not keep_old:
        # the study's content changed: a new study version (and so a new analysis)
        study_pk, series_pk = _upsert_hierarchy(conn, a, rec.study_instance_uid, rec.series_instance_uid, now)
        conn.execute(_REPLACE_INSTANCE, dict(values, b_sop=rec.sop_instance_uid, series_pk=series_pk,
                                             study_pk=study_pk, replaced_count=(existing.replaced_count or 0) + 1))
    return RecordOutcome(replaced=not keep_old, kept_first=keep_old, path=path, old_path=existing.path), wait


# --------------------------------------------------------------------------- reconciler / retention

@dataclass
class IndexedFile:
    path: str
    size: Optional[int]
    sha256: str
    current: bool


def indexed_files(sessions) -> dict[str, IndexedFile]:
    """Every file the index names (current instances and recorded versions), by path."""
    out: dict[str, IndexedFile] = {}
    with sessions() as session:
        for h in session.execute(select(InstanceHistory.old_path, InstanceHistory.old_size, InstanceHistory.old_sha256,
                                        InstanceHistory.new_path, InstanceHistory.new_size,
                                        InstanceHistory.new_sha256)).all():
            if h[0]:
                out[h[0]] = IndexedFile(h[0], h[1], h[2], False)
            if h[3]:
                out[h[3]] = IndexedFile(h[3], h[4], h[5], False)
        for path, size, sha in session.execute(select(Instance.path, Instance.size, Instance.sha256)).all():
            out[path] = IndexedFile(path, size, sha, True)
    return out


def expire_instance_history(sessions, older_than, *, apply: bool) -> tuple[int, list[str]]:
    """Versions recorded before ``older_than`` (naive UTC) that are no longer current.

    Returns (history rows, paths of files that only those rows name and no instance uses).
    With ``apply`` the rows are deleted (committed) before the caller removes the files, so
    a crash in between leaves files the reconciler finds again, never rows without files."""
    with sessions() as session, session.begin():
        old = session.execute(select(InstanceHistory.id, InstanceHistory.old_path, InstanceHistory.new_path)
                              .where(InstanceHistory.replaced_at < older_than)).all()
        ids = [r[0] for r in old]
        candidates = {p for r in old for p in (r[1], r[2]) if p}
        keep: set[str] = set()
        if candidates:
            keep |= set(session.scalars(select(Instance.path).where(Instance.path.in_(sorted(candidates)))))
            for o, n in session.execute(select(InstanceHistory.old_path, InstanceHistory.new_path)
                                        .where(InstanceHistory.replaced_at >= older_than)).all():
                keep.update(p for p in (o, n) if p)
        paths = sorted(candidates - keep)
        if apply and ids:
            from sqlalchemy import delete

            for i in range(0, len(ids), 500):
                session.execute(delete(InstanceHistory).where(InstanceHistory.id.in_(ids[i:i + 500])))
    return len(ids), paths


def _upsert_hierarchy(conn, a: dict, study_uid: str, series_uid: str, now) -> tuple[int, int]:
    # fast path: a known series (the common case, every instance after a series' first)
    row = conn.execute(_FIND_SERIES, {"b_uid": series_uid}).first()
    if row is not None:
        conn.execute(_TOUCH_STUDY, {"b_pk": row[1], "b_now": now})
        return row[1], row[0]
    study_pk = conn.execute(_FIND_STUDY, {"b_uid": study_uid}).scalar()
    if study_pk is None:
        pid, issuer = (a.get("patient_id") or "")[:64], (a.get("issuer") or "")[:64]
        patient = conn.execute(_FIND_PATIENT, {"b_pid": pid, "b_issuer": issuer}).first()
        if patient is None:
            patient_pk = conn.execute(_ADD_PATIENT, dict(
                patient_id=pid, issuer=issuer, birth_date=a.get("birth_date"), sex=a.get("sex"),
                created_at=now)).inserted_primary_key[0]
        else:
            patient_pk = patient.id
            fill = {k: a[k] for k in ("birth_date", "sex") if a.get(k) and not getattr(patient, k)}
            if fill:
                conn.execute(_FILL_PATIENT, dict(fill, b_pk=patient_pk))
        study_pk = conn.execute(_ADD_STUDY, dict(
            study_instance_uid=study_uid, patient_pk=patient_pk, study_date=a.get("study_date"),
            study_time=a.get("study_time"), accession_number=a.get("accession_number"),
            study_id=a.get("study_id"), study_description=a.get("study_description"),
            state=STUDY_RECEIVING, version=1, first_received_at=now,
            last_received_at=now)).inserted_primary_key[0]
    else:
        conn.execute(_TOUCH_STUDY, {"b_pk": study_pk, "b_now": now})
    series_pk = conn.execute(_ADD_SERIES, dict(
        series_instance_uid=series_uid, study_pk=study_pk, modality=a.get("modality"),
        series_number=a.get("series_number"),
        series_description=a.get("series_description"))).inserted_primary_key[0]
    return study_pk, series_pk


# --------------------------------------------------------------------------- stable studies

@dataclass
class CreatedJob:
    job_id: int
    study_pk: int
    study_instance_uid: str
    study_version: int


def stabilise_studies(sessions, delay_s: float, *, now=None, limit: int = 100) -> tuple[list[CreatedJob], int]:
    """Mark studies with no instance for ``delay_s`` stable; create one job per (study, version).

    Safe with several schedulers on one database: each study moves out of ``receiving``
    by a conditional UPDATE (only one writer sees rowcount 1), and ``analysis_jobs`` has a
    unique (study, version) key as a second guard. Returns (jobs created, studies stabilised).
    """
    import datetime as dt

    from echonode.store.models import (DECISION_ANALYSE, JOB_QUEUED, STUDY_QUEUED, STUDY_STABLE,
                                       AnalysisJob)
    from echonode.store.priors import is_prior_study

    now = now or utcnow()
    cutoff = now - dt.timedelta(seconds=float(delay_s))
    with sessions() as session:
        candidates = session.execute(
            select(Study.id, Study.version, Study.study_instance_uid)
            .where(Study.state == STUDY_RECEIVING, Study.last_received_at <= cutoff)
            .order_by(Study.last_received_at).limit(limit)).all()
    created: list[CreatedJob] = []
    stabilised = 0
    for study_pk, version, uid in candidates:
        try:
            with sessions() as session, session.begin():
                res = session.execute(
                    update(Study).where(Study.id == study_pk, Study.state == STUDY_RECEIVING,
                                        Study.version == version, Study.last_received_at <= cutoff)
                    .values(state=STUDY_STABLE, stable_at=now)
                    .execution_options(synchronize_session=False))
                if res.rowcount != 1:
                    continue  # another scheduler won, or an instance just arrived
                stabilised += 1
                n = session.scalar(select(func_count()).select_from(Instance).where(
                    Instance.study_pk == study_pk, Instance.decision == DECISION_ANALYSE))
                if not n:
                    continue  # nothing to analyse
                if is_prior_study(session, uid) and session.scalar(select(func_count()).select_from(AnalysisJob)
                                                                   .where(AnalysisJob.study_pk == study_pk)) == 0:
                    # a prior retrieved (C-MOVE) for another study's comparison; a study the node
                    # received and analysed before stays one of its own (a new version is analysed)
                    continue
                job = AnalysisJob(study_pk=study_pk, study_instance_uid=uid, study_version=version,
                                  state=JOB_QUEUED, attempts=0, created_at=now, updated_at=now)
                session.add(job)
                session.flush()
                session.execute(update(Study).where(Study.id == study_pk).values(state=STUDY_QUEUED)
                                .execution_options(synchronize_session=False))
                created.append(CreatedJob(job.id, study_pk, uid, version))
        except IntegrityError:
            continue  # the job for this version exists already
    return created, stabilised


def func_count():
    from sqlalchemy import func

    return func.count()


def study_patient(session, study_uid: str) -> Optional[tuple[str, str]]:
    """(PatientID, IssuerOfPatientID) of an indexed study, or None when the study or its
    patient is not indexed. The audit names a delivered result's patient from here, so
    nothing re-reads a DICOM file to learn it."""
    if not study_uid:
        return None
    row = session.execute(select(Patient.patient_id, Patient.issuer).join(Study, Study.patient_pk == Patient.id)
                          .where(Study.study_instance_uid == study_uid)).first()
    return (row[0] or "", row[1] or "") if row is not None else None
