"""Distillation losses against hand-written loops and sentence-transformers' ``MarginMSELoss``."""

import math

import pytest
import torch

from losses.distillation import KLDistillationLoss, MarginMSELoss, candidate_scores
from tests.helpers import oracle


def scores(seed=0, b=4, k=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1 + k, generator=g, dtype=torch.float64), 3 * torch.randn(b, 1 + k, generator=g, dtype=torch.float64)


def kl_loop(student, teacher, valid, ts, tt, symmetric=False, log_w=None):
    total, rows = 0.0, 0
    for i in range(len(student)):
        cols = [j for j in range(student.shape[1]) if valid[i, j] and valid[i, 0]]
        if len(cols) < 2:
            continue
        zs = [student[i, j].item() / ts for j in cols]
        zt = [teacher[i, j].item() / tt + (0.0 if log_w is None else log_w[i][j]) for j in cols]
        ls = [z - math.log(sum(math.exp(y) for y in zs)) for z in zs]
        lt = [z - math.log(sum(math.exp(y) for y in zt)) for z in zt]
        kl = sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))
        if symmetric:
            kl = 0.5 * (kl + sum(math.exp(b) * (b - a) for a, b in zip(lt, ls)))
        total, rows = total + kl, rows + 1
    return total / rows


@pytest.mark.parametrize("symmetric", [False, True])
def test_kl_equals_the_hand_written_formula(symmetric):
    s, t = scores()
    valid = torch.ones_like(s, dtype=torch.bool)
    valid[1, 2] = False  # an empty slot
    valid[2, 0] = False  # a row without a scored positive: left out
    loss = KLDistillationLoss(temperature_student=0.5, temperature_teacher=2.0, symmetric=symmetric)(s, t, valid)
    assert loss.item() == pytest.approx(kl_loop(s, t, valid, 0.5, 2.0, symmetric), rel=1e-10)


def test_kl_nan_teacher_scores_are_left_out_and_zero_when_equal():
    s, t = scores(1)
    t2 = t.clone()
    t2[0, 1] = float("nan")
    valid = torch.isfinite(t2)
    assert KLDistillationLoss()(s, t2).item() == pytest.approx(kl_loop(s, t, valid, 0.05, 1.0), rel=1e-10)
    assert KLDistillationLoss(temperature_student=1.0)(t, t).item() == pytest.approx(0.0, abs=1e-12)


def margin_loop(s, t, valid, w=None):
    total, n = 0.0, 0
    for i in range(len(s)):
        for j in range(1, s.shape[1]):
            if valid[i, 0] and valid[i, j]:
                e = ((s[i, 0] - s[i, j]) - (t[i, 0] - t[i, j])).item() ** 2
                total, n = total + e * (1.0 if w is None else w[i][j]), n + 1
    return total / n


def test_margin_mse_equals_sentence_transformers_on_the_same_scores():
    oracle("sentence_transformers")
    from sentence_transformers.sentence_transformer.losses.margin_mse import MarginMSELoss as STMarginMSELoss
    from sentence_transformers.util import pairwise_dot_score

    g = torch.Generator().manual_seed(0)
    b, k, d = 5, 3, 8
    q, p = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    negs = [torch.randn(b, d, generator=g) for _ in range(k)]
    teacher = torch.randn(b, 1 + k, generator=g)
    ref = STMarginMSELoss.__new__(STMarginMSELoss)  # their loss on given embeddings, without a SentenceTransformer model
    torch.nn.Module.__init__(ref)
    ref.similarity_fct, ref.loss_fct = pairwise_dot_score, torch.nn.MSELoss()
    expected = ref.compute_loss_from_embeddings([q, p, *negs], teacher)
    neg_rows = torch.stack(negs, 1).reshape(b * k, d)  # query-major, as neg_* batches
    student = candidate_scores(q, p, neg_rows, similarity="dot")
    got = MarginMSELoss()(student, teacher)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert got.item() == pytest.approx(margin_loop(student, teacher, torch.ones(b, 1 + k, dtype=torch.bool)), rel=1e-5)


def test_teacher_filters_drop_and_downweight():
    s, t = scores(2)
    t[0, 2] = t[0, 0] + 1.5  # above the positive
    t[3, 1] = t[3, 0] + 0.2
    valid = torch.ones_like(s, dtype=torch.bool)
    above = torch.zeros_like(valid)
    above[:, 1:] = t[:, 1:] > t[:, :1]
    w = [[min(1.0, math.exp(-(t[i, j] - t[i, 0]).item() / 0.7)) for j in range(4)] for i in range(4)]
    assert MarginMSELoss(teacher_filter="drop")(s, t).item() == pytest.approx(margin_loop(s, t, valid & ~above), rel=1e-10)
    got = MarginMSELoss(teacher_filter="downweight", downweight_temperature=0.7)(s, t).item()
    assert got == pytest.approx(margin_loop(s, t, valid, w), rel=1e-10)
    assert KLDistillationLoss(teacher_filter="drop")(s, t).item() == pytest.approx(kl_loop(s, t, valid & ~above, 0.05, 1.0), rel=1e-10)
    log_w = [[math.log(min(1.0, math.exp(-(t[i, j] - t[i, 0]).item() / 2.0))) for j in range(4)] for i in range(4)]
    got = KLDistillationLoss(temperature_teacher=2.0, teacher_filter="downweight")(s, t).item()
    assert got == pytest.approx(kl_loop(s, t, valid, 0.05, 2.0, log_w=log_w), rel=1e-10)


@pytest.mark.parametrize("loss", [KLDistillationLoss(symmetric=True), MarginMSELoss(teacher_filter="downweight")], ids=["kl", "margin"])
def test_gradients_are_finite_with_empty_slots(loss):
    q, d, n = torch.randn(3, 6, requires_grad=True), torch.randn(3, 6), torch.randn(6, 6)
    student = candidate_scores(q, d, n, similarity=loss.similarity)
    teacher = torch.randn(3, 3)
    valid = torch.tensor([[True, True, False], [True, False, False], [True, True, True]])
    loss(student, teacher, valid).backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


def test_candidate_scores_and_bad_inputs():
    q, d, n = torch.randn(2, 4), torch.randn(2, 4), torch.randn(4, 4)
    out = candidate_scores(q, d, n, similarity="cosine")
    cos = torch.nn.functional.cosine_similarity
    assert out.shape == (2, 3)
    for i in range(2):
        assert out[i, 0].item() == pytest.approx(cos(q[i], d[i], dim=0).item(), abs=1e-6)
        for j in range(2):
            assert out[i, 1 + j].item() == pytest.approx(cos(q[i], n[i * 2 + j], dim=0).item(), abs=1e-6)
    with pytest.raises(ValueError, match=r"\[B \* k, 4\]"):
        candidate_scores(q, d, torch.randn(3, 4))
    with pytest.raises(ValueError, match="student"):
        KLDistillationLoss()(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="teacher_filter"):
        MarginMSELoss(teacher_filter="weird")
    with pytest.raises(ValueError, match="temperatures"):
        KLDistillationLoss(temperature_student=0)
