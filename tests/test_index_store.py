"""Loading a built index (refused when stale or damaged), writing one (a failed write leaves the
previous index), and range search."""

import errno
import json
import os
import re
from pathlib import Path

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


# --- a damaged index.faiss, and writes that fail ------------------------------------------

def built_folder(path, seed=20):
    write_embedded_folder(path, random_unit_vectors(1_000, 16, seed=seed))
    build.run_build_index(path)
    return {name: (path / name).read_bytes() for name in ("index.faiss", "index.json")}


def test_flipped_index_bytes_are_refused_and_rebuilt(tmp_path):
    built_folder(tmp_path)
    data = bytearray((tmp_path / "index.faiss").read_bytes())
    data[len(data) // 2] ^= 0xFF  # a byte of a stored vector: same size, FAISS reads it
    (tmp_path / "index.faiss").write_bytes(bytes(data))
    hint = f"run `pipeline build-index --index {tmp_path} --force`"
    with pytest.raises(IndexFolderError, match=f"index.faiss is damaged.*{re.escape(hint)}"):
        store.load_index(tmp_path)
    assert "skipped" not in build.run_build_index(tmp_path)  # a damaged index is not current
    store.load_index(tmp_path)


def test_index_json_of_another_version_or_not_json_is_rebuilt(tmp_path):
    built_folder(tmp_path)
    info = json.loads((tmp_path / "index.json").read_text())
    (tmp_path / "index.json").write_text(json.dumps({**info, "format_version": 1}))
    with pytest.raises(IndexFolderError, match="format version 1.*--force"):
        store.load_index(tmp_path)
    assert "skipped" not in build.run_build_index(tmp_path)
    (tmp_path / "index.json").write_text('{"format_version": 2, "key": "Fl')  # cut short
    with pytest.raises(IndexFolderError, match="index.json is not JSON.*--force"):
        store.load_index(tmp_path)
    assert "skipped" not in build.run_build_index(tmp_path)
    store.load_index(tmp_path)


def failing_rename(monkeypatch, name):
    """os.replace failing (as on a full disk) when it would rename NAME.tmp over NAME."""
    real = os.replace

    def replace(src, dst):
        if Path(src).name == f"{name}.tmp":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def test_failed_index_write_keeps_the_previous_index(tmp_path, monkeypatch):
    built = built_folder(tmp_path)
    write_embedded_folder(tmp_path, random_unit_vectors(1_000, 16, seed=21))  # re-embedded
    failing_rename(monkeypatch, "index.faiss")
    with pytest.raises(OSError, match="No space left"):
        build.run_build_index(tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in built} == built
    assert not list(tmp_path.glob("*.tmp"))


def test_new_index_beside_the_old_index_json_is_refused(tmp_path, monkeypatch):
    """A crash between the two renames: the new index.faiss beside the old index.json."""
    built = built_folder(tmp_path)
    failing_rename(monkeypatch, "index.json")
    with pytest.raises(OSError, match="No space left"):
        build.run_build_index(tmp_path, index_key="HNSW16", force=True)
    monkeypatch.undo()
    assert (tmp_path / "index.json").read_bytes() == built["index.json"]
    assert (tmp_path / "index.faiss").read_bytes() != built["index.faiss"]
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(IndexFolderError, match="index.faiss (does not match|is damaged).*--force"):
        store.load_index(tmp_path)
    assert "skipped" not in build.run_build_index(tmp_path)  # Flat, as index.json says
    assert store.load_index(tmp_path)[1]["key"] == "Flat"
