"""``NegCLIPLoss`` and ``TripletCLIPLoss`` against their authors' formulas written out in plain torch.

- NegCLIP as the authors' training fork computes it (``vinid/neg_clip``: texts ``= [captions; hard
  captions]``, cross-entropy of ``logits_per_image`` and of the caption rows of ``logits_per_text``),
  including the README's batch with hard-negative images appended; values and gradients of every
  input and of the raw logit scale, float32 and float64, several batch sizes.
- TripletCLIP as the official ``src/openclip/src/loss.py``: ``negclip(X, Y, Y') + negclip(X', Y', Y)``.
- The ``directional`` decomposition the training step uses: the same value from the per-direction
  calls, and over ``W`` simulated ranks (local rows against all rows, hard negatives gathered).
- Several positives and ignored pairs with hard negatives, against a loop over explicit pairs.
- Clear errors.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from losses import CLIPLoss, NegCLIPLoss, TripletCLIPLoss

DIM = 12
TOL = {torch.float32: {"rtol": 2e-5, "atol": 2e-6}, torch.float64: {"rtol": 1e-10, "atol": 1e-12}}


def unit(n: int, dtype: torch.dtype, g: torch.Generator, around: torch.Tensor | None = None) -> torch.Tensor:
    x = torch.randn(n, DIM, generator=g, dtype=torch.float64)
    if around is not None:
        x = around.double() + 1.5 * x
    return F.normalize(x, dim=1).to(dtype)


def batch(b: int, b_neg: int, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Images X, captions Y near X, negative images X' and captions Y' (``b_neg`` each, Y'_i near Y_i)."""
    g = torch.Generator().manual_seed(seed)
    x = unit(b, dtype, g)
    y = unit(b, dtype, g, around=x)
    y_neg = unit(b_neg, dtype, g, around=y[:b_neg] if b_neg <= b else None)
    x_neg = unit(b_neg, dtype, g, around=y_neg)
    return {"x": x, "y": y, "x_neg": x_neg, "y_neg": y_neg}


# ------------------------------------------------------------------ the authors' formulas
def negclip_authors(images, texts, hard_captions, logit_scale):
    """``vinid/neg_clip`` at world size 1: texts are [captions; hard captions], images are the rows."""
    all_texts = torch.cat([texts, hard_captions])
    logits_per_image = logit_scale * images @ all_texts.T
    logits_per_text = logit_scale * all_texts @ images.T
    labels = torch.arange(len(images))
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text[: len(images)], labels)) / 2


def tripletclip_official(x, y, x_neg, y_neg, logit_scale):
    """TripletCLIP's ``tripletclip_loss``: NegCLIP on the real pairs plus NegCLIP on the negative pairs."""

    def negclip(img, txt, neg_txt):
        labels = torch.arange(len(img))
        i2t = torch.cat([logit_scale * img @ txt.T, logit_scale * img @ neg_txt.T], dim=-1)
        return (F.cross_entropy(i2t, labels) + F.cross_entropy(logit_scale * txt @ img.T, labels)) / 2

    return negclip(x, y, y_neg) + negclip(x_neg, y_neg, y)


def value_and_grads(fn, tensors: list[torch.Tensor], raw_scale: torch.Tensor):
    args = [t.detach().clone().requires_grad_(True) for t in [*tensors, raw_scale]]
    value = fn(*args[:-1], args[-1].exp())
    value.backward()
    return value.detach(), [a.grad for a in args]


def assert_same(ours, ref, dtype):
    torch.testing.assert_close(ours[0], ref[0], **TOL[dtype])
    for a, b in zip(ours[1], ref[1]):
        torch.testing.assert_close(a, b, **TOL[dtype])


# --------------------------------------------------------------------------------- NegCLIP
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b, b_neg", [(1, 1), (7, 7), (7, 3), (32, 32)])
def test_negclip_equals_authors_formula(b: int, b_neg: int, dtype: torch.dtype) -> None:
    d = batch(b, b_neg, dtype, seed=b + b_neg)
    raw = torch.tensor(math.log(1 / 0.07), dtype=dtype)
    ours = value_and_grads(NegCLIPLoss(), [d["x"], d["y"], d["y_neg"]], raw)
    ref = value_and_grads(negclip_authors, [d["x"], d["y"], d["y_neg"]], raw)
    assert_same(ours, ref, dtype)
    assert ours[0] > CLIPLoss()(d["x"], d["y"], raw.exp()) - 1e-6  # hard negatives only add to the image->text term
    assert ours[1][2].abs().sum() > 0  # the hard negatives get a gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_negclip_with_hard_images_appended_as_in_the_authors_readme(dtype: torch.dtype) -> None:
    """README of vinid/neg_clip: images = [images; hard images], texts = [captions; captions of hard images;
    hard captions; hard captions of hard images]; here the first two are the pairs, the last two the negatives."""
    g = torch.Generator().manual_seed(3)
    images, hard_images = unit(6, dtype, g), unit(6, dtype, g)
    captions, hard_image_captions = unit(6, dtype, g, around=images), unit(6, dtype, g, around=hard_images)
    hard, hard_of_hard = unit(6, dtype, g, around=captions), unit(6, dtype, g, around=hard_image_captions)
    img, txt, neg = torch.cat([images, hard_images]), torch.cat([captions, hard_image_captions]), torch.cat([hard, hard_of_hard])
    raw = torch.tensor(2.9, dtype=dtype)
    assert_same(value_and_grads(NegCLIPLoss(), [img, txt, neg], raw), value_and_grads(negclip_authors, [img, txt, neg], raw), dtype)


def test_negclip_without_negatives_is_clip() -> None:
    d = batch(9, 0, torch.float64, seed=4)
    torch.testing.assert_close(NegCLIPLoss()(d["x"], d["y"], d["y_neg"], 20.0), CLIPLoss()(d["x"], d["y"], 20.0))


def test_negclip_directional_decomposition() -> None:
    d = batch(8, 5, torch.float64, seed=5)
    loss, s = NegCLIPLoss(), torch.tensor(15.0, dtype=torch.float64)
    assert loss.two_view and loss.symmetric and loss.hard_negatives_in == "image_to_text"
    whole = loss(d["x"], d["y"], d["y_neg"], s)
    parts = (loss.directional(d["x"], d["y"], s, extra_neg_emb=d["y_neg"]) + loss.directional(d["y"], d["x"], s)) / 2
    torch.testing.assert_close(whole, parts)
    # explicit diagonal and empty ignore take the mask path: same value
    eye = torch.eye(8, dtype=torch.bool)
    torch.testing.assert_close(loss(d["x"], d["y"], d["y_neg"], s, pos_mask=eye, ignore_mask=torch.zeros_like(eye)), whole)


@pytest.mark.parametrize("world", [2, 4])
def test_negclip_local_loss_over_simulated_ranks(world: int) -> None:
    """Rank r: its images against every rank's captions and hard negatives (offset diagonal), its captions
    against every rank's images; the mean over ranks equals the global loss, in value and gradients."""
    b, dtype = 4, torch.float64
    d = batch(world * b, world * b, dtype, seed=world)
    raw = torch.tensor(2.5, dtype=dtype)
    loss = NegCLIPLoss()

    def per_rank(x, y, y_neg, s):
        total = 0
        for r in range(world):
            rows = slice(r * b, (r + 1) * b)
            pos = torch.zeros(b, world * b, dtype=torch.bool)
            pos[torch.arange(b), r * b + torch.arange(b)] = True
            i2t = loss.directional(x[rows], y, s, pos_mask=pos, extra_neg_emb=y_neg)
            t2i = loss.directional(y[rows], x, s, pos_mask=pos)
            total = total + (i2t + t2i) / 2
        return total / world

    tensors = [d["x"], d["y"], d["y_neg"]]
    assert_same(value_and_grads(per_rank, tensors, raw), value_and_grads(negclip_authors, tensors, raw), dtype)


def test_negclip_masks_brute_force() -> None:
    """Duplicate captions as extra positives and ignored pairs; hard negatives are negatives of every image."""
    d = batch(6, 4, torch.float64, seed=6)
    pos = torch.eye(6, dtype=torch.bool)
    pos[0, 3] = pos[3, 0] = True
    ign = torch.zeros(6, 6, dtype=torch.bool)
    ign[1, 4] = ign[5, 2] = True
    pos[2] = False  # image 2 has no positive: left out of image->text
    s = 9.0

    def brute(q, r, extra, p, i):
        rows = []
        for a in range(len(q)):
            logits = [s * torch.dot(q[a], r[j]) for j in range(len(r))] + [s * torch.dot(q[a], e) for e in extra]
            kinds = ["pos" if p[a, j] and not i[a, j] else "ign" if i[a, j] else "neg" for j in range(len(r))] + ["neg"] * len(extra)
            negs = sum(torch.exp(v) for v, k in zip(logits, kinds) if k == "neg")
            terms = [torch.log(torch.exp(v) + negs) - v for v, k in zip(logits, kinds) if k == "pos"]
            if terms:
                rows.append(sum(terms) / len(terms))
        return sum(rows) / len(rows)

    ref = (brute(d["x"], d["y"], d["y_neg"], pos, ign) + brute(d["y"], d["x"], [], pos.T, ign.T)) / 2
    torch.testing.assert_close(NegCLIPLoss()(d["x"], d["y"], d["y_neg"], s, pos_mask=pos, ignore_mask=ign), ref)


# ------------------------------------------------------------------------------ TripletCLIP
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b, b_neg", [(1, 1), (7, 7), (6, 4), (32, 32)])
def test_tripletclip_equals_official_formula(b: int, b_neg: int, dtype: torch.dtype) -> None:
    d = batch(b, b_neg, dtype, seed=10 + b)
    raw = torch.tensor(math.log(1 / 0.07), dtype=dtype)
    tensors = [d["x"], d["y"], d["x_neg"], d["y_neg"]]
    ours = value_and_grads(TripletCLIPLoss(), tensors, raw)
    assert_same(ours, value_and_grads(tripletclip_official, tensors, raw), dtype)
    assert all(g.abs().sum() > 0 for g in ours[1])


def test_tripletclip_is_two_negclips_and_takes_masks() -> None:
    d = batch(6, 6, torch.float64, seed=12)
    s, neg, trip = 12.0, NegCLIPLoss(), TripletCLIPLoss()
    pos = torch.eye(6, dtype=torch.bool)
    pos[1, 2] = True
    ign = torch.zeros(6, 6, dtype=torch.bool)
    ign[0, 5] = True
    expected = neg(d["x"], d["y"], d["y_neg"], s, pos_mask=pos, ignore_mask=ign) + neg(d["x_neg"], d["y_neg"], d["y"], s)
    torch.testing.assert_close(trip(d["x"], d["y"], d["x_neg"], d["y_neg"], s, pos_mask=pos, ignore_mask=ign), expected)
    expected = neg(d["x"], d["y"], d["y_neg"], s) + neg(d["x_neg"], d["y_neg"], d["y"], s, pos_mask=pos, ignore_mask=ign)
    torch.testing.assert_close(trip(d["x"], d["y"], d["x_neg"], d["y_neg"], s, neg_pos_mask=pos, neg_ignore_mask=ign), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype: torch.dtype) -> None:
    d = batch(16, 16, torch.float32, seed=13)
    half = {k: v.to(dtype) for k, v in d.items()}
    full = {k: v.float() for k, v in half.items()}
    for loss, keys in ((NegCLIPLoss(), ("x", "y", "y_neg")), (TripletCLIPLoss(), ("x", "y", "x_neg", "y_neg"))):
        x = half["x"].clone().requires_grad_(True)
        value = loss(x, *[half[k] for k in keys[1:]], 20.0)
        value.backward()
        ref = loss(*[full[k] for k in keys], 20.0)
        assert value.dtype == dtype and torch.isfinite(x.grad).all()
        assert abs(value.float().item() - ref.item()) <= 0.01 * abs(ref.item()) + 0.01


def test_clear_errors() -> None:
    d = batch(4, 3, torch.float32)
    with pytest.raises(ValueError, match=r"extra_neg_emb has shape \(3, 5\); expected \[N, 12\]"):
        NegCLIPLoss()(d["x"], d["y"], d["y_neg"][:, :5], 10.0)
    with pytest.raises(ValueError, match="pos_mask=None means the diagonal"):
        TripletCLIPLoss()(d["x"], d["y"], d["x_neg"][:2], d["y_neg"], 10.0)
    with pytest.raises(ValueError, match="neg_image_emb has dimension 12 but neg_text_emb has 6"):
        TripletCLIPLoss()(d["x"], d["y"], d["x_neg"], d["y_neg"][:, :6], 10.0)
    with pytest.raises(ValueError, match=r"pos_mask has shape \(4, 4\); expected \[3, 3\]"):
        TripletCLIPLoss()(d["x"], d["y"], d["x_neg"], d["y_neg"], 10.0, neg_pos_mask=torch.eye(4, dtype=torch.bool))
