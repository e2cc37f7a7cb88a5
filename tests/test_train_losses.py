"""Training losses against hand-written references, and the learning-rate schedule."""

import math

import pytest
import torch

from pipeline.train.losses import cosent_loss, distill_loss, lr_at, mnrl_loss

# Losses, written out element by element in plain Python


def cos(u, v):
    return sum(a * b for a, b in zip(u, v, strict=True)) / math.sqrt(sum(a * a for a in u) *
                                                       sum(b * b for b in v))


def vectors(seed, n=6, d=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(
        n, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(3))
def test_mnrl_matches_reference(seed):
    a, b = vectors(seed)
    A, B = a.tolist(), b.tolist()
    ref = 0.0
    for i in range(len(A)):
        logits = [20.0 * cos(A[i], B[j]) for j in range(len(B))]
        ref += -logits[i] + math.log(sum(math.exp(x) for x in logits))
    ref /= len(A)
    assert float(mnrl_loss(a, b, scale=20.0)) == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_cosent_matches_reference(seed):
    a, b = vectors(seed)
    scores = torch.tensor([4.0, 2.5, 2.5, 0.0, 5.0, 1.0], dtype=torch.float64)
    A, B, S = a.tolist(), b.tolist(), scores.tolist()
    c = [cos(x, y) for x, y in zip(A, B, strict=True)]
    total = 1.0  # the exp(0) term
    for i in range(6):
        for j in range(6):
            if S[i] > S[j]:  # pair i should be more similar than pair j
                total += math.exp(20.0 * (c[j] - c[i]))
    ref = math.log(total)
    assert float(cosent_loss(a, b, scores, scale=20.0)) == pytest.approx(ref, rel=1e-9)


def test_cosent_rewards_the_right_order():
    scores = torch.tensor([5.0, 0.0])
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    right = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # similar pair similar, other not
    wrong = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert cosent_loss(a, right, scores) < 1e-6 < cosent_loss(a, wrong, scores)


def test_distill_losses_match_reference():
    s, t = vectors(7)
    S, T = s.tolist(), t.tolist()
    ref_cos = sum(1 - cos(x, y) for x, y in zip(S, T, strict=True)) / len(S)
    ref_mse = sum((x - y) ** 2 for u, v in zip(S, T, strict=True)
                  for x, y in zip(u, v, strict=True)) / (6 * 5)
    assert float(distill_loss(s, t, "cosine")) == pytest.approx(ref_cos, rel=1e-9)
    assert float(distill_loss(s, t, "mse")) == pytest.approx(ref_mse, rel=1e-9)
    with pytest.raises(ValueError):
        distill_loss(s, t, "kl")


def test_lr_schedule():
    lrs = [lr_at(s, 100, 1e-3, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(x < y for x, y in zip(lrs[:9], lrs[1:10], strict=True))  # warm-up rises
    assert all(x >= y for x, y in zip(lrs[10:-1], lrs[11:], strict=True))  # cosine falls
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)  # down to min_ratio * peak
    assert lr_at(0, 10, 1.0, 0) == pytest.approx(1.0)  # no warm-up


def test_relational_loss_matches_a_loop_reference_and_allows_other_widths():
    from pipeline.train.losses import relational_loss

    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(6, 4, generator=g), torch.randn(6, 9, generator=g)
    tau = 0.1

    def row_probs(x, i):
        unit = [v / v.norm() for v in x.double()]
        logits = [float(unit[i] @ unit[j]) / tau for j in range(len(x)) if j != i]
        z = math.log(sum(math.exp(v) for v in logits))
        return [math.exp(v - z) for v in logits]

    ref = 0.0
    for i in range(6):
        p, q = row_probs(t, i), row_probs(s, i)
        ref += sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))
    assert float(relational_loss(s, t, tau)) == pytest.approx(ref / 6, rel=1e-5)
    # Zero exactly when the student ranks the batch as the teacher does: same cosines.
    rot = torch.linalg.qr(torch.randn(9, 9, generator=g))[0]
    assert float(relational_loss(t @ rot * 3.0, t, tau)) == pytest.approx(0.0, abs=1e-5)
    assert float(relational_loss(s, t, tau)) > 0.01
