"""Glue between the analysis task and the results area's delivery (``echonode.dicom.scu``,
``echonode.store.outbox``).

* :func:`write_objects` writes the SR and overlays under
  ``<data_dir>/results/<StudyInstanceUID>/<SOPInstanceUID>.dcm`` (``scu.write_results``:
  UIDs validated before they become names; temp file, fsync, rename — a re-run
  overwrites the same files, since the UIDs are deterministic).
* :func:`enqueue` makes one outbox row per object and configured destination and commits
  the caller's session (so the job's other rows commit with them), :func:`deliver` sends
  due rows, :func:`due_count` says whether a delivery run is needed.
"""

from __future__ import annotations

import logging
from typing import Sequence

from echonode.config import Settings

log = logging.getLogger("echonode.pipeline")


def write_objects(settings: Settings, datasets: Sequence) -> list:
    from echonode.dicom.scu import write_results
    return write_results(settings.results_path, list(datasets))


def enqueue(session, settings: Settings, objects: Sequence) -> list[int]:
    """Outbox rows for every object × destination; commits ``session`` in any case.
    With no destination configured the results stay in ``<data_dir>/results``."""
    from echonode.store import outbox

    dests = [d.name for d in settings.delivery.destinations]
    if not dests or not objects:
        session.commit()
        return []
    return list(outbox.add(session, list(objects), dests))


def deliver(settings: Settings, session_factory, ids: Sequence[int] = ()):
    """Send every due outbox row (``ids`` only says which rows prompted the run)."""
    from echonode.dicom.scu import deliver_pending
    from echonode.pipeline.metrics import REGISTRY

    summary = deliver_pending(settings, session_factory)
    for outcome in ("delivered", "committing", "warnings", "retrying", "dead"):
        n = getattr(summary, outcome, 0)
        if n:
            REGISTRY.inc("echonode_deliveries_total", n, outcome=outcome)
    if summary.claimed:
        log.info("delivery: %s", {k: v for k, v in summary.as_dict().items() if v})
    return summary


def due_count(session) -> int:
    from echonode.store.results import outbox_due_count
    return outbox_due_count(session)
