"""The PS3.15 A.5.1.1 audit message schema and a validator (lxml, RELAX NG)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

RNG = Path(__file__).resolve().parent / "audit-message.rng"
RNC = Path(__file__).resolve().parent / "audit-message.rnc"


@lru_cache(maxsize=1)
def _schema():
    from lxml import etree
    return etree.RelaxNG(etree.parse(str(RNG)))


def errors(xml: str | bytes) -> list[str]:
    """Validation errors of one audit message (empty when it conforms)."""
    from lxml import etree
    if isinstance(xml, str):
        xml = xml.encode("utf-8")
    try:
        doc = etree.fromstring(xml)
    except etree.XMLSyntaxError as exc:
        return [f"not XML: {exc}"]
    schema = _schema()
    if schema.validate(doc):
        return []
    return [f"line {e.line}: {e.message}" for e in schema.error_log]
