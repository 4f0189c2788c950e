"""Glue between the analysis task and the results area's outbox (``echonode.store.outbox``).

* :func:`write_objects` writes the SR and overlays under
  ``<data_dir>/results/<StudyInstanceUID>/<SOPInstanceUID>.dcm`` (UIDs validated before they
  become names; temp file, fsync, rename: a re-run overwrites the same files).
* :func:`enqueue` makes one outbox row per object and destination (inside the caller's
  transaction), :func:`deliver` sends due rows, :func:`due_count` says whether a delivery
  run is needed.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Sequence

from echonode.config import Settings

log = logging.getLogger("echonode.pipeline")

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def _check_uid(uid: str, what: str) -> str:
    uid = str(uid)
    if not (0 < len(uid) <= 64 and _UID.match(uid)):
        raise ValueError(f"{what} is not a valid DICOM UID: {uid[:80]!r}")
    return uid


def write_objects(settings: Settings, study_uid: str, datasets: Sequence) -> list[Path]:
    folder = settings.results_path / _check_uid(study_uid, "StudyInstanceUID")
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for ds in datasets:
        sop = _check_uid(ds.SOPInstanceUID, "SOPInstanceUID")
        final = folder / f"{sop}.dcm"
        tmp = folder / f".{sop}.{os.getpid()}.tmp"
        ds.save_as(tmp, enforce_file_format=True)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        out.append(final)
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return out


SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


def enqueue(session, settings: Settings, study_uid: str, datasets: Sequence, files: Sequence[Path]) -> list[int]:
    """One outbox row per (object, configured destination); commits the caller's session.

    With no destination configured the results stay in ``<data_dir>/results`` only."""
    from echonode.store import outbox

    dests = [d.name for d in settings.delivery.destinations]
    if not dests:
        session.commit()
        return []
    objs = [outbox.OutboxObject(path=str(f), sop_instance_uid=str(ds.SOPInstanceUID),
                                sop_class_uid=str(ds.SOPClassUID), study_instance_uid=study_uid,
                                kind="sr" if str(ds.SOPClassUID).startswith(SR_CLASS_PREFIX) else "sc")
            for ds, f in zip(datasets, files)]
    return list(outbox.add(session, objs, dests))


def deliver(settings: Settings, session_factory, ids: Sequence[int]):
    from echonode.store import outbox
    return outbox.deliver(settings, session_factory, list(ids) or None)


def due_count(session) -> int:
    try:
        from echonode.store import outbox
    except ImportError:
        return 0
    return int(outbox.due_count(session))
