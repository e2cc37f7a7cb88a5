import io
import json

import faiss
import numpy as np
import pytest
from helpers_index import random_unit_vectors, write_embedded_folder
from rich.console import Console

from pipeline.errors import IndexKeyError
from pipeline.folder import sample_rows
from pipeline.index import build, choice, recall, store
from pipeline.parquet import IndexFolderError, read_manifest


def brute_force(vectors, queries, k, exclude=None):
    """Reference: full float64 score matrix, optionally without each query's own row."""
    scores = np.asarray(queries, np.float64) @ np.asarray(vectors, np.float64).T
    if exclude is not None:
        scores[np.arange(len(queries)), exclude] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return scores, order


def tie_aware_recall(scores, found, true_order, k):
    """Independent recall: a found row is right if its float64 score ties the k-th true one."""
    kth = np.take_along_axis(scores, true_order[:, k - 1:k], axis=1)
    found_scores = np.take_along_axis(scores, np.where(found >= 0, found, 0), axis=1)
    return float(((found >= 0) & (found_scores >= kth - 1e-5)).mean())


def search_without_self(index, x, rows, k):
    """The index's top k for rows of x, each query's own row removed (plain Python)."""
    _, found = index.search(x[rows], k + 1)
    return np.array([[f for f in hits if f != row][:k]
                     for hits, row in zip(found, rows, strict=True)])


def clustered_unit_vectors(n, dim, clusters, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(clusters, size=n)] + 0.35 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# --- index choice ------------------------------------------------------------------------------

BIG = 1 << 40


@pytest.mark.parametrize(("n", "dim", "memory", "key"), [
    (1_000, 384, None, "Flat"),
    (87_381, 384, None, "Flat"),               # 2**25 floats: the last exact size
    (87_382, 384, BIG, "HNSW32"),
    (1_000_000, 384, BIG, "HNSW32"),
    (1_000_001, 384, BIG, "IVF4096,Flat"),     # beyond HNSW's build-time cap
    # 1M x 384 takes 1.81 GB as HNSW32, 1.54 as IVF-Flat, 0.87 as PQ + float16 refinement,
    # 0.39 as SQ8 and 0.10 as PQ96
    (1_000_000, 384, 1_600_000_000, "IVF4096,Flat"),
    (1_000_000, 384, 1_000_000_000, "IVF4096,PQ96x8,Refine(SQfp16)"),
    (1_000_000, 384, 500_000_000, "IVF4096,SQ8"),
    (1_000_000, 384, 200_000_000, "IVF4096,PQ96x8"),
    (1_000_000, 384, 50_000_000, "IVF4096,PQ96x8"),     # nothing fits: the smallest
    (10_000_000, 768, BIG, "IVF16384,Flat"),
    (100_000_000, 128, BIG, "IVF32768,Flat"),
])
def test_choose_index_key(n, dim, memory, key):
    assert choice.choose_index_key(n, dim, memory) == key
    made = choice.make_index(dim, key)  # every choice is a valid inner-product factory string
    assert made.metric_type == faiss.METRIC_INNER_PRODUCT


@pytest.mark.parametrize(("n", "nlist"), [
    (100_000, 1024), (1_000_000, 4096), (4_000_000, 8192), (2_000, 32), (50, 1), (1, 1)])
def test_ivf_lists_near_four_sqrt_n_power_of_two(n, nlist):
    assert choice.ivf_lists(n) == nlist


@pytest.mark.parametrize(("dim", "m"), [(384, 96), (768, 192), (64, 16), (100, 25), (7, 1)])
def test_pq_subquantizers_divide_dim(dim, m):
    assert choice.pq_subquantizers(dim) == m


@pytest.mark.parametrize("key", ["Bogus", "IVF,Flat", "", "  ", "IDMap,Flat", "IVF16,PQ7"])
def test_bad_key_is_a_one_line_error(key):
    with pytest.raises(IndexKeyError) as err:
        choice.make_index(32, key)
    message = str(err.value)
    assert "\n" not in message and "index_factory" not in message


def test_ivf_with_more_lists_than_vectors_is_refused():
    with pytest.raises(IndexKeyError, match="IVF4096 needs at least 4096 vectors"):
        build.build_index(random_unit_vectors(1000, 16), "IVF4096,Flat")


# --- exact search and recall -------------------------------------------------------------------

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


def test_recorded_recall_is_measured_not_assumed():
    x = clustered_unit_vectors(5_000, 32, clusters=20)
    # A target this low stops tuning at its first step: one list of 64 probed.
    index, info = build.build_index(x, "IVF64,Flat", target_recall=0.01, n_queries=500)
    assert info["params"] == {"nprobe": 1} and info["tuning"][0]["nprobe"] == 1
    assert 0.2 < info["recall"] < 0.99
    rows = sample_rows(len(x), 500, seed=0)
    found = search_without_self(index, x, rows, 10)
    scores, true_order = brute_force(x, x[rows], 10, exclude=rows)
    assert info["recall"] == pytest.approx(tie_aware_recall(scores, found, true_order, 10),
                                           abs=1e-4)


def check_held_out_recall(index, x, target):
    """Recall on queries the tuning never saw, in the reference's own arithmetic."""
    rows = sample_rows(len(x), 300, seed=99)
    found = search_without_self(index, x, rows, 10)
    scores, true_order = brute_force(x, x[rows], 10, exclude=rows)
    assert tie_aware_recall(scores, found, true_order, 10) >= target - 0.03


def test_forced_ivf_reaches_target_recall_on_50k_random_vectors():
    x = random_unit_vectors(50_000, 64, seed=6)
    index, info = build.build_index(x, "IVF256,Flat", target_recall=0.95)
    assert info["target_met"] and info["recall"] >= 0.95
    assert 1 < info["params"]["nprobe"] < 256  # tuned, and less than scanning every list
    assert faiss.extract_index_ivf(index).nprobe == info["params"]["nprobe"]
    check_held_out_recall(index, x, 0.95)
    ivf = faiss.extract_index_ivf(index)
    ivf.make_direct_map()
    rows = np.array([0, 1, 12_345, 49_999])
    np.testing.assert_array_equal(np.stack([index.reconstruct(int(r)) for r in rows]), x[rows])


def test_forced_hnsw_reaches_target_recall_on_50k_random_vectors():
    x = random_unit_vectors(50_000, 64, seed=7)
    index, info = build.build_index(x, "HNSW32", target_recall=0.95)
    assert info["target_met"] and info["recall"] >= 0.95
    assert faiss.downcast_index(index).hnsw.efSearch == info["params"]["efSearch"]
    check_held_out_recall(index, x, 0.95)
    np.testing.assert_array_equal(index.reconstruct_n(0, len(x)), x)


def test_pq_with_refinement_reaches_target_recall():
    x = clustered_unit_vectors(10_000, 32, clusters=50, seed=18)
    index, info = build.build_index(x, "IVF64,PQ8x8,Refine(SQfp16)", target_recall=0.95,
                                 n_queries=500)
    assert info["target_met"] and info["params"]["k_factor_rf"] == choice.REFINE_K_FACTOR
    assert faiss.downcast_index(index).k_factor == choice.REFINE_K_FACTOR
    check_held_out_recall(index, x, 0.95)


def test_unreachable_target_is_reported_not_hidden():
    x = random_unit_vectors(5_000, 32, seed=8)
    _, info = build.build_index(x, "IVF16,SQ4", target_recall=0.99, n_queries=200)
    assert info["target_met"] is False and info["recall"] < 0.99
    assert info["recall"] == max(t["recall"] for t in info["tuning"])


@pytest.mark.parametrize(("n", "recall_k", "recall"), [(1, 0, None), (5, 4, 1.0)])
def test_tiny_corpora_measure_what_they_can(n, recall_k, recall):
    index, info = build.build_index(random_unit_vectors(n, 8))
    assert index.ntotal == n and info["recall_k"] == recall_k and info["recall"] == recall


# --- index folders -----------------------------------------------------------------------------

def test_run_build_index_writes_skips_and_loads(tmp_path):
    x = clustered_unit_vectors(4_000, 32, clusters=10, seed=9)
    write_embedded_folder(tmp_path, x, shard_rows=1_500)
    info = build.run_build_index(tmp_path, index_key="IVF32,Flat", target_recall=0.9)
    written = json.loads((tmp_path / "index.json").read_text())
    assert written == info
    assert info["embed_identity"]["model_sha256"] == "0" * 64
    assert info["embeddings"]["rows"] == 4_000 and info["recall"] >= 0.9

    mtime = (tmp_path / "index.faiss").stat().st_mtime_ns
    again = build.run_build_index(tmp_path, index_key="IVF32,Flat", target_recall=0.9)
    assert again["skipped"] and (tmp_path / "index.faiss").stat().st_mtime_ns == mtime

    index, loaded = store.load_index(tmp_path)
    assert loaded == info and index.ntotal == 4_000
    assert faiss.extract_index_ivf(index).nprobe == info["params"]["nprobe"]
    # the parameters come from index.json, not whatever the file happened to store
    (tmp_path / "index.json").write_text(json.dumps({**info, "params": {"nprobe": 7}}))
    assert faiss.extract_index_ivf(store.load_index(tmp_path)[0]).nprobe == 7

    exact = build.run_build_index(tmp_path, index_key="Flat", target_recall=0.9)
    assert "skipped" not in exact and exact["key"] == "Flat"
    forced = build.run_build_index(tmp_path, index_key="Flat", target_recall=0.9, force=True)
    assert "skipped" not in forced


def test_loaded_index_rows_match_input_rows_across_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "ADD_BLOCK_ROWS", 600)  # several add() calls, across shard edges
    x = random_unit_vectors(2_500, 16, seed=10)
    write_embedded_folder(tmp_path, x, shard_rows=700)
    shown = Console(file=io.StringIO(), width=200)
    build.run_build_index(tmp_path, console=shown)
    assert "index: Flat over 2,500 x 16, exact, recall@10 1.0" in shown.file.getvalue()
    index, _ = store.load_index(tmp_path)
    _, top = index.search(x, 1)
    np.testing.assert_array_equal(top[:, 0], np.arange(len(x)))


def test_new_embeddings_make_the_index_stale(tmp_path):
    write_embedded_folder(tmp_path, random_unit_vectors(1_000, 16, seed=11))
    build.run_build_index(tmp_path)
    write_embedded_folder(tmp_path, random_unit_vectors(1_000, 16, seed=12))  # re-embedded
    with pytest.raises(IndexFolderError, match="stale.*build-index"):
        store.load_index(tmp_path)
    assert "skipped" not in build.run_build_index(tmp_path)
    store.load_index(tmp_path)


def test_other_model_makes_the_index_stale(tmp_path):
    x = random_unit_vectors(1_000, 16, seed=13)
    write_embedded_folder(tmp_path, x)
    build.run_build_index(tmp_path)
    write_embedded_folder(tmp_path, x, identity={"model_sha256": "1" * 64})
    with pytest.raises(IndexFolderError, match="stale"):
        store.load_index(tmp_path)


def test_index_file_not_matching_its_info_is_refused(tmp_path):
    write_embedded_folder(tmp_path, random_unit_vectors(1_000, 16, seed=14))
    build.run_build_index(tmp_path)
    with open(tmp_path / "index.faiss", "ab") as fh:
        fh.write(b"junk")
    with pytest.raises(IndexFolderError, match="does not match"):
        store.load_index(tmp_path)


def test_missing_pieces_are_index_folder_errors(tmp_path):
    with pytest.raises(IndexFolderError, match="manifest"):
        build.run_build_index(tmp_path)
    manifest = write_embedded_folder(tmp_path, random_unit_vectors(2_000, 16, seed=15))
    with pytest.raises(IndexFolderError, match="build-index"):
        store.load_index(tmp_path)
    del manifest["embed"]["shards"]["part-00001.parquet"]  # embed stage not finished
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexFolderError, match="embeddings are incomplete"):
        build.run_build_index(tmp_path)


def test_bad_key_fails_before_writing(tmp_path):
    write_embedded_folder(tmp_path, random_unit_vectors(500, 16, seed=16))
    with pytest.raises(IndexKeyError, match="invalid index key 'IVF,Flat'"):
        build.run_build_index(tmp_path, index_key="IVF,Flat")
    assert not (tmp_path / "index.faiss").exists() and not (tmp_path / "index.json").exists()
    assert read_manifest(tmp_path)["embed"]  # the folder is untouched


# --- range search ------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["Flat", "HNSW16", "IVF16,Flat"])
def test_range_search_finds_every_pair_above_threshold(key):
    x = clustered_unit_vectors(3_000, 16, clusters=30, seed=17)
    index, _ = build.build_index(x, key, target_recall=0.9, n_queries=100)
    if key.startswith("IVF"):
        faiss.extract_index_ivf(index).nprobe = 16  # every list: exact
    q = x[:50]
    lims, scores, ids = store.range_search(index, q, 0.9)
    ref = q.astype(np.float64) @ x.astype(np.float64).T
    for i in range(len(q)):
        got = set(ids[lims[i]:lims[i + 1]].tolist())
        sure = set(np.flatnonzero(ref[i] > 0.9 + 1e-5))
        maybe = set(np.flatnonzero(ref[i] > 0.9 - 1e-5))
        assert sure <= got <= maybe
