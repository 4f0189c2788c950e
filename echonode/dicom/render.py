"""Text drawing for the pixels echonode burns into images (overlays, key-results page).

One font: DejaVu Sans from the Debian package ``fonts-dejavu-core``
(``/usr/share/fonts/truetype/dejavu``), drawn by Pillow's FreeType renderer. echonode
ships no font file. When DejaVu is not installed, :func:`font` falls back to Pillow's
built-in scalable font (Pillow >= 10.1, Latin only) and logs one warning naming the
package to install; a Pillow without FreeType raises :class:`FontError`, because the
bitmap default font cannot be drawn at a legible size.

Text is wrapped by measured pixel width (:func:`wrap`), never clipped: callers size
their canvas from the wrapped line count.
"""

from __future__ import annotations

import logging
from functools import lru_cache

log = logging.getLogger(__name__)

__all__ = ["BANNER_BG", "BANNER_FG", "FontError", "FONT_DIRS", "font", "font_is_dejavu", "wrap", "ascii_safe"]

FONT_DIRS = (
    "/usr/share/fonts/truetype/dejavu",   # Debian / Ubuntu fonts-dejavu-core
    "/usr/share/fonts/dejavu",            # Fedora / Alpine
    "/usr/share/fonts/TTF",               # Arch
)
_FILES = {False: "DejaVuSans.ttf", True: "DejaVuSans-Bold.ttf"}

#: the DEMO banner: black on safety yellow (ISO 3864 warning colours), readable on any
#: monitor and by OCR, unlike light text on a dark band
BANNER_BG = (255, 200, 0)
BANNER_FG = (0, 0, 0)


class FontError(RuntimeError):
    """No usable font: install the Debian package fonts-dejavu-core."""


_warned = False


@lru_cache(maxsize=64)
def _load(size: int, bold: bool):
    from PIL import ImageFont

    for d in FONT_DIRS:
        try:
            return ImageFont.truetype(f"{d}/{_FILES[bold]}", size), True
        except OSError:
            continue
    global _warned
    if not _warned:
        log.warning("DejaVu Sans not found in %s: install fonts-dejavu-core; using Pillow's built-in font",
                    ", ".join(FONT_DIRS))
        _warned = True
    try:
        return ImageFont.load_default(size=size), False
    except (TypeError, OSError, ImportError) as exc:
        raise FontError("no TrueType font: install the Debian package fonts-dejavu-core "
                        f"(DejaVu Sans in {FONT_DIRS[0]}); Pillow cannot draw legible text without it") from exc


def font(size: int, bold: bool = False):
    """DejaVu Sans (``bold``: DejaVu Sans Bold) at ``size`` pixels."""
    return _load(int(size), bool(bold))[0]


def font_is_dejavu() -> bool:
    return _load(12, False)[1]


def ascii_safe(text: str) -> str:
    """Text for the fallback font, which lacks the em dash and a few symbols."""
    if font_is_dejavu():
        return text
    return text.replace("\u2014", "-").replace("\u2013", "-").replace("\u2265", ">=").replace("\u2264", "<=")


def wrap(text: str, fnt, width: int) -> list[str]:
    """``text`` broken into lines no wider than ``width`` pixels in ``fnt`` (words kept
    whole where they fit; a word wider than a line is split between characters)."""
    text = ascii_safe(text)
    lines: list[str] = []
    for para in text.split("\n"):
        line = ""
        for word in para.split():
            cand = f"{line} {word}" if line else word
            if fnt.getlength(cand) <= width:
                line = cand
                continue
            if line:
                lines.append(line)
                line = ""
            while fnt.getlength(word) > width and len(word) > 1:
                cut = len(word) - 1
                while cut > 1 and fnt.getlength(word[:cut]) > width:
                    cut -= 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines
