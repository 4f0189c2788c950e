"""docs/conformance.md against the node: the statement's SOP class and transfer-syntax tables
must be exactly what the SCP accepts, as configured and as negotiated by a running
``echonode serve``; its task code table must be the built-in task catalogue.

The tables are found by their ``<!-- table: NAME -->`` markers, so the prose around them can
change freely.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pydicom = pytest.importorskip("pydicom")

from conftest import ROOT  # noqa: E402

STATEMENT = ROOT / "docs" / "conformance.md"
UID_RE = re.compile(r"\b1\.2\.840\.10008(?:\.\d+)+\b")
CODE_RE = re.compile(r'\(([^,()]+), ([^,()]+), "([^"]+)"\)')

VERIFICATION = "1.2.840.10008.1.1"
STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"
# Not in the statement (asserted below): a storage class and a transfer syntax to be refused.
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
MPEG2_MAIN_PROFILE = "1.2.840.10008.1.2.4.100"


def _table(name: str) -> list[dict[str, str]]:
    """The markdown table after ``<!-- table: name -->`` as a list of {header: cell}."""
    lines = STATEMENT.read_text(encoding="utf-8").splitlines()
    marker = f"<!-- table: {name} -->"
    assert marker in lines, f"{STATEMENT} has no {marker}"
    i = lines.index(marker) + 1
    while i < len(lines) and not lines[i].startswith("|"):
        i += 1
    rows = []
    while i < len(lines) and lines[i].startswith("|"):
        rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
        i += 1
    header, sep, body = rows[0], rows[1], rows[2:]
    assert set("".join(sep)) <= set("-: "), f"table {name}: second line is not a separator"
    assert body, f"table {name} is empty"
    return [dict(zip(header, r)) for r in body]


def _uids(cell: str) -> list[str]:
    return UID_RE.findall(cell)


def _one_uid(cell: str) -> str:
    found = _uids(cell)
    assert len(found) == 1, cell
    return found[0]


@pytest.fixture(scope="module")
def statement():
    storage = [_one_uid(r["UID"]) for r in _table("scp-storage-sop-classes")]
    syntaxes = [_one_uid(r["UID"]) for r in _table("scp-transfer-syntaxes")]
    other = {_one_uid(r["UID"]): _uids(r["Transfer Syntaxes"]) for r in _table("scp-other-contexts")}
    assert len(set(storage)) == len(storage) and len(set(syntaxes)) == len(syntaxes)
    for uid in (CT_IMAGE_STORAGE, KEY_OBJECT_SELECTION):
        assert uid not in storage
    assert MPEG2_MAIN_PROFILE not in syntaxes
    return {"storage": storage, "syntaxes": syntaxes, "other": other}


def test_statement_equals_scp_configuration(statement):
    """Both directions: nothing accepted that the statement omits, nothing stated that is refused."""
    from echonode.config import Settings
    from echonode.dicom import scp

    assert set(statement["storage"]) == set(scp.STORAGE_SOP_CLASSES)
    assert set(statement["syntaxes"]) == set(scp.TRANSFER_SYNTAXES)
    # the AE the node builds: every context it supports, with its transfer syntaxes
    ae = scp.EchoSCP(Settings(), spool=None).ae
    supported = {str(cx.abstract_syntax): {str(t) for t in cx.transfer_syntax} for cx in ae.supported_contexts}
    expected = {uid: set(statement["syntaxes"]) for uid in statement["storage"]}
    expected.update({uid: set(ts) for uid, ts in statement["other"].items()})
    assert supported == expected
    assert set(statement["other"]) == {VERIFICATION, STORAGE_COMMITMENT_PUSH}


def _negotiate(port: int, contexts: list[tuple[str, str]]):
    """Propose one presentation context per (abstract syntax, transfer syntax); return the
    accepted pairs and {pair: result} of the refused ones."""
    from pynetdicom import AE

    ae = AE(ae_title="CONFSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    for abstract, ts in contexts:
        ae.add_requested_context(abstract, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title="ECHONODE")
    try:
        assert assoc.is_established, "association not established"
        accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
        refused = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])): cx.result for cx in assoc.rejected_contexts}
    finally:
        assoc.release()
        ae.shutdown()
    return accepted, refused


def test_running_node_negotiates_exactly_the_statement(node, statement, realworld_dir, tmp_path):
    """A running ``echonode serve``: each stated storage class in each stated transfer syntax is
    accepted; an unstated class or transfer syntax is refused with the PS3.8 reason."""
    from pydicom._uid_dict import UID_dictionary
    from pydicom.uid import AllTransferSyntaxes, ExplicitVRLittleEndian

    anchor = (VERIFICATION, "1.2.840.10008.1.2")  # keeps the association up when all else is refused
    # every storage SOP class DICOM defines (pydicom's UID dictionary), in Explicit VR Little
    # Endian: the node accepts exactly the stated ones
    known = sorted(uid for uid, (name, kind, *_rest) in UID_dictionary.items()
                   if kind == "SOP Class" and name.endswith("Storage") and "Storage Commitment" not in name)
    assert set(statement["storage"]) <= set(known)
    accepted = set()
    for i in range(0, len(known), 100):
        got, _refused = _negotiate(node.port, [anchor] + [(uid, ExplicitVRLittleEndian) for uid in known[i:i + 100]])
        accepted |= {uid for uid, _ts in got - {anchor}}
    assert accepted == set(statement["storage"])
    # every transfer syntax pydicom knows or the SCP module names (newer ones such as JPEG XL
    # are not in pydicom's list), each with every stated class plus an unstated one
    from echonode.dicom.scp import TRANSFER_SYNTAXES

    probe_ts = set(statement["syntaxes"]) | set(AllTransferSyntaxes) | set(TRANSFER_SYNTAXES) | {MPEG2_MAIN_PROFILE}
    for ts in sorted(probe_ts):
        proposed = [(uid, ts) for uid in statement["storage"] + [CT_IMAGE_STORAGE]]
        accepted, refused = _negotiate(node.port, [anchor] + proposed)
        if ts in statement["syntaxes"]:
            assert accepted - {anchor} == {(uid, ts) for uid in statement["storage"]}, ts
            assert refused == {(CT_IMAGE_STORAGE, ts): 0x03}, ts
        else:
            assert accepted == {anchor}
            assert refused == {**{(uid, ts): 0x04 for uid in statement["storage"]}, (CT_IMAGE_STORAGE, ts): 0x03}

    probe = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2",
             "1.2.840.10008.1.2.4.50"]
    for uid, stated in statement["other"].items():
        assert set(stated) <= set(probe)
        accepted, refused = _negotiate(node.port, [(uid, ts) for ts in probe])
        assert accepted == {(uid, ts) for ts in stated}, uid
        assert refused == {(uid, ts): 0x04 for ts in probe if ts not in stated}, uid

    # DCMTK as the peer: C-ECHO answered; a stated SR class stored; an unstated one refused
    assert node.echo() == 0
    src = realworld_dir / "sr" / "pydicom__test-SR.dcm"
    assert pydicom.dcmread(src, stop_before_pixels=True).SOPClassUID in statement["storage"]
    ok = node.storescu([src])
    assert ok.returncode == 0, ok.stderr[-2000:]
    ds = pydicom.dcmread(src)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = KEY_OBJECT_SELECTION
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    unstated = tmp_path / "kos.dcm"
    ds.save_as(unstated, enforce_file_format=True)
    res = node.storescu([unstated])
    assert res.returncode != 0
    assert "No Acceptable Presentation Contexts" in res.stdout + res.stderr


def _code(cell: str):
    m = CODE_RE.search(cell)
    return (m.group(1), m.group(2), m.group(3)) if m else None


def test_task_code_table_equals_catalogue():
    from echonode.interpret.prompts import load_catalog

    def code(c):
        return (c.value, c.scheme, c.meaning) if c is not None else None

    rows = {r["task"].strip("`"): r for r in _table("task-codes")}
    catalogue = load_catalog()
    assert set(rows) == set(catalogue)
    for task_id, task in catalogue.items():
        row = rows[task_id]
        assert row["mode"] == task.mode, task_id
        assert _code(row["concept name"]) == code(task.concept), task_id
        assert _code(row["finding site"]) == code(task.site), task_id
        assert _code(row["unit"]) == code(task.unit), task_id
        assert _code(row["private code (finding)"]) == code(task.private_code), task_id
        levels = [(lv.value, code(lv.code)) for lv in task.levels if lv.code is not None]
        stated = CODE_RE.findall(row["value / levels"])
        if levels:
            assert [c for _, c in levels] == [tuple(s) for s in stated], task_id
        elif task.value_code is not None:
            assert [tuple(s) for s in stated] == [code(task.value_code)], task_id
