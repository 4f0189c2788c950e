"""DICOM UID validation (PS3.5 §9.1) before a UID is used in a file name or a path.

A UID is one or more numeric components separated by ``.``, at most 64 characters,
with no leading zero in a component unless the component is exactly ``0``. Anything
else (``..``, ``/``, spaces, letters, trailing NUL/space padding that survived
decoding) is refused, so a hostile or broken sender can never steer a path.

Real scanners do send UIDs with a leading zero in a component (one of the real-world
test files has ``...768994.0104484``). Such a UID is still path-safe, so the receive
path uses ``strict=False`` (digits and dots only, no empty component, ≤ 64 chars) and
logs it as non-conformant; ``strict=True`` applies the full PS3.5 rule.
"""

from __future__ import annotations

import hashlib
import re

__all__ = ["UIDError", "is_valid_uid", "check_uid", "derived_uid"]

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_LENIENT_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MAX_UID_LEN = 64


class UIDError(ValueError):
    """A UID is missing or not a valid DICOM UID."""


def is_valid_uid(value: object, strict: bool = True) -> bool:
    """True when ``value`` is a str that is a valid DICOM UID (PS3.5 §9.1; see module doc for ``strict``)."""
    rx = _UID_RE if strict else _LENIENT_RE
    return isinstance(value, str) and 0 < len(value) <= MAX_UID_LEN and rx.match(value) is not None


def check_uid(value: object, name: str, strict: bool = True) -> str:
    """Return ``value`` if it is a valid UID, else raise :class:`UIDError` naming the attribute."""
    if value is None or value == "":
        raise UIDError(f"{name} is missing")
    if not isinstance(value, str):
        value = str(value)
    if len(value) > MAX_UID_LEN:
        raise UIDError(f"{name} is longer than {MAX_UID_LEN} characters")
    if not (_UID_RE if strict else _LENIENT_RE).match(value):
        # never echo the raw value: it may be hostile; show a safe repr, truncated
        raise UIDError(f"{name} is not a valid UID: {value[:64]!r}")
    return value


def derived_uid(*parts: object) -> str:
    """A deterministic UID derived from ``parts``: ``2.25.<first 128 bits of sha256("p1|p2|…")>``
    (PS3.5 §B.2: a UUID-form UID needs no registered root). At most 44 characters.
    The same parts always give the same UID, which is what makes re-runs idempotent."""
    key = "|".join(str(p) for p in parts)
    return "2.25." + str(int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:16], "big"))
