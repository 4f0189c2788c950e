"""Training data from the node's own SQL index (``echonode train --from-db``).

A site's node already holds what training needs: the echo clips it received (indexed with
the clip-selection decision) and, when the echo system or the PACS sends it, the
cardiologist's report as a DICOM Structured Report in the same study. This module turns
that into a manifest (the same CSV ``echonode train`` reads):

* one row per stored instance that clip selection marked ``analyse`` (apical 4-chamber
  clips), in a study that also holds a report;
* the report is the text of the study's SR documents: every TEXT content item, in tree
  order, joined with spaces (a numeric item contributes ``<meaning> IS <value><unit>``).
  SRs that echonode itself wrote (Manufacturer ``echonode``) are never used — training on
  the model's own output would teach it nothing but itself;
* ``patient_id`` is the node's patient key (sha256 of issuer + Patient ID), so the manifest
  carries no PHI; ``study_date`` comes from the index;
* the split is a deterministic function of the patient key (80 / 10 / 10 train / val /
  test), so a patient never lands in two splits and re-exports are stable.

Studies without a usable report are counted in the returned problems, by reason only
(no identifiers), as everything else in training is.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
OWN_MANUFACTURER = "echonode"
MANIFEST_FIELDS = ("path", "report", "patient_id", "study_date", "split", "study_uid", "sop_uid")


@dataclass
class DbExport:
    rows: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    studies: int = 0


def split_for(patient_key: str, fractions=(0.8, 0.1)) -> str:
    """train / val / test from the patient key alone (stable across exports)."""
    u = int(hashlib.sha256(("split|" + patient_key).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"


def sr_text(ds) -> str:
    """The report text of an SR dataset: TEXT items (and NUM items as sentences) in tree order."""
    out: list[str] = []

    def meaning(item) -> str:
        seq = getattr(item, "ConceptNameCodeSequence", None)
        return str(seq[0].CodeMeaning) if seq else ""

    def walk(items) -> None:
        for it in items or ():
            vt = str(getattr(it, "ValueType", ""))
            if vt == "TEXT":
                t = " ".join(str(getattr(it, "TextValue", "")).split())
                if t:
                    out.append(t)
            elif vt == "NUM":
                mv = getattr(it, "MeasuredValueSequence", None)
                if mv:
                    unit = ""
                    units = getattr(mv[0], "MeasurementUnitsCodeSequence", None)
                    if units:
                        unit = str(units[0].CodeValue)
                    out.append(f"{meaning(it).upper()} IS {mv[0].NumericValue}{unit}.")
            walk(getattr(it, "ContentSequence", None))

    walk(getattr(ds, "ContentSequence", None))
    return " ".join(out)


def export_manifest(settings, out_csv: str | Path) -> DbExport:
    """Write a training manifest from the node's SQL index and spool (see the module text)."""
    import pydicom
    from sqlalchemy import select

    from echonode.store import db
    from echonode.store.models import Instance, Patient, Study
    from echonode.store.interpretations import patient_key

    engine = db.make_engine(settings.db_url)
    data_dir = Path(settings.data_path)
    res = DbExport()
    reasons: dict[str, int] = {}
    try:
        with db.session_factory(engine)() as s:
            studies = s.execute(select(Study, Patient).outerjoin(Patient, Study.patient_pk == Patient.id)
                                .order_by(Study.id)).all()
            for study, patient in studies:
                res.studies += 1
                inst = s.execute(select(Instance).where(Instance.study_pk == study.id).order_by(Instance.id)).scalars().all()
                clips = [i for i in inst if i.decision == "analyse"]
                srs = [i for i in inst if i.sop_class_uid.startswith(SR_CLASS_PREFIX)]
                if not clips:
                    reasons["no analysable clip"] = reasons.get("no analysable clip", 0) + 1
                    continue
                texts = []
                for sr in srs:
                    try:
                        ds = pydicom.dcmread(str(data_dir / sr.path), stop_before_pixels=True)
                    except Exception as exc:  # noqa: BLE001 - a stored file we cannot read is reported, not fatal
                        reasons[f"unreadable SR ({type(exc).__name__})"] = reasons.get(
                            f"unreadable SR ({type(exc).__name__})", 0) + 1
                        continue
                    if str(getattr(ds, "Manufacturer", "")).strip().lower() == OWN_MANUFACTURER:
                        continue
                    t = sr_text(ds)
                    if t:
                        texts.append(t)
                if not texts:
                    reasons["no report (SR with text) in the study"] = reasons.get(
                        "no report (SR with text) in the study", 0) + 1
                    continue
                pkey = patient_key(patient.patient_id if patient else "", patient.issuer if patient else "")
                split = split_for(pkey)
                report = " ".join(texts)
                for c in clips:
                    res.rows.append({"path": str((data_dir / c.path).resolve()), "report": report,
                                     "patient_id": pkey, "study_date": study.study_date or "", "split": split,
                                     "study_uid": study.study_instance_uid, "sop_uid": c.sop_instance_uid})
    finally:
        engine.dispose()
    res.problems = [f"{n} stud{'y' if n == 1 else 'ies'} skipped: {why}" for why, n in sorted(reasons.items())]
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_csv.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=MANIFEST_FIELDS)
        w.writeheader()
        w.writerows(res.rows)
    tmp.replace(out_csv)
    return res
