"""Ensemble teachers and their PCA (pipeline/train/ensemble.py), against direct numpy
references: the ensemble's cosine is the weighted average of the teachers' cosines, and the
PCA keeps inner products as the best rank-k approximation does."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import TrainError
from pipeline.train.ensemble import combine, parse_teacher, pca_basis, project


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_parse_teacher_normalises_weights_and_refuses_bad_members():
    assert parse_teacher("st:a") == [("st:a", 1.0)]
    assert parse_teacher("st:all-mpnet-base-v2*0.7+st:all-MiniLM-L6-v2*0.3") == [
        ("st:all-mpnet-base-v2", pytest.approx(0.7)), ("st:all-MiniLM-L6-v2", pytest.approx(0.3))]
    assert parse_teacher("a*2+b*2") == [("a", 0.5), ("b", 0.5)]
    for bad in ("a*x", "a*0", "a*-1+b", "+b", "a*"):
        with pytest.raises(TrainError):
            parse_teacher(bad)


def test_ensemble_cosine_is_the_weighted_average_of_the_teachers_cosines():
    rng = np.random.default_rng(0)
    a, b = unit(rng.normal(size=(50, 8))), unit(rng.normal(size=(50, 5)))
    both = combine([a, b], [0.7, 0.3]).astype(np.float64)
    assert both.shape == (50, 13)
    assert np.allclose(np.linalg.norm(both, axis=1), 1, atol=2e-3)
    expected = 0.7 * (a @ a.T) + 0.3 * (b @ b.T)
    assert np.allclose(both @ both.T, expected, atol=3e-3)  # float16 storage


def test_pca_keeps_inner_products_as_the_best_rank_k_approximation():
    rng = np.random.default_rng(1)
    # Vectors with a few strong directions and a common offset (as sentence embeddings have).
    x = unit(rng.normal(size=(400, 3)) @ rng.normal(size=(3, 12)) * 3
             + rng.normal(size=(400, 12)) * 0.3 + 2.0)
    basis = pca_basis(x, 3)
    assert np.allclose(basis.T @ basis, np.eye(3), atol=1e-5)
    # The uncentred rank-3 projection is the truncated SVD of x: same Gram matrix.
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    best = (u[:, :3] * s[:3]) @ (u[:, :3] * s[:3]).T
    low = x @ basis
    assert np.allclose(low @ low.T, best, atol=1e-4)
    # project() renormalises: the rows are unit vectors of the reduced space.
    reduced = project(x, basis).astype(np.float64)
    assert np.allclose(np.linalg.norm(reduced, axis=1), 1, atol=2e-3)
    assert np.array_equal(pca_basis(x, 3), basis)  # deterministic, sign included
    with pytest.raises(TrainError, match="exceeds"):
        pca_basis(x, 13)
