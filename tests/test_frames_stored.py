"""Issue 6: frames of every pixel-bearing instance *as stored by the node* decode to the
expected shape (T = Number of Frames, H = Rows, W = Columns, 3), except where no decoder
is installed, in which case the reason names the transfer syntax and what to install.

Real components only: a raw DIMSE sender (pynetdicom, the file bytes as they are) against
``echonode serve``; the expected shape comes from the node's SQL index.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from echonode.dicom import frames as fr  # noqa: E402
from echonode.dicom.frames import FrameDecodeError, count_frames, load_clip  # noqa: E402

pytestmark = [
    pytest.mark.timeout(240),
    # a real-world file carries a UID with a leading-zero component; not our concern here
    pytest.mark.filterwarnings("ignore:Invalid value for VR UI"),
]


def _send_all(node, files: list[Path], tmp_path: Path) -> None:
    from echonode.dicom.spool import file_meta_bytes
    from tests.fixtures.node import dataset_bytes, send_raw

    # One association, the dataset bytes exactly as on disk (DCMTK storescu itself is
    # exercised file by file in test_scp.py; here the point is what the node stored).
    raw = list(files)
    for f, st in zip(raw, send_raw(node.port, raw)):
        if st == 0:
            continue
        # A file meta whose SOP Instance UID differs from the dataset's is refused raw
        # (0xA900); DCMTK-style senders take the dataset's UID: send it that way.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        fixed = tmp_path / f.name
        fixed.write_bytes(
            file_meta_bytes(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID))
            + dataset_bytes(f)
        )
        assert send_raw(node.port, [fixed]) == [0], f"{f.name}: refused (status {st:#06x})"


def test_every_stored_us_instance_decodes(node, realworld_dir, tmp_path):
    from sqlalchemy import select

    from echonode.store import db
    from echonode.store.models import Instance

    files = sorted(realworld_dir.glob("us_*/*.dcm"))
    assert len(files) == 19
    _send_all(node, files, tmp_path)

    engine = db.make_engine(node.settings.db_url)
    try:
        with db.session_factory(engine)() as s:
            rows = list(s.scalars(select(Instance)))
    finally:
        engine.dispose()
    # 19 files, two of them re-encoded copies sharing a SOP Instance UID with another file
    assert len(rows) >= 17
    decoded, refused = 0, []
    for row in rows:
        path = node.data_dir / row.path
        n = row.number_of_frames or 1
        assert count_frames(path) == n
        # Every frame of the shorter clips; first and last of the long ones (all their
        # frames are decoded from the source files in test_frames.py).
        idx = None if n <= 40 else [0, n - 1]
        try:
            clip = load_clip(path, idx)
        except FrameDecodeError as exc:
            # Only a transfer syntax without an installed decoder may fail, with its reason.
            assert row.transfer_syntax_uid in fr.JPEGXL_SYNTAXES and fr._jpegxl_decoder() is None, exc
            assert exc.reason.startswith("no decoder installed for JPEG XL")
            assert row.transfer_syntax_uid in exc.reason
            refused.append(row.transfer_syntax_uid)
            continue
        assert clip.n_frames == n
        assert clip.frames.shape == (n if idx is None else 2, row.rows, row.columns, 3), row.path
        assert clip.frames.dtype == np.uint8
        assert clip.transfer_syntax == row.transfer_syntax_uid
        decoded += 1
    assert decoded + len(refused) == len(rows)
    assert decoded >= len(rows) - 1
