"""The training objective's parts, against direct implementations.

* ``clip_loss`` without positives is open_clip's symmetric InfoNCE; with report positives its
  text→image half spreads the target over every image a snippet describes and its
  image→text half leaves the other true texts out of the softmax;
* ``report_positives`` marks (image, snippet) pairs from report text only;
* ``mean_pairwise_cos``, the collapse diagnostic logged with each validation;
* ``make_optimizer``'s fused AdamW makes the same updates as torch's reference AdamW.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from train.data import TextSampler  # noqa: E402
from train.loop import clip_loss, contrastive_loss, make_optimizer, mean_pairwise_cos, report_positives  # noqa: E402


def _feats(n=5, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1))


def test_clip_loss_plain_is_symmetric_infonce():
    img, txt = _feats()
    s = torch.tensor(10.0)
    logits = (s * img @ txt.T).numpy().astype(np.float64)

    def ce(rows):
        return float(np.mean([-(r[i] - np.log(np.exp(r).sum())) for i, r in enumerate(rows)]))
    want = (ce(logits) + ce(logits.T)) / 2
    assert float(clip_loss(img, txt, s)) == pytest.approx(want, rel=1e-5)
    # only the diagonal as positives: identical to the plain loss
    assert float(clip_loss(img, txt, s, positives=torch.eye(5, dtype=torch.bool))) == pytest.approx(want, rel=1e-5)


def test_clip_loss_with_report_positives():
    img, txt = _feats(4, 6, seed=3)
    s = torch.tensor(7.0)
    pos = torch.eye(4, dtype=torch.bool)
    pos[2, 0] = True   # snippet 0 also describes image 2
    pos[3, 0] = True   # ... and image 3
    pos[1, 3] = True   # snippet 3 also describes image 1
    L = (s * img @ txt.T).numpy().astype(np.float64)
    # image -> text: own text is the target; other true texts leave the softmax
    i2t = []
    for i in range(4):
        keep = [j for j in range(4) if j == i or not pos[i, j]]
        i2t.append(-(L[i, i] - np.log(np.exp(L[i, keep]).sum())))
    # text -> image: uniform target over every image the text describes
    t2i = []
    for j in range(4):
        targets = [i for i in range(4) if pos[i, j]]
        lse = np.log(np.exp(L[:, j]).sum())
        t2i.append(-np.mean([L[i, j] - lse for i in targets]))
    want = (np.mean(i2t) + np.mean(t2i)) / 2
    got = float(clip_loss(img, txt, s, positives=pos))
    assert got == pytest.approx(want, rel=1e-5)
    assert got != pytest.approx(float(clip_loss(img, txt, s)), rel=1e-3)


def test_true_pairs_are_never_pushed_apart():
    """With report positives a text is pulled towards the images it describes as a whole
    (the gradient summed over its true images is never positive), and each true pair
    is pushed apart less than plain InfoNCE pushes it (which treats it as a negative)."""
    g = torch.Generator().manual_seed(5)
    pos = torch.eye(6, dtype=torch.bool)
    pos[:, 0] = True                 # text 0 ("NORMAL RIGHT VENTRICULAR SIZE.") describes every image
    pos[4, 2] = True
    logits = torch.randn(6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    contrastive_loss(logits, pos).backward()
    grad = logits.grad
    assert ((grad * pos).sum(dim=0) <= 1e-12).all(), grad
    assert (grad[~pos] >= -1e-12).all()                      # negatives are only ever pushed apart
    plain = logits.detach().clone().requires_grad_(True)
    contrastive_loss(plain).backward()
    off = pos & ~torch.eye(6, dtype=torch.bool)
    assert (plain.grad[off] > 0).all()                       # plain InfoNCE: true pairs pushed apart
    assert (grad[off] < plain.grad[off]).all()


def test_report_positives_from_report_text():
    reports = ["A. B. C. ", "A. C. ", "B. D. "]
    tok = _FakeTok()
    s = TextSampler(tok, snippets=True, full_report_prob=0.0)
    sets = [s.sentence_set(r) for r in reports]
    said = [frozenset({"A."}), frozenset({"A.", "C."}), None]   # snippet 2 is a full report
    pos = report_positives(sets, said)
    assert pos.tolist() == [[True, True, False],
                            [True, True, False],
                            [False, False, True]]


class _FakeTok:
    kind = "clip-bpe"
    context_length = 16
    sot_id, eot_id = 1, 2

    def encode(self, text):
        return [10 + ord(c) % 50 for c in text.strip()]

    def __call__(self, texts):
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [1] + self.encode(t)[:self.context_length - 2] + [2]
            out[i, :len(ids)] = torch.tensor(ids)
        return out


def test_sampler_snippet_sentences_match_its_tokens():
    tok = _FakeTok()
    s = TextSampler(tok, snippets=True, full_report_prob=0.0, keep=(0.3, 0.6))
    report = "AB. CD. EF. "
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids, said = s.sample_with_sentences(report, rng)
        assert said and said <= s.sentence_set(report)
        want = [1] + [t for x in ("AB.", "CD.", "EF.") if x in said for t in tok.encode(x + " ")] + [2]
        assert ids[:len(want)].tolist() == want and not ids[len(want):].any()
    with pytest.raises(ValueError):
        TextSampler(tok, keep=(0.5, 0.2))


def test_mean_pairwise_cos():
    assert mean_pairwise_cos(torch.ones(4, 3)) == pytest.approx(1.0)
    assert mean_pairwise_cos(torch.eye(3)) == pytest.approx(0.0)
    assert mean_pairwise_cos(torch.tensor([[1.0, 0.0], [-2.0, 0.0]])) == pytest.approx(-1.0)


def test_fused_optimizer_matches_reference_adamw():
    g = torch.Generator().manual_seed(3)
    w0 = [torch.randn(7, 5, generator=g), torch.randn(5, generator=g)]
    grads = [[torch.randn_like(w) for w in w0] for _ in range(4)]

    def run(make):
        ps = [torch.nn.Parameter(w.clone()) for w in w0]
        opt = make([{"params": [ps[0]], "weight_decay": 0.1}, {"params": [ps[1]], "weight_decay": 0.0}])
        for gs in grads:
            for p, gr in zip(ps, gs):
                p.grad = gr.clone()
            opt.step()
        return ps, opt

    ours, opt = run(lambda groups: make_optimizer(groups, lr=1e-2))
    ref, _ = run(lambda groups: torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.98), eps=1e-6))
    for a, b, w in zip(ours, ref, w0):
        assert not torch.equal(a, w)  # it moved
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6
