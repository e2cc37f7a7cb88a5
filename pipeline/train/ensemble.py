"""Distillation targets from one teacher or an ensemble of teachers, as pure functions.

An ensemble "A*0.7+B*0.3" concatenates each teacher's unit vectors scaled by sqrt(weight)
(weights normalised to sum to 1): the result is a unit vector whose cosine with another is
exactly sum_i w_i cos_i, the weighted average of the teachers' cosines. A student narrower
than that concatenation learns it through the relational term (any width), and through the
pointwise term after a PCA to its width (`--teacher-dim`).
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import TrainError


def parse_teacher(spec: str) -> list[tuple[str, float]]:
    """[(teacher spec, weight)] from "SPEC" or "SPEC*W+SPEC*W"; weights sum to 1."""
    members = []
    for part in spec.split("+"):
        name, star, weight = part.rpartition("*")
        if not star:
            name, weight = part, "1"
        try:
            w = float(weight)
        except ValueError:
            raise TrainError(f"--teacher {spec!r}: {weight!r} is not a weight") from None
        if not name.strip() or not w > 0:
            raise TrainError(f"--teacher {spec!r}: each member is SPEC or SPEC*WEIGHT with a "
                             "positive weight")
        members.append((name.strip(), w))
    total = sum(w for _, w in members)
    return [(name, w / total) for name, w in members]


def combine(vectors: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """The ensemble's (N, sum D_i) float16 unit vectors from each teacher's unit vectors."""
    if len({len(v) for v in vectors}) != 1:
        raise ValueError("teachers gave different numbers of vectors")
    if len(vectors) == 1:
        return vectors[0].astype(np.float16)
    return np.concatenate([(v.astype(np.float32) * np.sqrt(w)).astype(np.float16)
                           for v, w in zip(vectors, weights, strict=True)], axis=1)


def pca_basis(vectors: np.ndarray, dim: int, sample: int = 200_000,
              seed: int = 0) -> np.ndarray:
    """(D, dim) top eigenvectors of the uncentred second moment E[x x^T] on a seeded sample:
    the dim-dimensional projection that best keeps the vectors' inner products, hence their
    cosines (centring would change them, and the relational term uses the raw ones)."""
    if dim > vectors.shape[1]:
        raise TrainError(f"--teacher-dim {dim} exceeds the teacher's {vectors.shape[1]} dims")
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(vectors), size=min(sample, len(vectors)), replace=False)
    x = vectors[np.sort(rows)].astype(np.float64)
    eigvals, eigvecs = np.linalg.eigh(x.T @ x / len(x))
    basis = eigvecs[:, np.argsort(eigvals)[::-1][:dim]]
    # A sign convention, so the same data always gives the same basis (eigh's is arbitrary).
    basis *= np.where(basis[np.abs(basis).argmax(0), np.arange(dim)] < 0, -1.0, 1.0)
    return basis.astype(np.float32)


def project(vectors: np.ndarray, basis: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """(N, dim) float16 unit vectors: each row projected on the basis and renormalised."""
    out = np.empty((len(vectors), basis.shape[1]), dtype=np.float16)
    for start in range(0, len(vectors), chunk):
        part = vectors[start:start + chunk].astype(np.float32) @ basis
        part /= np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12)
        out[start:start + chunk] = part
    return out
