"""The task catalogue: fidelity to the published prompts, codes, and site-file errors."""

from __future__ import annotations

import json
import re

import pytest

from echonode.config import ConfigError
from echonode.interpret.prompts import PRIVATE_SCHEME, TaskCatalogError, load_catalog


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


@pytest.fixture(scope="module")
def published(echoclip_data):
    return json.loads((echoclip_data / "prompts_used.json").read_text())


def test_every_published_task_present_with_exact_prompts(catalog, published):
    # JSON tasks kept under their own id (PA pressure under utils' key)
    rename = {"pulmonary_artery_pressure_continuous": "pulmonary_artery_pressure"}
    for key, entry in published.items():
        task = catalog[rename.get(key, key)]
        assert task.mode == entry["mode"], key
        expected = entry.get("testers", entry["label_sources"])
        if key == "left_ventricle_size":   # scored with all utils per-severity prompts
            expected = entry["label_sources"]
        assert sorted(task.prompts) == sorted(expected), key
        if task.mode == "categorical":
            pairs = sorted(zip(task.prompts, task.values))
            assert pairs == sorted(zip(entry["label_sources"], entry["values"])), key
            names = {str(lv.value): lv.name for lv in task.levels}
            for v, name in entry["value_mapping"].items():
                assert names[v] == name
        if task.mode == "regression":
            assert task.value_range == tuple(entry["range"])


def test_per_severity_split(catalog):
    for chamber, suffix in (("LEFT VENTRICLE", "left_ventricle_dilation"), ("RIGHT VENTRICLE", "right_ventricle_size"),
                            ("LEFT ATRIUM", "left_atrium_size"), ("RIGHT ATRIUM", "right_atrium_size")):
        for grade in ("severe", "moderate", "mild"):
            t = catalog[f"{grade}_{suffix}"]
            assert t.mode == "binary" and t.group == "chamber"
            assert f"{grade.upper()} DILATED {chamber}. " in t.prompts
            assert all(p.startswith(f"{grade.upper()} DILATED {chamber}") for p in t.prompts)
    assert len(catalog["severe_left_ventricle_dilation"].prompts) == 3
    assert catalog["severe_left_ventricle_dilation"].value_code.value == "373128001"
    assert catalog["cardiac_tamponade"].prompts == catalog["pericardial_effusion"].level_prompts(4)


def test_catalogue_contents(catalog):
    for tid in ("pacemaker", "impella", "tavr", "mitraclip", "lv_hypertrophy", "normal_wall_thickness",
                "pericardial_effusion", "cardiac_tamponade", "right_atrial_pressure", "atrial_fibrillation",
                "no_valvular_heart_disease", "ejection_fraction", "pulmonary_artery_pressure"):
        assert tid in catalog
    assert catalog["pacemaker"].published_threshold == 0.298
    assert [t.id for t in catalog.values() if t.published_threshold is not None] == ["pacemaker"]
    assert "4.0CM" in catalog["impella"].prompts[0]               # tester, not the <#> label source
    ef = catalog["ejection_fraction"]
    assert ef.concept.as_tuple() == ("18043-0", "LN", "Left Ventricular Ejection Fraction by US")
    assert ef.unit.value == "%"
    assert catalog["pulmonary_artery_pressure"].unit.value == "mm[Hg]"
    assert catalog["pacemaker"].concept.as_tuple() == ("360129009", "SCT", "Cardiac pacemaker lead")
    assert catalog["mitraclip"].site.value == "91134007"
    for t in catalog.values():
        assert t.private_code.scheme == PRIVATE_SCHEME and len(t.private_code.value) <= 16
        assert t.concept.scheme in ("SCT", "LN", "DCM")
        assert t.title and t.source
    ids = [t.private_code.value for t in catalog.values()]
    assert len(ids) == len(set(ids))


def write(tmp_path, text):
    p = tmp_path / "site.toml"
    p.write_text(text)
    return p


def test_site_override_add_and_disable(tmp_path, catalog):
    p = write(tmp_path, """
[tasks.pacemaker]
prompts = ["PACER WIRE IN RIGHT VENTRICLE. "]
published_threshold = 0.25

[tasks.atrial_fibrillation]
enabled = false

[tasks.lv_thrombus]
title = "LV thrombus"
mode = "binary"
group = "lv"
prompts = ["LEFT VENTRICULAR THROMBUS IS PRESENT. "]
concept = ["396339007", "SCT", "Thrombus"]
""")
    cat = load_catalog(p)
    assert cat["pacemaker"].prompts == ("PACER WIRE IN RIGHT VENTRICLE. ",)
    assert cat["pacemaker"].published_threshold == 0.25
    assert cat["pacemaker"].concept == catalog["pacemaker"].concept        # untouched keys kept
    assert "atrial_fibrillation" not in cat
    assert cat["lv_thrombus"].private_code.scheme == PRIVATE_SCHEME
    assert len(cat) == len(catalog)


def line_of(msg):
    m = re.search(r"site\.toml:(\d+):", msg)
    assert m, msg
    return int(m.group(1))


def test_syntax_error_names_line(tmp_path):
    p = write(tmp_path, '[tasks.x]\ntitle = "a"\nmode = binary\n')
    with pytest.raises(TaskCatalogError) as ei:
        load_catalog(p)
    assert line_of(str(ei.value)) == 3
    assert isinstance(ei.value, ConfigError)


@pytest.mark.parametrize("text,line,needle", [
    ('\n\n[tasks.foo]\ntitle = "Foo"\nmode = "binary"\nprompts = ["A. "]\n', 3, "concept"),
    ('[tasks.pacemaker]\nprompts = []\n', 2, "prompts"),
    ('[tasks.pacemaker]\ntitle = "x"\n\nmode = "ternary"\n', 4, "mode"),
    ('[tasks.ejection_fraction]\n# comment\nprompts = ["EF IS 50%"]\n', 3, "<#>"),
    ('[tasks.pacemaker]\npublished_threshold = 3\n', 2, "published_threshold"),
    ('[tasks.pacemaker]\ncolour = "red"\n', 2, "unknown key"),
    ('[tasks.lv_hypertrophy]\nvalues = [1, 2]\n', 2, "values"),
    ('[tasks.pacemaker]\nconcept = ["1", "SCT"]\n', 2, "concept"),
    ('[tasks.Bad-Id]\ntitle = "x"\n', 1, "task id"),
])
def test_semantic_errors_name_line(tmp_path, text, line, needle):
    p = write(tmp_path, text)
    with pytest.raises(TaskCatalogError) as ei:
        load_catalog(p)
    msg = str(ei.value)
    assert needle in msg
    assert line_of(msg) == line


def test_missing_file(tmp_path):
    with pytest.raises(TaskCatalogError, match="not found"):
        load_catalog(tmp_path / "nope.toml")


def test_regression_values_narrowed_by_model_range(catalog):
    ef = catalog["ejection_fraction"]
    assert ef.regression_values() == range(0, 101)
    assert ef.regression_values((12, 78)) == range(12, 79)
    assert ef.regression_values((-5, 150)) == range(0, 101)      # never wider than the task's range
    assert ef.regression_values((120, 150)) == range(0, 101)     # no overlap: the task's range
