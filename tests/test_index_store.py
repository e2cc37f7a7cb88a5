"""Loading a built index (refused when stale or damaged), and range search."""

import faiss
import numpy as np
import pytest
from helpers_index import clustered_unit_vectors, random_unit_vectors, write_embedded_folder

from pipeline.errors import IndexFolderError
from pipeline.index import build, store


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
