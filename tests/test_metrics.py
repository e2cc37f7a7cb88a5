"""Metrics against scipy's independent implementations."""

import numpy as np
import pytest
from scipy.spatial import distance
from scipy.stats import pearsonr

from pipeline.analysis import metrics as query
from pipeline.errors import UsageError


@pytest.fixture
def vectors():
    return np.random.default_rng(0).normal(size=(12, 48))


def test_pairwise_metrics_match_scipy(vectors):
    a, b = vectors[0], vectors[1]
    assert query.cosine(a, b) == pytest.approx(1 - distance.cosine(a, b), abs=1e-12)
    assert query.euclidean(a, b) == pytest.approx(distance.euclidean(a, b), abs=1e-12)
    assert query.manhattan(a, b) == pytest.approx(distance.cityblock(a, b), abs=1e-12)
    assert query.dot(a, b) == pytest.approx(float(np.dot(a, b)), abs=1e-12)
    assert query.pearson(a, b) == pytest.approx(pearsonr(a, b)[0], abs=1e-12)


@pytest.mark.parametrize("metric,scipy_metric", [
    ("cosine", "cosine"), ("euclidean", "euclidean"), ("manhattan", "cityblock"),
    ("pearson", "correlation"),
])
def test_matrix_matches_scipy(vectors, metric, scipy_metric):
    got = query.similarity_matrix(vectors, metric)
    ref = distance.cdist(vectors, vectors, scipy_metric)
    if metric in ("cosine", "pearson"):
        ref = 1 - ref  # scipy gives distances
    np.testing.assert_allclose(got, ref, atol=1e-9)


def test_matrix_dot_and_normalised_identities(vectors):
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    np.testing.assert_allclose(query.similarity_matrix(unit, "dot"),
                               query.similarity_matrix(unit, "cosine"), atol=1e-12)
    # For unit vectors, |a-b|^2 = 2 - 2 cos
    np.testing.assert_allclose(query.similarity_matrix(unit, "euclidean") ** 2,
                               2 - 2 * query.similarity_matrix(unit, "cosine"), atol=1e-9)


def test_unknown_metric(vectors):
    with pytest.raises(UsageError, match="unknown metric"):
        query.similarity_matrix(vectors, "hamming")
    with pytest.raises(UsageError, match="unknown metric"):
        query.similarity(vectors[0], vectors[1], "hamming")


def test_unit_rows_and_cosine_rows(vectors):
    unit = query.unit_rows(vectors)
    assert unit.dtype == np.float32 and unit.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1, atol=1e-6)
    assert query.unit_rows(np.zeros((2, 3))).tolist() == [[0.0] * 3] * 2  # zero rows stay zero
    assert query.unit_rows(vectors, np.float64).dtype == np.float64
    np.testing.assert_allclose(query.cosine_rows(vectors[:6], vectors[6:]),
                               [1 - distance.cosine(a, b)
                                for a, b in zip(vectors[:6], vectors[6:], strict=True)],
                               atol=1e-12)


def test_one_pearson_for_vectors_and_scores():
    from pipeline.analysis import evaluate

    assert evaluate.pearson is query.pearson  # evaluate's correlations use this one
    assert query.pearson(np.ones(5), np.arange(5)) == 0.0  # constant input: 0, not NaN
    assert query.higher_is_similar("cosine") and not query.higher_is_similar("manhattan")


def test_adjusted_rand_index_hand_example():
    # a = {0,1,2}{3,4,5}, b = {0,1}{2,3}{4,5}. Contingency [[2,1,0],[0,1,2]]:
    # sum C(n_ij,2) = 1+1 = 2; rows C(3,2)*2 = 6; cols C(2,2)*3 = 3; C(6,2) = 15;
    # expected = 6*3/15 = 1.2; max = (6+3)/2 = 4.5; ARI = (2-1.2)/(4.5-1.2) = 8/33.
    assert query.adjusted_rand_index([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == \
        pytest.approx(8 / 33)
    assert query.adjusted_rand_index([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(4 / 7)
    # Renaming clusters changes nothing.
    assert query.adjusted_rand_index([0, 0, 1, 1, 2], [5, 5, 3, 3, 9]) == 1.0
