"""Training/evaluation manifests.

A manifest is a CSV (or Parquet) table with one row per clip:

=============  ===========================================================================
column         meaning
=============  ===========================================================================
path           DICOM file or video (AVI/MP4); relative paths are relative to the manifest
report         the study's report text (Cedars template phrasing for EchoCLIP-R)
patient_id     used only to keep a patient in one split and for same-patient metrics
study_date     ISO date (YYYY-MM-DD) or DICOM DA (YYYYMMDD)
split          train / val / test
...            optional label columns (phantom truth: lvef, pasp, pacemaker, ...)
=============  ===========================================================================

Bad rows (missing file, empty report, unknown split) are reported and skipped. A patient
that appears in two splits is a leak: loading refuses the manifest (ManifestError) unless
``allow_leaks`` is set. Patient identifiers are never printed; problems name row numbers.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REQUIRED = ("path", "report", "patient_id", "study_date", "split")
SPLITS = ("train", "val", "test")


class ManifestError(ValueError):
    """The manifest cannot be used (unreadable, missing columns, split leak)."""


@dataclass
class Row:
    index: int                     # 1-based data row number in the file
    path: Path
    report: str
    patient_id: str
    study_date: str
    split: str
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """A stable identifier for caches (path + size + mtime)."""
        try:
            st = self.path.stat()
            sig = f"{self.path.resolve()}|{st.st_size}|{int(st.st_mtime)}"
        except OSError:
            sig = str(self.path)
        return hashlib.sha256(sig.encode()).hexdigest()[:24]

    def value(self, name: str) -> Optional[str]:
        v = self.extra.get(name)
        return None if v is None or str(v).strip() == "" else str(v)


@dataclass
class Manifest:
    path: Path
    rows: list[Row]
    problems: list[str]
    columns: list[str]

    def split(self, name: str) -> list[Row]:
        return [r for r in self.rows if r.split == name]


def _read_table(path: Path) -> tuple[list[str], list[dict]]:
    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
        except ImportError:  # pragma: no cover
            raise ManifestError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        try:
            table = pq.read_table(path)
        except Exception as exc:  # noqa: BLE001
            raise ManifestError(f"{path}: cannot read Parquet ({exc})") from None
        cols = list(table.column_names)
        data = table.to_pylist()
        return cols, [{k: ("" if v is None else str(v)) for k, v in r.items()} for r in data]
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            cols = list(reader.fieldnames or [])
            return cols, [dict(r) for r in reader]
    except FileNotFoundError:
        raise ManifestError(f"manifest not found: {path}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(f"{path}: cannot read CSV ({exc})") from None


def load_manifest(path, *, check_files: bool = True, allow_leaks: bool = False) -> Manifest:
    path = Path(path)
    cols, data = _read_table(path)
    missing = [c for c in REQUIRED if c not in cols]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {', '.join(missing)}; required: {', '.join(REQUIRED)}")
    base = path.parent
    rows: list[Row] = []
    problems: list[str] = []
    for i, r in enumerate(data, start=1):
        p = (r.get("path") or "").strip()
        if not p or "\x00" in p:
            problems.append(f"row {i}: empty or invalid path; skipped")
            continue
        fp = Path(p)
        if not fp.is_absolute():
            fp = base / fp
        report = (r.get("report") or "").strip()
        if not report:
            problems.append(f"row {i}: empty report; skipped")
            continue
        split = (r.get("split") or "").strip().lower()
        if split not in SPLITS:
            problems.append(f"row {i}: split {split!r} is not one of {', '.join(SPLITS)}; skipped")
            continue
        pid = (r.get("patient_id") or "").strip()
        if not pid:
            problems.append(f"row {i}: empty patient_id; skipped")
            continue
        if check_files and not fp.is_file():
            problems.append(f"row {i}: file not found ({fp.name}); skipped")
            continue
        extra = {k: v for k, v in r.items() if k not in REQUIRED}
        rows.append(Row(i, fp, report, pid, (r.get("study_date") or "").strip(), split, extra))
    # split leaks: one patient in two splits
    seen: dict[str, set] = {}
    for row in rows:
        seen.setdefault(row.patient_id, set()).add(row.split)
    leaks = [pid for pid, s in seen.items() if len(s) > 1]
    if leaks:
        first = sorted({row.index for row in rows if row.patient_id in set(leaks)})[:5]
        msg = (f"{path}: {len(leaks)} patient(s) appear in more than one split (e.g. rows "
               f"{', '.join(map(str, first))}); a patient must stay in one split")
        if not allow_leaks:
            raise ManifestError(msg + "; refusing (fix the split column)")
        problems.append(msg)
    return Manifest(path, rows, problems, cols)
