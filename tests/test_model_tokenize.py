"""Both tokenizers against open_clip and the golden vectors of research/echoclip.md §4."""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch

from echonode.model import tokenize as tk
from echonode.model.tokenize import ClipBPETokenizer, TemplateTokenizer, clean_report_text

open_clip = pytest.importorskip("open_clip")

GOLDEN_BPE = {
    "ECHO DENSITY IN RIGHT VENTRICLE SUGGESTIVE OF CATHETER, PACER LEAD, OR ICD LEAD. ":
        [49406, 13989, 22431, 530, 1155, 1240, 9511, 579, 15033, 563, 539, 7174, 652, 267, 2332, 528, 2784, 267,
         541, 535, 323, 2784, 269, 49407],
    "LV EJECTION FRACTION IS 55%. ": [49406, 11184, 29771, 740, 26788, 533, 276, 276, 12475, 49407],
    "THE LEFT VENTRICULAR EJECTION FRACTION IS ESTIMATED TO BE 55% ":
        [49406, 518, 1823, 1240, 9511, 4927, 29771, 740, 26788, 533, 16665, 531, 655, 276, 276, 260, 49407],
    "ESTIMATED PA SYSTOLIC PRESSURE IS 45MMHG. ":
        [49406, 16665, 2217, 974, 45020, 6083, 533, 275, 276, 1028, 26237, 269, 49407],
    "SEVERE DILATED LEFT VENTRICLE. ": [49406, 6215, 7643, 943, 1823, 1240, 9511, 579, 269, 49407],
}

GOLDEN_TEMPLATE = {
    "SEVERE DILATED LEFT VENTRICLE. ": [907, 661, 884, 908],
    "LV EJECTION FRACTION IS 55%. ": [907, 627, 835, 908],
    "THE LEFT VENTRICULAR EJECTION FRACTION IS ESTIMATED TO BE 55% ": [907, 255, 835, 908],
    "ESTIMATED PA SYSTOLIC PRESSURE IS 45MMHG. ": [907, 458, 825, 908],
    "THE PEAK TRANSAORTIC GRADIENT IS 20.5MMHG.": [907, 464, 800, 892, 908],
    "ESTIMATED PULMONARY ARTERY SYSTOLIC PRESSURE WAS 45 MMHG.": [907, 458, 825, 908],
    "ECHO DENSITY IN RIGHT VENTRICLE SUGGESTIVE OF CATHETER, PACER LEAD, OR ICD LEAD. ": [907, 176, 908],
}

EXAMPLE_REPORT_IDS = [
    907, 261, 464, 800, 887, 469, 792, 887, 669, 804, 66, 830, 881, 788, 697, 882, 634, 371, 884, 627, 800, 581, 882,
    51, 168, 474, 882, 467, 789, 887, 459, 783, 887, 394, 726, 575, 820, 887, 232, 882, 87, 547, 486, 604, 782, 889,
    789, 702, 677, 702, 702, 766, 488, 689, 883, 613, 437, 176, 465, 496, 812, 887, 597, 820, 431, 882, 881, 883,
    686, 336, 908, 0, 0, 0, 0, 0, 0]


@pytest.fixture(scope="module")
def bpe():
    return ClipBPETokenizer()


@pytest.fixture(scope="module")
def template():
    return TemplateTokenizer()


def nonzero(row) -> list[int]:
    return [int(i) for i in row if int(i) != 0]


# ------------------------------------------------------------------ CLIP BPE

@pytest.mark.parametrize("text", list(GOLDEN_BPE))
def test_bpe_golden_ids(bpe, text):
    ids = bpe([text])
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert nonzero(ids[0]) == GOLDEN_BPE[text]
    assert ids[0, len(GOLDEN_BPE[text]):].eq(0).all()


def test_bpe_equals_open_clip_on_every_prompt(bpe, prompt_texts, echoclip_data):
    report = (echoclip_data / "example_report.txt").read_text()
    extra = [report, "", " ", "sévère dilatation ventriculaire gauche", "Ejection fraction ~ 55 %!!",
             "naïve café — “quoted” text", "&amp;lt; html &gt;", "tabs\tand\nnewlines  here", "中文 テキスト",
             "<start_of_text> literal <end_of_text>", "emoji 🫀 heart", "it's we're I'll they'd"]
    texts = prompt_texts + extra
    assert len(prompt_texts) > 600  # regression templates expanded over 0..100
    ours = bpe(texts)
    ref = open_clip.tokenize(texts)
    mismatch = [t for t, a, b in zip(texts, ours, ref) if not torch.equal(a, b)]
    assert not mismatch, mismatch[:3]


def test_bpe_truncation_keeps_eot(bpe, echoclip_data):
    report = (echoclip_data / "example_report.txt").read_text()
    ids = bpe([report])[0]
    assert int(ids[-1]) == tk.EOT_ID and int(ids[0]) == tk.SOT_ID and int((ids == 0).sum()) == 0
    assert torch.equal(ids, open_clip.tokenize([report])[0])


def test_bpe_lower_cases(bpe):
    assert torch.equal(bpe(["SEVERE DILATED LEFT VENTRICLE."]), bpe(["severe dilated left ventricle."]))


def test_bpe_without_ftfy_fallback_matches_on_prompts(bpe, prompt_texts, monkeypatch):
    monkeypatch.setattr(tk, "_fix_text", tk._fallback_fix_text)
    sample = prompt_texts[::7] + ["“curly” ‘quotes’", "ﬁle ＦＵＬＬ width"]
    assert torch.equal(bpe(sample), open_clip.tokenize(sample))


# ------------------------------------------------------------------ template tokenizer

@pytest.mark.parametrize("text", list(GOLDEN_TEMPLATE))
def test_template_golden_vectors(template, text):
    enc = template.encode(text)
    assert len(enc.ids) == 77
    assert nonzero(enc.ids) == GOLDEN_TEMPLATE[text]
    assert enc.dropped_chars == 0


def test_template_prompt_golden_vectors(template, echoclip_data):
    cat = json.loads((echoclip_data / "prompts_used.json").read_text())
    assert [nonzero(template.encode(p).ids) for p in cat["pacemaker"]["label_sources"]] == [[907, 176, 908],
                                                                                            [907, 192, 908]]
    assert [nonzero(template.encode(p).ids) for p in cat["tavr"]["label_sources"]][0] == [907, 261, 908]
    assert [nonzero(template.encode(p).ids) for p in cat["mitraclip"]["label_sources"]] == [
        [907, 168, 908], [907, 169, 908], [907, 173, 908]]
    assert nonzero(template.encode(cat["impella"]["testers"][0]).ids) == [907, 6, 784, 887, 908]


def test_template_example_report(template, echoclip_data):
    report = (echoclip_data / "example_report.txt").read_text()
    enc = template.encode(report)
    assert enc.ids == EXAMPLE_REPORT_IDS
    # the reference loses these silently; we report them
    assert enc.dropped_chars > 100
    assert any("S/P TAVR" in d for d in enc.dropped_text)
    assert any("MID TO APICAL INFERIOR WALL" in d for d in enc.dropped_text)
    batch = template([report, "LV EJECTION FRACTION IS 55%. "])
    assert batch.shape == (2, 77) and batch[0].tolist() == EXAMPLE_REPORT_IDS


def test_template_number_splitting(template):
    ids = nonzero(template.encode("ESTIMATED PA SYSTOLIC PRESSURE IS 150MMHG. ").ids)
    assert ids == [907, 458, 775 + 5 + 15, 775 + 5 + 0, 908]
    ids = nonzero(template.encode("TOTAL WALL MOTION SCORE IS 2.29. ").ids)
    assert ids[2:-1] == [775 + 5 + 2, 775 + 112 + 2, 775 + 5 + 9]


def test_template_unmatched_text_is_reported(template):
    enc = template.encode("moderate pericardial effusion")
    assert nonzero(enc.ids) == [907, 908]
    assert enc.dropped_chars == len("MODERATEPERICARDIALEFFUSION")
    assert enc.dropped_text == ["MODERATE PERICARDIAL EFFUSION"]


def test_template_literal_placeholder_does_not_crash(template):
    enc = template.encode("LV EJECTION FRACTION IS <#>%. ")
    assert nonzero(enc.ids) == [907, 627, template.unk_variable_id, 908]
    enc = template.encode("THERE IS <#> TO MODERATE TRICUSPID REGURGITATION. ")
    assert enc.ids[0] == 907 and template.eos_id in enc.ids


def test_template_truncation_keeps_eos(template):
    enc = template.encode("LV EJECTION FRACTION IS 55%. " * 40)
    assert enc.truncated and len(enc.ids) == 77 and enc.ids[-1] == 908 and 0 not in enc.ids


def test_template_reads_no_files_from_cwd(tmp_path, monkeypatch, echoclip_data):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "template_vocab.txt").write_text("GARBAGE ")
    tok = TemplateTokenizer(echoclip_data / "template_vocab.txt")
    assert nonzero(tok.encode("LV EJECTION FRACTION IS 55%. ").ids) == [907, 627, 835, 908]
    assert nonzero(TemplateTokenizer().encode("LV EJECTION FRACTION IS 55%. ").ids) == [907, 627, 835, 908]


def test_template_vocab_sizes(template):
    assert template.n_template == 775 and template.bos_id == 907 and template.eos_id == 908
    assert len(tk.VARIABLE_VOCAB) == 132 and tk.VARIABLE_VOCAB[106] == "\u2021"


def test_clean_report_text_rules():
    assert clean_report_text("the lv was mildly dilated") == "THE LV IS MILD DILATED "
    assert clean_report_text("LV EJECTION FRACTION IS 55 %") == "LV EJECTION FRACTION IS 55%. "
    assert clean_report_text("SEEN ON 01/02/2020 CRLF OK") == "SEEN ON OK "
    assert clean_report_text("HEART FAILURE, UNSPECIFIED") == "HEART FAILURE, UNSPECIFIED. "
    assert clean_report_text("x") == "x"
    assert clean_report_text("VALUE 2.5CM.. END") == "VALUE 2.5CM. END "


def test_missing_vocab_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="template vocabulary not found"):
        TemplateTokenizer(tmp_path / "nope.txt")


def test_vendored_vocab_is_the_published_file(echoclip_data):
    assert tk.TEMPLATE_VOCAB_PATH.read_bytes() == (echoclip_data / "template_vocab.txt").read_bytes()
    assert os.path.getsize(tk.BPE_MERGES_PATH) > 1_000_000


@functools.lru_cache(maxsize=1)
def _hf_tokenizers(blank_path: str, phrases: tuple):
    from tokenizers import Tokenizer

    phr = Tokenizer.from_file(blank_path)
    phr.add_tokens(list(phrases))
    var = Tokenizer.from_file(blank_path)
    var.add_tokens(list(tk.VARIABLE_VOCAB[5:]))
    return phr, var


def _hf_reference_template(text: str, phrases: list[str], blank_path) -> list[int]:
    """The reference's matching done by the ``tokenizers`` library itself (added tokens over a
    blank WordPiece), per research/echoclip.md §4.3 steps 4–7; cleaning and extraction shared."""
    phr, var = _hf_tokenizers(str(blank_path), tuple(phrases))
    cleaned = clean_report_text(text)
    variables = [m.group(0) for m in tk._VARIABLE.finditer(cleaned)]
    templ = tk._VARIABLE.sub("<#>", cleaned)
    for old, new in tk._WHOLE_PHRASE_FIXES:
        templ = templ.replace(old, new)
    enc = phr.encode(templ)
    keep = []
    for i, (a, b) in zip(enc.ids, enc.offsets):
        keep.extend([i != 0] * templ[a:b].count("<#>"))
    variables = [v for v, k in zip(variables, keep) if k]
    out = []
    for i in enc.ids:
        if i == 0:
            continue
        out.append(i)
        n = phrases[i - 5].count("<#>")
        if n:
            vals, variables = variables[:n], variables[n:]
            out.extend(j + 775 for j in var.encode("\u2021".join(vals)).ids)
    ids = [907] + out + [908]
    if len(ids) > 77:
        ids = ids[:77]
        ids[-1] = max(ids)
    return ids + [0] * (77 - len(ids))


def test_template_matching_equals_tokenizers_library(template, echoclip_data):
    import random

    blank = echoclip_data / "blank_wordpiece.tokenizer"
    phrases = (echoclip_data / "template_vocab.txt").read_text().split("\n")
    rng = random.Random(7)
    fills = ["55", "20.0", "2.29", "150", "07", "0.5", "100", "MILD", "MODERATE", "SEVERE", "MILD/MODERATE",
             "VERY SEVERE", "3", "45"]
    junk = ["S/P TAVR.", "NOTED.", "xyz", "WAS", "  ", "01/02/2020", "I50.9", "[SEE ABOVE]", "AND/OR", "mildly"]
    texts = []
    for _ in range(150):
        parts = []
        for _ in range(rng.randint(1, 9)):
            p = rng.choice(phrases)
            while "<#>" in p:
                p = p.replace("<#>", rng.choice(fills), 1)
            if rng.random() < 0.3:
                p = p.rstrip(". ")
            if rng.random() < 0.2:
                p = p.lower()
            parts.append(p)
            if rng.random() < 0.3:
                parts.append(rng.choice(junk))
        texts.append(" ".join(parts))
    for t in texts:
        assert template.encode(t).ids == _hf_reference_template(t, phrases, blank), t
