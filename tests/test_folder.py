"""IndexFolder: the manifest read once, rows and vectors read without loading the whole index,
and one model-identity check for every stage."""

import json

import numpy as np
import pytest
from helpers_index import random_unit_vectors, write_embedded_folder

from pipeline.errors import IndexFolderError
from pipeline.folder import IndexFolder, identity_mismatch, sample_rows


@pytest.fixture
def folder(tmp_path):
    vectors = random_unit_vectors(2_500, 16, seed=7)
    write_embedded_folder(tmp_path / "idx", vectors, shard_rows=1_000)
    return IndexFolder(tmp_path / "idx"), vectors


def test_vectors_at_matches_the_full_load_in_the_order_asked(folder):
    f, vectors = folder
    rows = [2_499, 3, 1_000, 999, 3, 1_750]  # across shards, repeated, unsorted
    np.testing.assert_array_equal(f.vectors_at(rows), vectors[rows])
    np.testing.assert_array_equal(f.load_vectors(), vectors)
    assert f.vectors_at([]).shape == (0, 16)


def test_rows_outside_the_index_are_refused(folder):
    f, _ = folder
    with pytest.raises(IndexFolderError, match="no row 2500"):
        f.vectors_at([0, 2_500])


def test_manifest_is_read_once_until_reload(folder):
    f, _ = folder
    assert f.rows == 2_500
    manifest = json.loads(f.manifest_file.read_text())
    manifest["tokenize"]["shards"] = manifest["tokenize"]["shards"][:1]
    f.manifest_file.write_text(json.dumps(manifest))
    assert f.rows == 2_500  # the copy it holds
    f.reload()
    assert f.rows == 1_000


def test_missing_manifest_says_which_stage_to_run(tmp_path):
    with pytest.raises(IndexFolderError, match="run `pipeline tokenize` first"):
        IndexFolder(tmp_path).reload()


def test_check_identity_refuses_other_weights_or_pooling(folder):
    f, _ = folder
    same = dict(f.identity)
    f.check_identity(same, "unused")
    f.check_identity({"model": "moved/path", "model_sha256": same["model_sha256"]}, "unused")
    with pytest.raises(IndexFolderError, match="another model: .*: use --overwrite"):
        f.check_identity({**same, "model_sha256": "f" * 64}, "use --overwrite")
    with pytest.raises(IndexFolderError, match="another pooling"):
        f.check_identity({**same, "pooling": "max"}, "use --overwrite")


def test_identity_mismatch_ignores_keys_not_given_and_empty_records():
    recorded = {"model_sha256": "a", "pooling": "mean", "attention": "causal", "dim": 8}
    assert identity_mismatch(None, {"model_sha256": "b"}) is None
    assert identity_mismatch(recorded, {"model_sha256": "a"}) is None
    assert identity_mismatch(recorded, {"model_sha256": "a", "dim": 9}) == "dim"


def test_sample_rows_distinct_sorted_reproducible():
    rows = sample_rows(10_000, 1000, seed=3)
    assert len(set(rows)) == 1000 and (np.diff(rows) > 0).all()
    np.testing.assert_array_equal(rows, sample_rows(10_000, 1000, seed=3))
    np.testing.assert_array_equal(sample_rows(5, 1000, seed=0), np.arange(5))
