"""The TID 1500 SR: valid (dciodvfy), readable (dsrdump, highdicom), coded, deterministic."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import pytest
from pydicom.sr.coding import Code

from echonode.dicom import sr_codes as C
from echonode.dicom.result_uids import result_uid
from echonode.dicom.sr import SRBuildError, build_sr, sr_uids
from echonode.interpretation import DEMO_BANNER, DISCLAIMER, TaskResult
from tests.fixtures.interp import PRIOR_STUDY_UID, dciodvfy, make_sources

# The one warning dciodvfy keeps: it knows only registered coding scheme designators.
# 99ECHONODE is a private scheme (PS3.16 §8: "99" prefix), declared in the SR's Coding
# Scheme Identification Sequence, used where DICOM has no concept (anchors §5.5).
EXPECTED_SR_WARNINGS = [
    "Warning - Unrecognized defined term <99ECHONODE> for value 1 of attribute <Coding Scheme Designator>",
]


@pytest.fixture(scope="module")
def written(tmp_path_factory, realworld_dir):
    from tests.fixtures.interp import make_interpretation
    sources = make_sources(realworld_dir)
    out = {}
    folder = tmp_path_factory.mktemp("sr")
    for demo in (False, True):
        interp = make_interpretation(sources, demo=demo)
        ds = build_sr(interp, sources)
        path = folder / f"sr_{'demo' if demo else 'clinical'}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out[demo] = (interp, ds, path)
    return sources, out


@pytest.mark.parametrize("demo", [False, True])
def test_dciodvfy_no_errors_and_only_understood_warnings(written, demo):
    _, out = written
    errors, warnings = dciodvfy(out[demo][2])
    assert errors == []
    assert warnings == EXPECTED_SR_WARNINGS


def test_dsrdump_reads_the_report(written):
    _, out = written
    exe = shutil.which("dsrdump")
    assert exe, "DCMTK dsrdump is not installed"
    proc = subprocess.run([exe, "+Pc", str(out[True][2])], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "Comprehensive 3D SR Document" in text
    assert '(126000,DCM,"Imaging Measurement Report")' in text
    assert '(121058,DCM,"Procedure reported")=(40701008,SCT,"Echocardiography")' in text
    assert '<contains NUM:(18043-0,LN,"Left Ventricular Ejection Fraction by US")="57.0" (%,UCUM,' in text
    assert "DEMO MODEL" in text
    # the only diagnostic dsrdump prints is about the UTF-8 character set it cannot VR-check
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] in (
        [], ["W: The VR checker does not support this Specific Character Set: ISO_IR 192"])


def test_highdicom_rereads_lvef_value_and_code(written):
    _, out = written
    sr = hd.sr.srread(out[False][2])
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    groups = sr.content.get_image_measurement_groups(tracking_uid=None)
    found = []
    for g in groups:
        found += g.get_measurements(name=Code("18043-0", "LN", "Left Ventricular Ejection Fraction by US"))
    assert len(found) == 1
    lvef = found[0]
    assert lvef.value == pytest.approx(57.0)
    assert (lvef.unit.value, lvef.unit.scheme_designator) == ("%", "UCUM")
    assert (lvef.name.value, lvef.name.scheme_designator) == ("18043-0", "LN")


def _group(sr, task_id):
    for g in sr.content.get_image_measurement_groups():
        if g.tracking_identifier == f"echonode {task_id}":
            return g
    raise AssertionError(f"no group for {task_id}")


def _texts(group):
    return [item.TextValue for item in group[0].ContentSequence if item.ValueType == "TEXT"]


def _qual(group, concept: Code):
    return [q.value for q in group.get_qualitative_evaluations()
            if q.name.value == concept.value and q.name.scheme_designator == concept.scheme_designator]


def test_codes_calls_scores_and_threshold_sources(written):
    _, out = written
    sr = hd.sr.srread(out[False][2])
    # PASP in mm[Hg], method stated (catalogue note: RVSP is the echo proxy)
    pasp = _group(sr, "pulmonary_artery_pressure")
    m = pasp.get_measurements(name=Code("399023006", "SCT", "x"))
    assert m and m[0].value == pytest.approx(34.0) and m[0].unit.value == "mm[Hg]"
    assert any("RVSP (399023006) is the echo proxy" in t for t in _texts(pasp))
    # pacemaker: published threshold, present; score and threshold as NUMs
    pm = _group(sr, "pacemaker")
    assert [v.value for v in _qual(pm, Code("360129009", "SCT", "x"))] == ["121053"]
    assert pm.get_measurements(name=C.SCORE)[0].value == pytest.approx(0.312)
    assert pm.get_measurements(name=C.THRESHOLD)[0].value == pytest.approx(0.298)
    assert any(t.startswith("published threshold 0.298") for t in _texts(pm))
    # tavr: calibrated, absent
    tavr = _group(sr, "tavr")
    assert [v.value for v in _qual(tavr, Code("25510005", "SCT", "x"))] == ["121054"]
    assert any(t.startswith("calibrated on local data (site-calibration") for t in _texts(tavr))
    # impella: uncalibrated -> no coded call, uncalibrated spelled out, score kept
    imp = _group(sr, "impella")
    assert _qual(imp, Code("360066001", "SCT", "x")) == []
    assert imp.get_measurements(name=C.THRESHOLD) == []
    assert imp.get_measurements(name=C.SCORE)[0].value == pytest.approx(0.121)
    assert any(t.startswith("uncalibrated: no threshold") for t in _texts(imp))
    # effusion: small; tamponade absent (its own binary task)
    eff = _group(sr, "pericardial_effusion")
    assert [v.value for v in _qual(eff, Code("373945007", "SCT", "x"))] == ["255507004"]
    assert [v.value for v in _qual(_group(sr, "cardiac_tamponade"), Code("35304003", "SCT", "x"))] == ["121054"]
    # hypertrophy mild; chamber sizes from CID 3705 (Finding = level code)
    finding = Code("121071", "DCM", "Finding")
    assert [v.value for v in _qual(_group(sr, "lv_hypertrophy"), Code("55827005", "SCT", "x"))] == ["255604002"]
    lv = _group(sr, "left_ventricle_size")
    assert lv.finding_type.value == "373124004"
    assert [s.value.value for s in lv.finding_sites] == ["87878005"]
    assert _group(sr, "right_atrium_size").finding_type.value == "373127006"
    # categorical without a called level: no level code, the reason spelled out
    rv = _group(sr, "right_ventricle_size")
    assert rv.finding_type.scheme_designator == "99ECHONODE"
    assert any("uncalibrated" in t for t in _texts(rv))
    # value-coded binary tasks: "no valvular disease" present -> VHD absent;
    # "severe LV dilation" absent -> the task's private concept = absent
    assert [v.value for v in _qual(_group(sr, "no_valvular_heart_disease"), Code("368009", "SCT", "x"))] == ["121054"]
    sev = _group(sr, "severe_left_ventricle_dilation")
    assert [v.value for v in _qual(sev, Code("LV-DIL-SEV", "99ECHONODE", "x"))] == ["121054"]
    for g in sr.content.get_image_measurement_groups():
        g.finding_type  # at most one Finding row per group (highdicom raises otherwise)


def test_groups_reference_sources_and_carry_tracking_and_algorithm(written):
    sources, out = written
    interp, ds, path = out[False]
    sr = hd.sr.srread(path)
    src_uids = {s.SOPInstanceUID for s in sources}
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == len(interp.tasks) + 1  # + longitudinal
    uids = set()
    for g in groups:
        assert g.tracking_uid and g.tracking_identifier.startswith("echonode ")
        uids.add(g.tracking_uid)
        refs = {img.referenced_sop_instance_uid for img in g.source_images}
        assert refs and refs <= src_uids
        names = [i.TextValue for i in g[0].ContentSequence
                 if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "111001"]
        assert names in (["EchoCLIP"], ["EchoCLIP-R"])
        params = [i.TextValue for i in g[0].ContentSequence
                  if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "111002"]
        assert any(p.startswith("weights sha256 ") and len(p.split()[-1]) == 64 for p in params)
        assert any(p.startswith("echonode ") for p in params)
    assert len(uids) == len(groups)
    # evidence lists every source instance
    ev = {i.ReferencedSOPInstanceUID for s in ds.CurrentRequestedProcedureEvidenceSequence
          for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert ev == src_uids
    # device observer and procedure reported
    obs = sr.content.get_observer_contexts()
    assert obs and obs[0].observer_type.value == "121007"
    proc = [i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert proc[0].ConceptCodeSequence[0].CodeValue == "40701008"


def test_longitudinal_section(written):
    _, out = written
    sr = hd.sr.srread(out[False][2])
    lon = _group(sr, "longitudinal comparison")
    assert lon.get_measurements(name=C.LON_SIMILARITY)[0].value == pytest.approx(0.83)
    assert [v.value for v in _qual(lon, C.LON_MISMATCH)] == ["373067005"]
    texts = _texts(lon)
    assert any(PRIOR_STUDY_UID in t and "2023-01-15" in t and "most recent" in t for t in texts)
    assert any("do not establish identity" in t for t in texts)
    uidrefs = [i.UID for i in lon[0].ContentSequence if i.ValueType == "UIDREF"
               and i.ConceptNameCodeSequence[0].CodeValue == "110180"]
    assert uidrefs == [PRIOR_STUDY_UID]


def test_same_study_patient_and_own_series(written):
    sources, out = written
    interp, ds, _ = out[False]
    src = sources[0]
    assert ds.StudyInstanceUID == src.StudyInstanceUID == interp.study_instance_uid
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyDate"):
        assert str(ds[kw].value) == str(src[kw].value), kw
    assert ds.SeriesInstanceUID not in {s.SeriesInstanceUID for s in sources}
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert ds.Modality == "SR"


def test_disclaimer_and_demo_banner(written):
    _, out = written
    for demo in (False, True):
        interp, ds, _ = out[demo]
        qe = [i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
        assert len(qe) == 1
        texts = [i.TextValue for i in qe[0].ContentSequence]
        assert DISCLAIMER in texts
        assert (DEMO_BANNER in texts) is demo
        assert (DEMO_BANNER in ds.SeriesDescription) is demo


def test_uids_are_deterministic_and_change_with_model_or_version(realworld_dir):
    from tests.fixtures.interp import make_interpretation
    sources = make_sources(realworld_dir)
    a = build_sr(make_interpretation(sources), sources)
    b = build_sr(make_interpretation(sources), sources)
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    interp = make_interpretation(sources)
    assert a.SOPInstanceUID == sr_uids(interp)[0] == result_uid(
        interp.study_instance_uid, interp.model.weights_sha256, interp.model.echonode_version, "sr")
    c = build_sr(make_interpretation(sources, version="9.9.9"), sources)
    d = build_sr(make_interpretation(sources, weights_sha256="ab" * 32), sources)
    assert len({a.SOPInstanceUID, c.SOPInstanceUID, d.SOPInstanceUID}) == 3
    assert len({a.SeriesInstanceUID, c.SeriesInstanceUID, d.SeriesInstanceUID}) == 3
    assert a.SOPInstanceUID.startswith("2.25.") and len(a.SOPInstanceUID) <= 64


def test_result_uid_refuses_bad_input():
    with pytest.raises(ValueError):
        result_uid("1.2.3/../4", "ab" * 32, "0.1.0", "sr")
    with pytest.raises(ValueError):
        result_uid("1.2.3", "", "0.1.0", "sr")
    assert result_uid("1.2.3", "ab" * 32, "0.1.0", "sc", 0) != result_uid("1.2.3", "ab" * 32, "0.1.0", "sc", 1)


def test_cart_uids_with_leading_zero_components_get_results(realworld_dir, tmp_path):
    """The receive side accepts path-safe but non-conformant UIDs (a real-world file has
    ``...768994.0104484``); the SR, the overlays and the result files must follow."""
    from echonode.dicom.overlays import build_overlays
    from echonode.dicom.scu import write_results
    from echonode.storage.local import LocalStorage
    from tests.fixtures.interp import make_interpretation
    study = "1.2.826.0.1.3680043.2.0123.77"
    sources = make_sources(realworld_dir, study_uid=study)
    sources[0].SOPInstanceUID = "1.4.13.3.1.0.19.544194620.9411.768994.0104484"
    interp = make_interpretation(sources)
    sr = build_sr(interp, sources)
    scs = build_overlays(interp, sources)
    assert sr.StudyInstanceUID == study and all(sc.StudyInstanceUID == study for sc in scs)
    written = write_results(LocalStorage(tmp_path), [sr, *scs])
    assert [o.study_instance_uid for o in written] == [study] * (1 + len(scs))
    assert all((tmp_path / o.path).parent == tmp_path / "results" / study for o in written)
    with pytest.raises(ValueError):
        result_uid("1.2.03/4", "ab" * 32, "0.1.0", "sr")  # still path-safe only


def test_sources_from_another_study_are_refused(realworld_dir):
    from tests.fixtures.interp import make_interpretation
    sources = make_sources(realworld_dir)
    other = make_sources(realworld_dir, study_uid="1.2.826.0.1.3680043.2.1125.99")
    interp = make_interpretation(sources)
    with pytest.raises(SRBuildError, match="another study"):
        build_sr(interp, [sources[0], other[1]])
    with pytest.raises(SRBuildError, match="no source datasets"):
        build_sr(interp, [])


def test_site_added_task_gets_documented_private_code(realworld_dir, tmp_path):
    from tests.fixtures.interp import make_interpretation
    sources = make_sources(realworld_dir)
    interp = make_interpretation(sources, longitudinal=False, promptcams=False)
    extra = TaskResult("aortic_stenosis", "Aortic stenosis", "binary", "binary mean cosine", score=0.4,
                       call="present", threshold=0.35, threshold_source="calibrated")
    interp = dataclasses.replace(interp, tasks={**interp.tasks, "aortic_stenosis": extra})
    ds = build_sr(interp, sources)
    path = tmp_path / "sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    errors, warnings = dciodvfy(path)
    assert errors == [] and warnings == EXPECTED_SR_WARNINGS
    g = _group(hd.sr.srread(path), "aortic_stenosis")
    code = C.fallback_code("aortic_stenosis", "Aortic stenosis")
    assert code.value.startswith("ZST") and len(code.value) == 15
    assert [v.value for v in _qual(g, code)] == ["121053"]


def test_site_catalogue_codes_are_used(realworld_dir, tmp_path):
    """A site task's codes reach the SR as data, through the result's ``coding``."""
    from echonode.interpret.prompts import load_catalog, task_coding
    from tests.fixtures.interp import make_interpretation
    site = tmp_path / "tasks.toml"
    site.write_text('[tasks.aortic_stenosis]\ntitle = "Aortic stenosis"\nmode = "binary"\ngroup = "valves"\n'
                    'prompts = ["SEVERE AORTIC STENOSIS. "]\nconcept = ["60573004", "SCT", "Aortic valve stenosis"]\n'
                    'site = ["34202007", "SCT", "Aortic Valve"]\n'
                    'private_code = ["AS", "99ECHONODE", "Aortic stenosis"]\n')
    catalog = load_catalog(site)
    sources = make_sources(realworld_dir)
    interp = make_interpretation(sources, longitudinal=False, promptcams=False)
    extra = TaskResult("aortic_stenosis", "Aortic stenosis", "binary", "binary mean cosine", score=0.4,
                       call="present", threshold=0.35, threshold_source="calibrated",
                       coding=task_coding(catalog["aortic_stenosis"]))
    interp = dataclasses.replace(interp, tasks={"aortic_stenosis": extra})
    # stored and read back (SQL keeps the Interpretation as JSON): the codes survive
    interp = type(interp).from_json(interp.to_json())
    ds = build_sr(interp, sources)
    path = tmp_path / "sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    g = _group(hd.sr.srread(path), "aortic_stenosis")
    assert [v.value for v in _qual(g, Code("60573004", "SCT", "x"))] == ["121053"]
    assert g.finding_type.value == "AS"


def test_results_modules_do_not_import_torch():
    """The wall: echonode/dicom imports neither torch nor echonode.interpret."""
    import subprocess
    import sys
    code = ("import sys; import echonode.dicom.sr, echonode.dicom.overlays, echonode.dicom.scu, "
            "echonode.dicom.sr_codes, echonode.dicom.select, echonode.dicom.frames, echonode.dicom.spool, "
            "echonode.dicom.scp; import echonode.commands.outbox; "
            "print('torch' in sys.modules, any(m.split('.')[:2] == ['echonode', 'interpret'] for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False False"


def test_non_finite_numbers_are_omitted_and_empty_reports_refused(realworld_dir, tmp_path):
    from tests.fixtures.interp import make_interpretation
    sources = make_sources(realworld_dir)
    interp = make_interpretation(sources, longitudinal=False, promptcams=False)
    tasks = {"ejection_fraction": TaskResult("ejection_fraction", "LVEF", "regression", "m",
                                             value=float("nan"), unit="%"),
             "pacemaker": TaskResult("pacemaker", "Pacemaker", "binary", "m", score=float("inf"),
                                     call="uncalibrated")}
    ds = build_sr(dataclasses.replace(interp, tasks=tasks), sources)
    path = tmp_path / "sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert dciodvfy(path) == ([], EXPECTED_SR_WARNINGS)
    sr = hd.sr.srread(path)
    lvef = _group(sr, "ejection_fraction")
    assert lvef.get_measurements(name=Code("18043-0", "LN", "x")) == []
    assert any("not a finite number" in t for t in _texts(lvef))
    with pytest.raises(SRBuildError, match="nothing to report"):
        build_sr(dataclasses.replace(interp, tasks={}), sources)


def test_non_standard_character_set_of_a_cart_is_corrected(realworld_dir, tmp_path):
    """Carts write 'ISO-IR 100' (a real file in the fixtures does); the SR must still build."""
    from echonode.dicom.overlays import build_overlays
    from echonode.dicom.sr import _fixed_charset
    from tests.fixtures.interp import make_interpretation

    assert _fixed_charset("ISO-IR 100") == ["ISO_IR 100"]
    assert _fixed_charset(["", "ISO 2022 IR 87"]) == ["", "ISO 2022 IR 87"]
    assert _fixed_charset("NOT A CHARSET") == ["ISO_IR 192"]
    sources = make_sources(realworld_dir)
    for ds in sources:
        ds.SpecificCharacterSet = "ISO-IR 100"
    interp = make_interpretation(sources)
    sr = build_sr(interp, sources)
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    assert sources[0].SpecificCharacterSet == "ISO-IR 100"   # the caller's data is untouched
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    errors, _ = dciodvfy(path)
    assert errors == []
    assert len(build_overlays(interp, sources)) == len(interp.promptcams)
