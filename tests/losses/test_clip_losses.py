"""``CLIPLoss`` and ``SigLIPLoss`` against open_clip 3.3 and brute-force loops.

- World size 1: value and gradients (both embeddings, the raw logit scale before ``exp``, the bias)
  equal ``open_clip.loss.ClipLoss`` / ``SigLipLoss``, float32 and float64, batch sizes 1, 7, 64.
- The local-loss decomposition the training step uses: ``W`` simulated ranks (the batch split in
  ``W`` slices). open_clip's own ``local_loss=True`` / ``dist_impl="gather"`` code runs per rank with
  its collective replaced by the full tensors; the mean over ranks of its per-rank losses equals
  the mean over ranks of our ``directional`` calls on (local rows, all rows) with the offset
  diagonal, and the global loss (values and gradients).
- Several positives per row and ignored pairs against a loop over explicit pairs; a row without a
  positive is left out.
- Half precision, and clear errors.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from losses import CLIPLoss, SigLIPLoss
from tests.helpers import oracle

open_clip_loss = oracle("open_clip.loss")

DIM = 16
TOL = {torch.float32: {"rtol": 2e-5, "atol": 2e-6}, torch.float64: {"rtol": 1e-10, "atol": 1e-12}}


def features(b: int, dtype: torch.dtype, seed: int = 0, dim: int = DIM) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm image and text features ``[b, dim]``, the text correlated with its image (as after training)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(b, dim, generator=g, dtype=torch.float64)
    txt = img + 2.0 * torch.randn(b, dim, generator=g, dtype=torch.float64)
    return F.normalize(img, dim=1).to(dtype), F.normalize(txt, dim=1).to(dtype)


def leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def run(fn, img, txt, raw_scale, bias=None):
    """``fn(img, txt, exp(raw_scale), bias)`` on fresh leaves; returns the value and the gradients of every input."""
    args = leaves(img, txt, raw_scale) + ([] if bias is None else leaves(bias))
    value = fn(args[0], args[1], args[2].exp(), *args[3:])
    value.backward()
    return value.detach(), [a.grad for a in args]


def assert_same(ours, ref, dtype):
    (v1, g1), (v2, g2) = ours, ref
    torch.testing.assert_close(v1, v2, **TOL[dtype])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, **TOL[dtype])


# ------------------------------------------------------------------------- world size 1
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b", [1, 7, 64])
def test_clip_equals_open_clip(b: int, dtype: torch.dtype) -> None:
    img, txt = features(b, dtype, seed=b)
    raw = torch.tensor(math.log(1 / 0.07), dtype=dtype)
    ours = run(CLIPLoss(), img, txt, raw)
    ref = run(open_clip_loss.ClipLoss(), img, txt, raw)
    assert_same(ours, ref, dtype)
    if b > 1:
        assert ours[0] > 0.01 and ours[1][2].abs() > 0  # a loss that can fail: non-trivial value and scale gradient
    # the general (mask) path gives the same as the cross-entropy fast path
    eye = torch.eye(b, dtype=torch.bool)
    masked = run(lambda i, t, s: CLIPLoss()(i, t, s, pos_mask=eye, ignore_mask=torch.zeros_like(eye)), img, txt, raw)
    assert_same(masked, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clip_with_bias_equals_open_clip(dtype: torch.dtype) -> None:
    img, txt = features(9, dtype, seed=3)
    raw, bias = torch.tensor(2.5, dtype=dtype), torch.tensor(-1.5, dtype=dtype)
    assert_same(run(CLIPLoss(), img, txt, raw, bias), run(open_clip_loss.ClipLoss(), img, txt, raw, bias), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b", [1, 7, 64])
def test_siglip_equals_open_clip(b: int, dtype: torch.dtype) -> None:
    img, txt = features(b, dtype, seed=10 + b)
    raw, bias = torch.tensor(math.log(10.0), dtype=dtype), torch.tensor(-10.0 if b > 1 else 1.0, dtype=dtype)
    ours = run(SigLIPLoss(), img, txt, raw, bias)
    ref = run(open_clip_loss.SigLipLoss(), img, txt, raw, bias)
    assert_same(ours, ref, dtype)
    assert ours[0] > 0.01 and ours[1][3].abs() > 0
    eye = torch.eye(b, dtype=torch.bool)
    assert_same(run(lambda i, t, s, c: SigLIPLoss()(i, t, s, c, pos_mask=eye), img, txt, raw, bias), ref, dtype)


def test_scale_as_float_and_one_element_tensor() -> None:
    img, txt = features(5, torch.float64)
    ref = open_clip_loss.ClipLoss()(img, txt, 14.0)
    torch.testing.assert_close(CLIPLoss()(img, txt, 14.0), ref)
    torch.testing.assert_close(CLIPLoss()(img, txt, torch.tensor([14.0])), ref)
    torch.testing.assert_close(SigLIPLoss()(img, txt, 10.0, -3.0), open_clip_loss.SigLipLoss()(img, txt, 10.0, -3.0))


# ------------------------------------------------------------ local loss over simulated ranks
def offset_diagonal(b_local: int, b_all: int, start: int) -> torch.Tensor:
    pos = torch.zeros(b_local, b_all, dtype=torch.bool)
    pos[torch.arange(b_local), start + torch.arange(b_local)] = True
    return pos


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("world", [2, 4])
def test_clip_local_loss_decomposition(world: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    b = 6
    img0, txt0 = features(world * b, dtype, seed=world)
    raw0 = torch.tensor(math.log(1 / 0.07), dtype=dtype)

    def simulated(fn):
        """Mean over ranks of ``fn(rank, img_all, txt_all, scale)``; value and gradients w.r.t. the full batch."""
        img, txt, raw = leaves(img0, txt0, raw0)
        total = sum(fn(r, img, txt, raw.exp()) for r in range(world)) / world
        total.backward()
        return total.detach(), [img.grad, txt.grad, raw.grad]

    def open_clip_rank(r, img, txt, scale):
        # open_clip's local_loss code, its all-gather (with grad) replaced by the full batch
        monkeypatch.setattr(open_clip_loss, "gather_features", lambda *a, **k: (img, txt))
        loss = open_clip_loss.ClipLoss(local_loss=True, gather_with_grad=True, rank=r, world_size=world)
        return loss(img[r * b : (r + 1) * b], txt[r * b : (r + 1) * b], scale)

    def ours_rank(r, img, txt, scale):
        pos = offset_diagonal(b, world * b, r * b)
        loss = CLIPLoss()
        i2t = loss.directional(img[r * b : (r + 1) * b], txt, scale, pos_mask=pos)
        t2i = loss.directional(txt[r * b : (r + 1) * b], img, scale, pos_mask=pos)
        return (i2t + t2i) / 2

    ref = simulated(open_clip_rank)
    assert_same(simulated(ours_rank), ref, dtype)
    img, txt, raw = leaves(img0, txt0, raw0)
    glob = CLIPLoss()(img, txt, raw.exp())
    glob.backward()
    assert_same((glob.detach(), [img.grad, txt.grad, raw.grad]), ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("world", [2, 3])
def test_siglip_local_loss_decomposition(world: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    b = 5
    img0, txt0 = features(world * b, dtype, seed=20 + world)
    raw0, bias0 = torch.tensor(math.log(10.0), dtype=dtype), torch.tensor(-4.0, dtype=dtype)

    def simulated(fn):
        img, txt, raw, bias = leaves(img0, txt0, raw0, bias0)
        total = sum(fn(r, img, txt, raw.exp(), bias) for r in range(world)) / world
        total.backward()
        return total.detach(), [img.grad, txt.grad, raw.grad, bias.grad]

    def open_clip_rank(r, img, txt, scale, bias):
        # open_clip's dist_impl="gather" path, its all-gather (with grad) replaced by every rank's slice
        monkeypatch.setattr(torch.distributed.nn, "all_gather", lambda t: [txt[i * b : (i + 1) * b] for i in range(world)])
        loss = open_clip_loss.SigLipLoss(rank=r, world_size=world, dist_impl="gather")
        return loss(img[r * b : (r + 1) * b], txt[r * b : (r + 1) * b], scale, bias)

    def ours_rank(r, img, txt, scale, bias):
        return SigLIPLoss().directional(img[r * b : (r + 1) * b], txt, scale, bias, pos_mask=offset_diagonal(b, world * b, r * b))

    ref = simulated(open_clip_rank)
    assert_same(simulated(ours_rank), ref, dtype)
    img, txt, raw, bias = leaves(img0, txt0, raw0, bias0)
    glob = SigLIPLoss()(img, txt, raw.exp(), bias)
    glob.backward()
    assert_same((glob.detach(), [img.grad, txt.grad, raw.grad, bias.grad]), ref, dtype)


# ------------------------------------------------------------- several positives, ignored pairs
def relevance(q: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A diagonal plus extra positives (duplicate captions), some ignored pairs, row 2 with no positive."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.eye(q, r, dtype=torch.bool) | (torch.rand(q, r, generator=g) < 0.2)
    ign = (torch.rand(q, r, generator=g) < 0.15) & ~torch.eye(q, r, dtype=torch.bool)
    pos[2] = False
    ign[3, 3] = True  # an ignored pair that is also in pos_mask: ignored wins
    pos[4] = True  # a row with no negative: its terms are 0 but the row counts
    ign[4] = False
    return pos, ign


def brute_softmax(q: torch.Tensor, r: torch.Tensor, scale: float, pos: torch.Tensor, ign: torch.Tensor) -> torch.Tensor:
    rows = []
    for i in range(len(q)):
        logits = [scale * torch.dot(q[i], r[j]) for j in range(len(r))]
        positives = [j for j in range(len(r)) if pos[i, j] and not ign[i, j]]
        negatives = [j for j in range(len(r)) if not pos[i, j] and not ign[i, j]]
        terms = []
        for p in positives:
            denominator = torch.exp(logits[p]) + sum((torch.exp(logits[n]) for n in negatives), torch.zeros((), dtype=q.dtype))
            terms.append(-torch.log(torch.exp(logits[p]) / denominator))
        if terms:
            rows.append(sum(terms) / len(terms))
    return sum(rows) / len(rows)


def brute_sigmoid(q: torch.Tensor, r: torch.Tensor, scale: float, bias: float, pos: torch.Tensor, ign: torch.Tensor) -> torch.Tensor:
    total = torch.zeros((), dtype=q.dtype)
    for i in range(len(q)):
        for j in range(len(r)):
            if not ign[i, j]:
                z = 1.0 if pos[i, j] else -1.0
                total = total - torch.log(torch.sigmoid(z * (scale * torch.dot(q[i], r[j]) + bias)))
    return total / len(q)


def test_clip_positives_beyond_diagonal_brute_force() -> None:
    img, txt = features(9, torch.float64, seed=5)
    pos, ign = relevance(9, 9, seed=1)
    loss = CLIPLoss()
    for q, r, p, i in ((img, txt, pos, ign), (txt, img, pos.T, ign.T)):
        q1, r1 = leaves(q, r)
        value = loss.directional(q1, r1, 7.0, pos_mask=p, ignore_mask=i)
        value.backward()
        q2, r2 = leaves(q, r)
        ref = brute_softmax(q2, r2, 7.0, p, i)
        ref.backward()
        torch.testing.assert_close(value, ref)
        torch.testing.assert_close(q1.grad, q2.grad)
        torch.testing.assert_close(r1.grad, r2.grad)
    both = loss(img, txt, 7.0, pos_mask=pos, ignore_mask=ign)
    torch.testing.assert_close(both, (brute_softmax(img, txt, 7.0, pos, ign) + brute_softmax(txt, img, 7.0, pos.T, ign.T)) / 2)


def test_clip_row_without_positive_is_left_out() -> None:
    img, txt = features(8, torch.float64, seed=6)
    pos = torch.eye(6, 8, dtype=torch.bool)
    pos[1, 1] = False
    keep = [0, 2, 3, 4, 5]
    value = CLIPLoss().directional(img[:6], txt, 5.0, pos_mask=pos)
    torch.testing.assert_close(value, CLIPLoss().directional(img[keep], txt, 5.0, pos_mask=pos[keep]))
    torch.testing.assert_close(value, F.cross_entropy(5.0 * img[keep] @ txt.T, torch.tensor(keep)))
    # no positive anywhere: zero with zero gradients, not NaN
    x = img.clone().requires_grad_(True)
    none = CLIPLoss().directional(x, txt, 5.0, pos_mask=torch.zeros(8, 8, dtype=torch.bool))
    none.backward()
    assert none.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def test_second_positive_is_not_pushed_away() -> None:
    """A duplicate caption as a second positive is not in the denominator: row 0 is cross-entropy without that column."""
    img, txt = features(5, torch.float64, seed=8)
    txt = txt.clone()
    txt[1] = txt[0]
    pos = torch.eye(5, dtype=torch.bool)
    pos[0, 1] = pos[1, 0] = True
    row0 = CLIPLoss().directional(img[:1], txt, 10.0, pos_mask=pos[:1])
    others = [0, 2, 3, 4]
    torch.testing.assert_close(row0, F.cross_entropy(10.0 * img[:1] @ txt[others].T, torch.tensor([0])))
    # plain cross-entropy counts the duplicate as a negative: a different, larger loss
    assert row0 < F.cross_entropy(10.0 * img[:1] @ txt.T, torch.tensor([0])) - 0.1


def test_siglip_masks_brute_force() -> None:
    img, txt = features(7, torch.float64, seed=9)
    pos, ign = relevance(7, 9, seed=2)
    txt9 = torch.cat([txt, features(2, torch.float64, seed=99)[1]])
    q1, r1, q2, r2 = leaves(img, txt9, img, txt9)
    value = SigLIPLoss().directional(q1, r1, 8.0, -2.0, pos_mask=pos, ignore_mask=ign)
    value.backward()
    ref = brute_sigmoid(q2, r2, 8.0, -2.0, pos, ign)
    ref.backward()
    torch.testing.assert_close(value, ref)
    torch.testing.assert_close(q1.grad, q2.grad)
    torch.testing.assert_close(r1.grad, r2.grad)


# -------------------------------------------------------------------------- precision, errors
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype: torch.dtype) -> None:
    img, txt = features(16, torch.float32, seed=11)
    img, txt = img.to(dtype), txt.to(dtype)
    for loss, args in ((CLIPLoss(), (20.0,)), (SigLIPLoss(), (10.0, -5.0))):
        x = img.clone().requires_grad_(True)
        half = loss(x, txt, *args)
        half.backward()
        full = loss(img.float(), txt.float(), *args)
        assert half.dtype == dtype and torch.isfinite(x.grad).all()
        assert abs(half.float().item() - full.item()) <= 0.01 * abs(full.item()) + 0.01


def test_clear_errors() -> None:
    img, txt = features(4, torch.float32)
    clip, sig = CLIPLoss(), SigLIPLoss()
    with pytest.raises(ValueError, match="pos_mask=None means the diagonal"):
        clip.directional(img[:2], txt, 10.0)
    with pytest.raises(ValueError, match=r"pos_mask has shape \(4, 3\); expected \[4, 4\]"):
        clip(img, txt, 10.0, pos_mask=torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="ignore_mask has dtype torch.float32; expected a bool"):
        clip(img, txt, 10.0, ignore_mask=torch.zeros(4, 4))
    with pytest.raises(ValueError, match="logit_bias is None"):
        sig(img, txt, 10.0)
    with pytest.raises(ValueError, match=r"image_emb has shape \(4,\)"):
        clip(img[:, 0], txt, 10.0)
    with pytest.raises(ValueError, match="image_emb has dimension 16 but text_emb has 8"):
        clip(img, txt[:, :8], 10.0)
    with pytest.raises(ValueError, match="logit_scale has shape"):
        clip(img, txt, torch.ones(2))
    with pytest.raises(ValueError, match="logit_scale is a str"):
        clip(img, txt, "10")
