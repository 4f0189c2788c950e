"""The two EchoCLIP tokenizers.

* :class:`ClipBPETokenizer` — OpenAI CLIP byte-level BPE (EchoCLIP). Built on the
  ``tokenizers`` library from the CLIP merges file vendored in ``echonode/data``
  (``bpe_simple_vocab_16e6.txt.gz``, MIT, as shipped by open_clip). Ids are identical to
  ``open_clip.tokenize``: clean text, lower-case, split with CLIP's regex, byte-level BPE,
  ``[49406] + ids + [49407]``, zero padding to 77, truncation keeping EOT last.
  Text cleaning uses ``ftfy.fix_text`` when ftfy is installed (as open_clip does);
  without it a smaller fixer runs (NFC, curly quotes, ligatures, full-width ASCII).
  Both give the same result on ASCII text, which covers every EchoCLIP prompt.

* :class:`TemplateTokenizer` — EchoCLIP-R's template tokenizer (research/echoclip.md
  §4.3): report-text cleaning, extraction of numbers and severity words, leftmost-longest
  matching of the template phrases, the variable vocabulary, BOS 907 / EOS 908, 77 ids.
  Pure Python, reads only the vocabulary file it is given (never the working directory).
  Differences from the reference, both on inputs where it fails: a literal ``<#>`` in
  the input is a missing value (encoded as the ``[UNK]`` variable) instead of an
  IndexError; and text the vocabulary cannot represent is reported
  (:attr:`TemplateEncoding.dropped_chars`, ``dropped_text``) instead of vanishing silently.
"""

from __future__ import annotations

import functools
import gzip
import html
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

from echonode.model.configs import DATA_DIR  # noqa: E402
BPE_MERGES_PATH = DATA_DIR / "bpe_simple_vocab_16e6.txt.gz"
TEMPLATE_VOCAB_PATH = DATA_DIR / "template_vocab.txt"

CONTEXT_LENGTH = 77
SOT_ID = 49406
EOT_ID = 49407

# --------------------------------------------------------------------------- CLIP BPE

_CLIP_SPLIT = (r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
                         "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"'})
_LIGATURES = str.maketrans({"\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi",
                            "\ufb04": "ffl", "\ufb05": "st", "\ufb06": "st", "\u0132": "IJ", "\u0133": "ij"})


def _fallback_fix_text(text: str) -> str:
    """A small subset of ftfy.fix_text for when ftfy is not installed."""
    text = unicodedata.normalize("NFC", text)
    text = text.translate(_QUOTES).translate(_LIGATURES)
    # full-width ASCII forms → ASCII (ftfy's fix_character_width)
    text = "".join(chr(ord(c) - 0xFEE0) if 0xFF01 <= ord(c) <= 0xFF5E else ("\u0020" if c == "\u3000" else c)
                   for c in text)
    return "".join(c for c in text if c in "\t\n\r" or unicodedata.category(c) != "Cc")


try:  # ftfy is what open_clip uses; optional here
    from ftfy import fix_text as _fix_text
    FTFY = True
except ImportError:  # pragma: no cover - depends on the environment
    _fix_text = _fallback_fix_text
    FTFY = False


def clip_clean(text: str) -> str:
    """open_clip's cleaning: fix text, unescape HTML twice, collapse whitespace, lower-case."""
    text = _fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte → printable unicode mapping."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@functools.lru_cache(maxsize=4)
def _build_bpe(merges_path: str):
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers

    with gzip.open(merges_path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    if len(merges) != 48894 or any(len(m) != 2 for m in merges):
        raise ValueError(f"{merges_path}: not the CLIP BPE merges file (expected 48,894 merges)")
    base = list(_bytes_to_unicode().values())
    vocab_list = base + [v + "</w>" for v in base] + ["".join(m) for m in merges]
    vocab_list += ["<start_of_text>", "<end_of_text>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    if len(vocab) != 49408:
        raise ValueError(f"{merges_path}: vocabulary has {len(vocab)} entries, expected 49,408")
    bpe = models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", continuing_subword_prefix="",
                     fuse_unk=False, unk_token=None)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.add_special_tokens([AddedToken("<start_of_text>", normalized=False, special=True),
                            AddedToken("<end_of_text>", normalized=False, special=True)])
    return tok


class ClipBPETokenizer:
    """``open_clip.tokenize`` on the ``tokenizers`` library."""

    kind = "clip-bpe"

    def __init__(self, merges_path: str | Path | None = None, context_length: int = CONTEXT_LENGTH):
        self.merges_path = Path(merges_path) if merges_path else BPE_MERGES_PATH
        self.context_length = context_length
        self._tok = _build_bpe(str(self.merges_path))
        self.sot_id, self.eot_id = SOT_ID, EOT_ID
        self.vocab_size = 49408

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without SOT/EOT, padding or truncation."""
        cleaned = clip_clean(text)
        if not cleaned:
            return []
        return self._tok.encode(cleaned, add_special_tokens=False).ids

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        if not texts:
            return out
        cleaned = [clip_clean(t) for t in texts]
        encs = self._tok.encode_batch(cleaned, add_special_tokens=False)
        for i, enc in enumerate(encs):
            ids = [self.sot_id] + list(enc.ids) + [self.eot_id]
            if len(ids) > self.context_length:
                ids = ids[:self.context_length]
                ids[-1] = self.eot_id
            out[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


# --------------------------------------------------------------------------- template tokenizer

_ADD_PERIOD_PHRASES = (
    "THE PEAK TRANSAORTIC GRADIENT IS <#>MMHG",
    "THE MEAN TRANSAORTIC GRADIENT IS <#>MMHG",
    "LV EJECTION FRACTION IS <#>%",
    "ESTIMATED PA PRESSURE IS <#>MMHG",
    "RESTING SEGMENTAL WALL MOTION ANALYSIS",
    "THE IVC DIAMETER IS <#>MM",
    "EST RV/RA PRESSURE GRADIENT IS <#>MMHG",
    "ESTIMATED PEAK RVSP IS <#>MMHG",
    "HEART FAILURE, UNSPECIFIED",
    "CHEST PAIN, UNSPECIFIED",
    "SINUS OF VALSALVA: <#>CM",
    "THE PEAK TRANSMITRAL GRADIENT IS <#>MMHG",
    "THE MEAN TRANSMITRAL GRADIENT IS <#>MMHG",
    "ASCENDING AORTA <#>CM",
    "ESTIMATED PA SYSTOLIC PRESSURE IS <#>MMHG",
    "ICD_CODE SHORTNESS BREATH",
    "ICD_CODE ABNORMAL ELECTROCARDIOGRAM ECG EKG",
    "SHORTNESS BREATH",
    "ABNORMAL ELECTROCARDIOGRAM ECG EKG",
    "THE LEFT ATRIAL APPENDAGE IS NORMAL IN APPEARANCE WITH NO EVIDENCE OF THROMBUS",
)
_NUMBER = r"\d+\.?\d*"
_ADD_PERIOD = re.compile("(" + "|".join(
    "(?:" + re.escape(p).replace(re.escape("<#>"), "(?:" + _NUMBER + ")") + r")(?!\.)"
    for p in _ADD_PERIOD_PHRASES) + ")")

_CLEAN_STEPS: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"\^|CRLF|‡"), ""),
    (re.compile(r"(?<=\D)\.|\.(?=\D)"), ". "),
    (re.compile(r"[\[\]]"), ""),
    (re.compile(r"\bWAS\b"), "IS"),
    (re.compile(r"\bWERE\b"), "ARE"),
    (re.compile(r"\bAND/OR\b"), "AND"),
    (re.compile(r"NORMALLY"), "NORMAL"),
    (re.compile(r"MILDLY"), "MILD"),
    (re.compile(r"MODERATELY"), "MODERATE"),
    (re.compile(r"SEVERELY"), "SEVERE"),
    (re.compile(r"PULMONARY ARTERY"), "PA"),
    (re.compile(r"\d{2}/\d{2}/\d{4}"), ""),
    (re.compile(r"\d{2}\.\d{2}\.\d{4}"), ""),
    (re.compile(r"[A-Z](\d+\.\d*\b)"), ""),
    (re.compile(r"\s+(MMHG|MM|CM|%)"), r"\1"),
    (re.compile(r"\s\."), "."),
    (re.compile(r"\s+"), " "),
    (re.compile(r"\s\+\s"), "+"),
    (re.compile(r"\+CVPMMHG"), "MMHG"),
)
_MULTI_PERIOD = re.compile(r"\.+")


def clean_report_text(text: str) -> str:
    """EchoCLIP-R report cleaning (research/echoclip.md §4.3 step 1)."""
    if len(text) <= 1:
        return text
    text = text.upper().strip().replace("`", "'")
    for pattern, repl in _CLEAN_STEPS:
        text = pattern.sub(repl, text)
    text = text.strip() + " "
    text = _ADD_PERIOD.sub(r"\1.", text)
    return _MULTI_PERIOD.sub(".", text)


PLACEHOLDER = "<#>"
# A literal placeholder, a number, or a severity word (not preceded by a letter).
_VARIABLE = re.compile(r"(<#>)|(" + _NUMBER + r")|((?<![A-Za-z])(?:MODERATE/SEVERE|MILD/MODERATE|MILD|MODERATE"
                       r"|SEVERE|VERY SEVERE))")
_WHOLE_PHRASE_FIXES = (
    ("THE INFERIOR VENA CAVA IS NORMAL IN SIZE AND SHOWS A NORMAL RESPIRATORY COLLAPSE, CONSISTENT WITH NORMAL "
     "RIGHT ATRIAL PRESSURE (<#>MMHG).",
     "THE INFERIOR VENA CAVA SHOWS A NORMAL RESPIRATORY COLLAPSE CONSISTENT WITH NORMAL RIGHT ATRIAL PRESSURE "
     "(<#>MMHG)."),
    ("RESTING SEGMENTAL WALL MOTION ANALYSIS.:", "RESTING SEGMENTAL WALL MOTION ANALYSIS."),
)
SEPARATOR = "\u2021"  # ‡ joins the values of a multi-variable phrase
_SPECIALS = ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")
VARIABLE_VOCAB: tuple[str, ...] = _SPECIALS + tuple(str(i) for i in range(101)) + (SEPARATOR,) + (
    "MILD", "MODERATE", "SEVERE", "MILD/MODERATE", "MODERATE/SEVERE") + tuple(f".{i}" for i in range(10)) + tuple(
    f"0{i}" for i in range(10))


class _LongestMatcher:
    """Leftmost-longest exact matching of a fixed phrase set (HF added-token semantics)."""

    def __init__(self, phrases: Iterable[str]):
        uniq = sorted(set(p for p in phrases if p), key=len, reverse=True)
        self._re = re.compile("|".join(re.escape(p) for p in uniq))

    def segments(self, text: str) -> list[tuple[bool, str]]:
        """[(matched, text), ...] covering ``text``; unmatched gaps are single segments."""
        out, pos = [], 0
        for m in self._re.finditer(text):
            if m.start() > pos:
                out.append((False, text[pos:m.start()]))
            out.append((True, m.group()))
            pos = m.end()
        if pos < len(text):
            out.append((False, text[pos:]))
        return out


@dataclass(frozen=True)
class TemplateEncoding:
    ids: list[int]                   # 77 ids: BOS, phrase/variable ids, EOS, zero padding
    dropped_chars: int               # non-space characters the vocabulary could not represent
    dropped_text: list[str] = field(default_factory=list)  # those pieces of (cleaned) text
    truncated: bool = False          # longer than the context; cut, EOS kept last


class TemplateTokenizer:
    """EchoCLIP-R template tokenizer over a template vocabulary file (one phrase per line)."""

    kind = "template"

    def __init__(self, vocab_path: str | Path | None = None, context_length: int = CONTEXT_LENGTH):
        self.vocab_path = Path(vocab_path) if vocab_path else TEMPLATE_VOCAB_PATH
        try:
            text = self.vocab_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"template vocabulary not found: {self.vocab_path}") from None
        phrases = text.split("\n")
        if phrases and phrases[-1] == "":  # tolerate a trailing newline
            phrases.pop()
        if not phrases or any(not p for p in phrases):
            raise ValueError(f"{self.vocab_path}: empty template vocabulary or empty line")
        self.context_length = context_length
        # ids as the HF tokenizer assigns them: specials 0-4, then phrases in file order
        # (a repeated phrase keeps its first id, as an added token would)
        self.phrase_ids: dict[str, int] = {}
        for p in phrases:
            if p not in self.phrase_ids and p not in _SPECIALS:
                self.phrase_ids[p] = len(_SPECIALS) + len(self.phrase_ids)
        self.phrases = {i: p for p, i in self.phrase_ids.items()}
        self.n_template = len(_SPECIALS) + len(self.phrase_ids)  # 775 for the published file
        self.variable_ids = {v: i for i, v in enumerate(VARIABLE_VOCAB)}
        self.unk_variable_id = self.n_template + 0
        self.bos_id = self.n_template + len(VARIABLE_VOCAB)     # 907
        self.eos_id = self.bos_id + 1                            # 908
        self.vocab_size = self.eos_id + 1
        self._phrases = _LongestMatcher(self.phrase_ids)
        self._variables = _LongestMatcher(VARIABLE_VOCAB[len(_SPECIALS):])

    def _variable_ids(self, values: list[str | None]) -> list[int]:
        if any(v is None for v in values):
            # literal <#> in the input: the value is missing → one [UNK] variable per placeholder
            out: list[int] = []
            for j, v in enumerate(values):
                if j:
                    out.append(self.n_template + self.variable_ids[SEPARATOR])
                out.extend([self.unk_variable_id] if v is None else self._variable_ids([v]))
            return out
        joined = SEPARATOR.join(values)  # type: ignore[arg-type]
        ids = []
        for matched, piece in self._variables.segments(joined):
            ids.append(self.n_template + (self.variable_ids[piece] if matched else 0))
        return ids

    def encode(self, text: str) -> TemplateEncoding:
        cleaned = clean_report_text(text)
        values: list[str | None] = []

        def take(m: re.Match) -> str:
            values.append(None if m.group(1) else m.group(0))
            return PLACEHOLDER

        templ = _VARIABLE.sub(take, cleaned)
        for old, new in _WHOLE_PHRASE_FIXES:
            templ = templ.replace(old, new)
        body: list[int] = []
        dropped: list[str] = []
        n_dropped = 0
        vi = 0
        for matched, piece in self._phrases.segments(templ):
            n_var = piece.count(PLACEHOLDER)
            vals = values[vi:vi + n_var]
            vi += n_var
            if matched:
                body.append(self.phrase_ids[piece])
                if n_var:
                    body.extend(self._variable_ids(vals))
            else:
                # put the dropped values back for the report
                restored = re.sub(re.escape(PLACEHOLDER), lambda _m, it=iter(vals): next(it) or PLACEHOLDER, piece)
                n = sum(1 for c in restored if not c.isspace())
                if n:
                    n_dropped += n
                    dropped.append(restored.strip())
        ids = [self.bos_id] + body + [self.eos_id]
        truncated = len(ids) > self.context_length
        if truncated:
            ids = ids[:self.context_length]
            ids[-1] = self.eos_id
        ids = ids + [0] * (self.context_length - len(ids))
        return TemplateEncoding(ids=ids, dropped_chars=n_dropped, dropped_text=dropped, truncated=truncated)

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            return torch.zeros(0, self.context_length, dtype=torch.long)
        return torch.tensor([self.encode(t).ids for t in texts], dtype=torch.long)

    def decode(self, ids: Iterable[int]) -> str:
        """Readable form for debugging: ``[phrase]`` per phrase, ``<value>`` per variable."""
        inv_var = {self.n_template + i: v for i, v in enumerate(VARIABLE_VOCAB)}
        parts = []
        for i in ids:
            i = int(i)
            if i == 0:
                continue
            if i == self.bos_id:
                parts.append("[BOS]")
            elif i == self.eos_id:
                parts.append("[EOS]")
            elif i in self.phrases:
                parts.append(f"[{self.phrases[i]}]")
            elif i in inv_var:
                parts.append(f"<{inv_var[i]}>")
            else:
                parts.append(f"<?{i}>")
        return " ".join(parts)


def get_tokenizer(kind: str, template_vocab: str | Path | None = None):
    """``"clip-bpe"`` → :class:`ClipBPETokenizer`; ``"template"`` → :class:`TemplateTokenizer`."""
    if kind == "clip-bpe":
        return ClipBPETokenizer()
    if kind == "template":
        return TemplateTokenizer(template_vocab)
    raise ValueError(f"unknown tokenizer kind {kind!r} (expected 'clip-bpe' or 'template')")
