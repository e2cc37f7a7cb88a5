"""Building and tuning an index, and the build-index stage over an index folder."""

import io
import json

import faiss
import numpy as np
import pytest
from helpers_index import (
    brute_force,
    clustered_unit_vectors,
    random_unit_vectors,
    write_embedded_folder,
)
from rich.console import Console

from pipeline.errors import IndexFolderError, IndexKeyError
from pipeline.folder import IndexFolder, sample_rows
from pipeline.index import build, choice, store


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


def check_held_out_recall(index, x, target):
    """Recall on queries the tuning never saw, in the reference's own arithmetic."""
    rows = sample_rows(len(x), 300, seed=99)
    found = search_without_self(index, x, rows, 10)
    scores, true_order = brute_force(x, x[rows], 10, exclude=rows)
    assert tie_aware_recall(scores, found, true_order, 10) >= target - 0.03


def test_ivf_with_more_lists_than_vectors_is_refused():
    with pytest.raises(IndexKeyError, match="IVF4096 needs at least 4096 vectors"):
        build.build_index(random_unit_vectors(1000, 16), "IVF4096,Flat")


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


# --- the build-index stage over an index folder ---------------------------------------

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
    assert IndexFolder(tmp_path).manifest["embed"]  # the folder is untouched


def flip_middle_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the sha256 tells
    path.write_bytes(bytes(data))


def test_damaged_or_missing_embedding_shard_is_refused(tmp_path):
    write_embedded_folder(tmp_path, random_unit_vectors(2_000, 16, seed=18), shard_rows=700)
    shard = tmp_path / "embeddings" / "part-00001.parquet"
    flip_middle_byte(shard)  # a byte of a stored vector: Parquet reads it without complaint
    with pytest.raises(IndexFolderError, match=f"{shard} is damaged.*run `pipeline embed "
                                               f"--index {tmp_path}` to redo it"):
        build.run_build_index(tmp_path)
    shard.unlink()
    with pytest.raises(IndexFolderError, match=f"{shard} is missing"):
        build.run_build_index(tmp_path)
    assert not (tmp_path / "index.faiss").exists() and not (tmp_path / "index.json").exists()


def test_each_embedding_shard_is_hashed_once_per_build(tmp_path, monkeypatch):
    write_embedded_folder(tmp_path, random_unit_vectors(2_000, 16, seed=19), shard_rows=700)
    hashed = []
    real = store.file_sha256

    def counting(path):
        hashed.append(path.name)
        return real(path)

    for module in ("pipeline.folder", "pipeline.index.store"):
        monkeypatch.setattr(f"{module}.file_sha256", counting)
    build.run_build_index(tmp_path)
    shards = [f"part-{n:05d}.parquet" for n in range(3)]
    assert sorted(hashed) == ["index.faiss.tmp", *shards]  # and the index, once, as written
    hashed.clear()
    assert build.run_build_index(tmp_path)["skipped"]
    assert hashed == ["index.faiss"]  # current: the index file is checked, no shard read
