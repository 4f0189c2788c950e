"""A4C clip selection: a decision and a reason for every instance, from header attributes."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from echonode.config import SelectSettings
from echonode.dicom.select import decide
from tests.fixtures.ingest import us_dataset


def code(value, scheme="SCT", meaning=""):
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return Sequence([item])


def region(spatial, data_type):
    r = Dataset()
    r.RegionSpatialFormat, r.RegionDataType = spatial, data_type
    return r


def test_coded_view():
    d = decide(us_dataset(ViewCodeSequence=code("399214001", meaning="Apical four chamber")))
    assert d.analyse and d.view_code == "SCT:399214001" and "coded view" in d.reason
    assert d.view_name == "Apical four chamber"
    assert decide(us_dataset(ViewCodeSequence=code("G-A19C", "SRT"))).analyse
    d = decide(us_dataset(ViewCodeSequence=code("399232001", meaning="Apical two chamber"),
                          SeriesDescription="A4C"))     # the code wins over free text
    assert not d.analyse and "not apical four chamber" in d.reason


@pytest.mark.parametrize("attr,text,expected", [
    ("SeriesDescription", "A4C", "analyse"),
    ("SeriesDescription", "Apical 4 chamber", "analyse"),
    ("ImageComments", "4CH zoom", "analyse"),
    ("ViewName", "AP4", "analyse"),
    ("SeriesDescription", "PLAX", "skip"),
    ("SeriesDescription", "PS LAX MR & AI", "skip"),
    ("ProtocolName", "Subcostal", "skip"),
])
def test_text_rules(attr, text, expected):
    d = decide(us_dataset(**{attr: text}))
    assert d.decision == expected and attr in d.reason


def test_configurable_rules_and_unknown_policy():
    s = SelectSettings(a4c_text_patterns=(r"VIEW_Q",), skip_text_patterns=(), unknown_view_policy="skip")
    assert decide(us_dataset(SeriesDescription="view_q"), s).analyse
    d = decide(us_dataset(SeriesDescription="A4C"), s)   # default patterns replaced
    assert not d.analyse and "unknown_view_policy=skip" in d.reason
    d = decide(us_dataset())
    assert d.analyse and "without view information" in d.reason and "unknown_view_policy=analyse" in d.reason


def test_doppler_mmode_single_frame_and_other_objects():
    ecg_and_2d = us_dataset(SequenceOfUltrasoundRegions=Sequence([region(1, 1), region(4, 10)]))
    assert decide(ecg_and_2d).analyse                       # ECG trace beside a 2D region
    for regs, word in (([region(1, 1), region(3, 3)], "spectral"), ([region(3, 4)], "spectral"),
                       ([region(1, 1), region(2, 1)], "M-mode")):
        d = decide(us_dataset(SeriesDescription="A4C", SequenceOfUltrasoundRegions=Sequence(regs)))
        assert not d.analyse and word in d.reason
    d = decide(us_dataset(frames=1, SeriesDescription="A4C"))
    assert not d.analyse and d.reason.startswith("not a cine clip")
    assert not decide(us_dataset(frames=3), SelectSettings(min_frames=10)).analyse
    for cls, word in (("1.2.840.10008.5.1.4.1.1.88.33", "structured report"),
                      ("1.2.840.10008.5.1.4.1.1.7", "secondary capture"),
                      ("1.2.840.10008.5.1.4.1.1.6.2", "volume")):
        d = decide(us_dataset(SOPClassUID=cls))
        assert not d.analyse and word in d.reason


def test_realworld_decisions(realworld_dir):
    got = {}
    for f in sorted(realworld_dir.glob("*/*.dcm")):
        d = decide(pydicom.dcmread(f, stop_before_pixels=True))
        assert d.decision in ("analyse", "skip") and d.reason
        got[f.name] = d
    assert all(not got[f.name].analyse for f in (realworld_dir / "sr").glob("*.dcm"))
    assert all(got[f.name].reason.startswith("not a cine clip") for f in (realworld_dir / "us_singleframe").glob("*.dcm"))
    assert not got["dcm4che__US-PAL-8-10x-echo.dcm"].analyse            # "PS LAX" series
    assert "PS" in got["dcm4che__US-PAL-8-10x-echo.dcm"].reason
    assert got["pydicom-data__OBXXXX1A_rle_2frame.dcm"].analyse         # 2D + ECG trace regions
    assert got["dcm4che__will-jxl.dcm"].analyse                         # 2D colour flow, no view label
    assert "unknown_view_policy" in got["pydicom__examples_ybr_color.dcm"].reason
