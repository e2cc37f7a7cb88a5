"""The objectives' losses and the learning-rate schedule, as pure functions. In the losses,
a and b are (B, D) embeddings whose rows are pairs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DISTILL_LOSSES = ("cosine", "mse")


def mnrl_loss(a: torch.Tensor, b: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """In-batch negatives: a_i must pick b_i out of all b (cross-entropy over scaled cosines)."""
    sims = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T * scale  # (B, B)
    return F.cross_entropy(sims, torch.arange(len(a), device=a.device))


def cosent_loss(a: torch.Tensor, b: torch.Tensor, scores: torch.Tensor,
                scale: float = 20.0) -> torch.Tensor:
    """CoSENT (Su, 2022): log(1 + sum over (i, j) with score_i > score_j of
    exp(scale * (cos_j - cos_i))), i.e. a soft count of wrongly ordered pairs of pairs."""
    cos = (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1) * scale  # (B,)
    diff = cos[None, :] - cos[:, None]  # diff[i, j] = cos_j - cos_i
    wrong_way = scores[:, None] > scores[None, :]
    diff = diff[wrong_way]
    return torch.logsumexp(torch.cat([diff.new_zeros(1), diff]), dim=0)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor,
                 kind: str = "cosine") -> torch.Tensor:
    """cosine: mean (1 - cos); mse: mean squared error against the (unit) teacher vectors."""
    if kind == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    if kind == "mse":
        return F.mse_loss(student, teacher)
    raise ValueError(f"unknown distillation loss {kind!r}")


def relational_loss(student: torch.Tensor, teacher: torch.Tensor,
                    temperature: float = 0.05) -> torch.Tensor:
    """KL(teacher || student) between each row's distribution over the other rows of the
    batch (softmax of cosine / temperature, the diagonal left out): the student learns how the
    teacher ranks a batch, not only where each vector points. The two widths may differ, so an
    ensemble of teachers (1152 dims) can teach a 384-dim student."""
    def log_probs(x: torch.Tensor) -> torch.Tensor:
        unit = F.normalize(x.float(), dim=-1)
        sims = unit @ unit.T / temperature
        eye = torch.eye(len(x), dtype=torch.bool, device=x.device)
        return F.log_softmax(sims.masked_fill(eye, float("-inf")), dim=-1).masked_fill(eye, 0.0)

    s, t = log_probs(student), log_probs(teacher)
    return (t.exp() * (t - s)).sum(-1).mean()


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float = 0.0) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine decay."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return peak * (min_ratio + (1 - min_ratio) * cosine)
