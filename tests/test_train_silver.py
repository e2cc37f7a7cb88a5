"""Teacher-labelled silver pairs (pipeline/train/silver.py) against brute-force references."""

import numpy as np

from pipeline.train.silver import calibration, neighbours, pick_pairs, to_scores


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_neighbours_are_the_exact_nearest_others():
    rng = np.random.default_rng(0)
    vectors = unit(rng.normal(size=(300, 16)))
    anchors = rng.choice(300, size=40, replace=False)
    ids, sims = neighbours(vectors, anchors, k=5, chunk=7)
    for row, a in enumerate(anchors):
        scores = vectors @ vectors[a]
        scores[a] = -np.inf
        assert list(ids[row]) == list(np.argsort(-scores, kind="stable")[:5])
        assert np.allclose(sims[row], np.sort(scores)[::-1][:5], atol=1e-5)


def test_pairs_span_ranks_and_a_random_other_with_true_cosines():
    rng = np.random.default_rng(1)
    vectors = unit(rng.normal(size=(200, 8)))
    anchors = np.arange(20)
    ids, sims = neighbours(vectors, anchors, k=10)
    first, second, cos = pick_pairs(anchors, ids, sims, vectors, seed=3, ranks=(1, 3, 10, 30))
    assert len(first) == 20 * 4  # ranks 1, 3, 10 and the random one (30 > k is skipped)
    assert np.all(first != second)
    assert np.allclose(cos, (vectors[first] * vectors[second]).sum(1), atol=1e-5)
    again = pick_pairs(anchors, ids, sims, vectors, seed=3, ranks=(1, 3, 10, 30))
    assert all(np.array_equal(x, y) for x, y in zip((first, second, cos), again, strict=True))


def test_calibration_maps_cosines_onto_the_gold_scale_monotonically():
    cos = np.linspace(0.1, 0.9, 50)
    gold = 6.0 * cos - 0.5
    a, b = calibration(cos, gold)
    assert abs(a - 6.0) < 1e-6 and abs(b + 0.5) < 1e-6
    scores = to_scores(np.array([-1.0, 0.5, 2.0]), a, b)
    assert np.allclose(scores, [0.0, 2.5, 5.0])
