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


# ------------------------------------------------------------------ hostile free text

def test_huge_free_text_is_bounded_and_still_matched_in_its_first_kib():
    """32 KiB+ of peer text in every attribute that selection reads: the decision comes fast
    (the unbounded match of `4\\s*-?\\s*CH` on such a text took seconds with the GIL held),
    and a view label in the first KiB is still found."""
    import time

    from echonode.dicom.select import TEXT_ATTRIBUTES, TEXT_MAX_CHARS

    hostile = "4" + " " * 40000 + "x"               # worst case for chained \s* repeats
    tabs = "PS" + "\t \r\n" * 10000 + "y"
    attrs = {a: hostile for a in TEXT_ATTRIBUTES}
    t0 = time.perf_counter()
    d = decide(us_dataset(**attrs))
    assert time.perf_counter() - t0 < 0.5
    assert d.analyse and "without view information" in d.reason   # no label: unknown-view policy

    attrs["ImageComments"] = "zoomed A4C, " + "4 " * 20000     # the label within the first KiB
    attrs["ProtocolName"] = tabs
    t0 = time.perf_counter()
    d = decide(us_dataset(**attrs))
    assert time.perf_counter() - t0 < 0.5
    assert d.analyse and "ImageComments" in d.reason and "A4C" in d.reason

    late = "x" * (TEXT_MAX_CHARS + 10) + " PLAX"       # beyond the bound: not read
    d = decide(us_dataset(SeriesDescription=late))
    assert "without view information" in d.reason
    d = decide(us_dataset(SeriesDescription="x" * (TEXT_MAX_CHARS - 10) + " PLAX"))
    assert not d.analyse and "SeriesDescription" in d.reason


def test_multivalued_and_odd_text_values():
    from echonode.dicom.select import TEXT_MAX_CHARS, bounded_text

    assert bounded_text(["Apical", "4 chamber"]) == "Apical\\4 chamber"
    ds = us_dataset(SeriesDescription="zoom\\A4C")         # LO with a backslash: a MultiValue
    assert bounded_text(ds.SeriesDescription) == "zoom\\A4C"
    assert bounded_text(pydicom.multival.MultiValue(str, ["x"] * 10**6)) == "\\".join(["x"] * 513)[:TEXT_MAX_CHARS]
    assert bounded_text("  A4C \t\r\n zoom ") == "A4C zoom"
    assert len(bounded_text(["a" * 5000] * 5000)) == TEXT_MAX_CHARS
    assert bounded_text(None) == "" and bounded_text(b"A4C") == "A4C"
    assert decide(us_dataset(ViewName="AP4 " + "z" * 50000)).view_name == ("AP4 " + "z" * 60)


@pytest.mark.parametrize("pattern,why", [
    (r"(a+)+$", "inside a repeated group"),
    (r"(A|AA)*C", "alternation inside a repeated group"),
    (r".*.*4CH", "too much backtracking"),
    (r"4\s*-?\s*CH", "too much backtracking"),          # the old default, chained \s*
    (r"(A)\1", "back-reference"),
    (r"[A4C", "not a regular expression"),
    (r"", "empty"),
])
def test_site_patterns_that_could_backtrack_are_refused_at_load(pattern, why, tmp_path):
    """A site regex from the config file is checked when the config is loaded; the error
    names the key, and `echonode` exits 3 with it."""
    import subprocess
    import sys

    from echonode.config import ConfigError, load_settings

    with pytest.raises(ConfigError) as ei:
        load_settings(env={}, overrides={"select": {"skip_text_patterns": ["PLAX", pattern]}})
    assert "select.skip_text_patterns[1]" in str(ei.value) and why in str(ei.value)
    if why == "inside a repeated group":
        cfg = tmp_path / "echonode.toml"
        cfg.write_text(f"[select]\na4c_text_patterns = ['{pattern}']\n")
        res = subprocess.run([sys.executable, "-m", "echonode", "status", "--config", str(cfg)],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 3 and "select.a4c_text_patterns[0]" in res.stderr


def test_accepted_site_pattern_cannot_blow_up_on_crafted_text():
    """The most expensive pattern the load check accepts, on the text crafted to hurt it most,
    stays within the bound."""
    import time

    from echonode.dicom.select import PATTERN_STEP_BUDGET, pattern_cost

    pattern = r"\bAP(ICAL)?\s*-?4"                     # one unbounded repeat + optionals
    assert pattern_cost(pattern) <= PATTERN_STEP_BUDGET
    s = SelectSettings(a4c_text_patterns=(pattern,), skip_text_patterns=(r".*PLAX",))
    crafted = ("AP" + " " * 30 + "-") * 2000           # 66 KB, near-misses everywhere
    t0 = time.perf_counter()
    d = decide(us_dataset(ImageComments=crafted, SeriesDescription=crafted, ProtocolName=crafted), s)
    assert time.perf_counter() - t0 < 0.5
    assert "without view information" in d.reason
    assert decide(us_dataset(ImageComments="apical  -4 view"), s).analyse


def _vm_hwm_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_hostile_free_text_through_the_node(node, tmp_path):
    """Real sockets: DCMTK storescu sends clips whose text attributes hold 40 KB crafted for the
    old patterns. Each C-STORE is answered within the bound, the node's peak RSS barely moves,
    the decisions are right, and a plain C-ECHO and C-STORE succeed afterwards."""
    import time

    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian
    from sqlalchemy import select as sql_select

    from echonode.store import db
    from echonode.store.models import Instance

    def clip(name, **attrs):
        ds = us_dataset(**attrs)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        path = tmp_path / name
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")       # values longer than their VR allows: on purpose
            ds.save_as(path, enforce_file_format=True)
        return path, ds.SOPInstanceUID

    hostile = "4" + " " * 40000 + "x"
    unlabeled, uid_u = clip("hostile.dcm", ImageComments=hostile, SeriesDescription=hostile, ProtocolName=hostile)
    labeled, uid_l = clip("a4c.dcm", SeriesDescription="A4C " + hostile, ImageComments=hostile)
    plain, uid_p = clip("plain.dcm", SeriesDescription="PLAX")
    before = _vm_hwm_kb(node.proc.pid)
    t0 = time.monotonic()
    res = node.storescu([unlabeled, labeled], timeout=60)
    elapsed = time.monotonic() - t0
    assert res.returncode == 0, res.stderr[-2000:]
    assert elapsed < 10, elapsed
    assert node.echo() == 0
    assert node.storescu([plain]).returncode == 0
    assert _vm_hwm_kb(node.proc.pid) - before < 300 * 1024
    engine = db.make_engine(node.settings.db_url)
    try:
        with db.session_factory(engine)() as s:
            got = {i.sop_instance_uid: i for i in s.scalars(sql_select(Instance))}
    finally:
        engine.dispose()
    assert got[uid_u].decision == "analyse" and "without view information" in got[uid_u].reason
    assert got[uid_l].decision == "analyse" and "SeriesDescription" in got[uid_l].reason
    assert got[uid_p].decision == "skip" and "PLAX" in got[uid_p].reason
