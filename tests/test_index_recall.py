"""Exact search (the reference every index is measured against) and recall@k."""

import numpy as np
import pytest
from helpers_index import brute_force, random_unit_vectors

from pipeline.index import recall


def test_exact_neighbours_streams_blocks_and_matches_full_sort():
    x = random_unit_vectors(2_000, 16, seed=1)
    x[1500:1510] = x[3]  # exact duplicates: ties must go to the lower row
    q = random_unit_vectors(50, 16, seed=2)
    q[0] = x[3]
    want_scores, want_ids = brute_force(x, q, 20)
    for vectors in (x, (x[i:i + 300] for i in range(0, len(x), 300))):
        scores, ids = recall.exact_neighbours(vectors, q, 20, block_rows=128)
        np.testing.assert_allclose(scores, np.take_along_axis(want_scores, want_ids, 1),
                                   atol=1e-5)
        np.testing.assert_array_equal(ids, want_ids)
    assert list(ids[0, :11]) == [3, *range(1500, 1510)]


@pytest.mark.parametrize("block_rows", [7, 128, 1000, 4096])
def test_exact_neighbours_ties_go_to_the_lower_row_at_the_kth_place(block_rows):
    # 40 copies of one vector, spread over blocks and block positions (a BLAS matmul scores
    # copies a last bit apart depending on where in its block a row falls): k cuts the tie.
    x = random_unit_vectors(3_000, 48, seed=4)
    copies = np.array([3, *range(1493, 1521), *range(2990, 3000), 37])
    x[copies] = x[3]
    q = x[[3, 3, 5]]
    q[1] *= 0.5  # the tie holds for a scaled query too
    for k in (1, 5, 12, 39):
        scores, ids = recall.exact_neighbours(x, q, k, block_rows=block_rows)
        np.testing.assert_array_equal(ids[0], np.sort(copies)[:k])
        np.testing.assert_array_equal(ids[1], np.sort(copies)[:k])
        assert len(set(scores[0].tolist())) == 1  # equal vectors, equal scores


def test_exact_inner_equal_vectors_get_equal_bits_and_exact_values():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((3, 384), dtype=np.float32)
    row = rng.standard_normal(384, dtype=np.float32)
    candidates = np.repeat(row[None, None, :], 3, axis=0).repeat(50, axis=1)
    scores = recall.exact_inner(q, candidates)
    assert (scores == scores[:, :1]).all()
    np.testing.assert_allclose(scores[:, 0], q.astype(np.float64) @ row.astype(np.float64),
                               rtol=1e-12)


def test_exact_neighbours_with_fewer_rows_than_k():
    scores, ids = recall.exact_neighbours(random_unit_vectors(3, 8), random_unit_vectors(2, 8), 5)
    assert (ids[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    assert sorted(ids[0, :3]) == [0, 1, 2]


def test_recall_at_k_counts_ties_but_not_misses():
    true_ids = np.array([[1, 2, 3]])
    true_scores = np.array([[0.9, 0.8, 0.7]])
    # row 7 ties row 3 exactly; row 9 scores lower; -1 is a missing result
    assert recall.recall_at_k(np.array([[1, 2, 7]]), true_ids, 3) == pytest.approx(2 / 3)
    assert recall.recall_at_k(np.array([[1, 2, 7]]), true_ids, 3,
                          np.array([[0.9, 0.8, 0.7]]), true_scores) == 1.0
    assert recall.recall_at_k(np.array([[1, 9, -1]]), true_ids, 3,
                          np.array([[0.9, 0.6, -np.inf]]), true_scores) == pytest.approx(1 / 3)


def test_drop_self_removes_own_row_wherever_it_is():
    ids = np.array([[5, 0, 6], [7, 8, 1], [2, 3, 4]])
    kept = recall.drop_self(ids, np.array([0, 1, 9]), 2)
    np.testing.assert_array_equal(kept, [[5, 6], [7, 8], [2, 3]])
