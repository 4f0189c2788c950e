"""Deterministic UIDs for the objects echonode writes back to the PACS.

A re-run of the same model (same weights checksum, same echonode version) on the same
study must produce the *same* SOP Instance UIDs, so a PACS that receives the objects a
second time sees the same instances (it replaces them, or ignores the duplicate)
instead of accumulating copies. A new model or a new echonode version gives new UIDs:
a new result, next to the old one.

UIDs use the ``2.25.<decimal integer>`` form of PS3.5 §B.2 (a UUID-derived UID
needs no registered root). The integer is the first 128 bits of
``sha256("echonode-result|<study>|<weights sha256>|<version>|<kind>|<index>[|v<study version>]")``,
so it is at most 39 digits and the UID at most 44 characters (limit: 64).

The study version (it grows when an instance arrives after the study was analysed)
enters the UIDs of the objects (SR, page, overlays) but not the tracking UIDs of the
SR's measurement groups: those name the same finding across versions.
"""

from __future__ import annotations

from echonode.dicom.uids import check_uid, derived_uid

__all__ = ["result_uid", "object_uid", "KINDS"]

#: kinds used by echonode (free-form strings are allowed; these are the conventional ones)
KINDS = (
    "sr",             # the SR document's SOP Instance UID
    "sr-series",      # the SR series
    "sc",             # a PromptCAM overlay instance (index = PromptCam position)
    "sc-series",      # the overlay series
    "tracking",       # a measurement group's tracking UID (index = group number)
    "device",         # the device observer UID (study independent part is kept anyway)
)


def result_uid(study_uid: str, weights_sha256: str, version: str, kind: str, index: int = 0,
               study_version: int = 0) -> str:
    """The deterministic UID of result object ``kind``/``index`` for ``study_uid``.

    ``study_uid`` must be a valid DICOM UID (checked). ``weights_sha256`` is the hex
    checksum of the model weights and ``version`` the echonode version; both enter
    the hash unchanged, so any change in either yields a different UID.
    """
    check_uid(study_uid, "StudyInstanceUID", strict=False)  # as received (leading zeros happen)
    if not weights_sha256:
        raise ValueError("result_uid: weights_sha256 is empty")
    if not version:
        raise ValueError("result_uid: version is empty")
    if not kind or "|" in kind:
        raise ValueError(f"result_uid: invalid kind {kind!r}")
    if int(index) < 0:
        raise ValueError(f"result_uid: index must be >= 0, got {index}")
    if int(study_version) < 0:
        raise ValueError(f"result_uid: study_version must be >= 0, got {study_version}")
    parts = [study_uid, weights_sha256.lower(), version, kind, int(index)]
    if study_version:   # 0: no study version (offline analysis) -> the unversioned form
        parts.append(f"v{int(study_version)}")
    uid = derived_uid("echonode-result", *parts)
    return check_uid(uid, "result UID")


def object_uid(interp, kind: str, index: int = 0) -> str:
    """The UID of result object ``kind``/``index`` of an Interpretation: its study, model and
    study version. Each study version gets objects of its own (a PACS that keeps the
    first copy of a SOP Instance UID still receives the current result); the same
    version analysed again gets the same UIDs."""
    m = interp.model
    return result_uid(interp.study_instance_uid, m.weights_sha256, m.echonode_version, kind, index,
                      study_version=int(getattr(interp, "study_version", 0) or 0))
