"""Silver pairs labelled by the teacher (augmented SBERT): pairs of distillation texts found as
nearest neighbours in the teacher's space, scored by the teacher's cosine mapped onto STS-B's
0-5 scale, so CoSENT can train on them beside STS-B train. Pure functions of vectors; the GPU
recipe (benchmarks/train_gpu_silver.py) feeds them the cached teacher vectors.

Neighbours of several ranks (1st, 3rd, 10th, 30th, 100th) and a random text give each anchor
pairs across the whole range of similarity, not only near-paraphrases.
"""

from __future__ import annotations

import numpy as np
import torch

RANKS = (1, 3, 10, 30, 100)


def calibration(teacher_cos: np.ndarray, gold: np.ndarray) -> tuple[float, float]:
    """(a, b) of the least-squares line gold ~ a * cos + b on STS-B train: the teacher's
    cosines put on the gold scale (a monotone map, so CoSENT's order is the teacher's)."""
    a, b = np.polyfit(np.asarray(teacher_cos, np.float64), np.asarray(gold, np.float64), 1)
    return float(a), float(b)


def to_scores(cos: np.ndarray, a: float, b: float) -> np.ndarray:
    return np.clip(a * np.asarray(cos, np.float64) + b, 0.0, 5.0)


def neighbours(vectors: np.ndarray, anchors: np.ndarray, k: int, device: str = "cpu",
               chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(ids, cosines), each (len(anchors), k): the k nearest other texts of each anchor by
    inner product of the unit vectors (exact search; the anchor itself left out)."""
    base = torch.from_numpy(np.ascontiguousarray(vectors)).to(device)
    base = base.float() if device == "cpu" else base.half()
    ids, sims = [], []
    for lo in range(0, len(anchors), chunk):
        rows = torch.from_numpy(anchors[lo:lo + chunk]).to(device)
        scores = (base[rows] @ base.T).float()
        scores[torch.arange(len(rows), device=device), rows] = -2.0  # not itself
        top = torch.topk(scores, k, dim=1)
        ids.append(top.indices.cpu().numpy())
        sims.append(top.values.cpu().numpy())
    return np.concatenate(ids), np.concatenate(sims)


def pick_pairs(anchors: np.ndarray, ids: np.ndarray, sims: np.ndarray, vectors: np.ndarray,
               seed: int = 0, ranks: tuple[int, ...] = RANKS) -> tuple[np.ndarray, np.ndarray,
                                                                      np.ndarray]:
    """(first, second, cosine) rows: each anchor with its neighbours at `ranks` (1-based,
    those within k) and one seeded random text."""
    rng = np.random.default_rng(seed)
    firsts, seconds, cosines = [], [], []
    for r in ranks:
        if r <= ids.shape[1]:
            firsts.append(anchors)
            seconds.append(ids[:, r - 1])
            cosines.append(sims[:, r - 1])
    others = rng.integers(0, len(vectors), size=len(anchors))
    others = np.where(others == anchors, (others + 1) % len(vectors), others)
    firsts.append(anchors)
    seconds.append(others)
    cosines.append((vectors[anchors].astype(np.float32) * vectors[others].astype(np.float32))
                   .sum(1))
    return np.concatenate(firsts), np.concatenate(seconds), np.concatenate(cosines)
