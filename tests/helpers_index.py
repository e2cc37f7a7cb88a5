"""Index folders with embeddings, written without the tokenize/embed stages, and the
brute-force references the index tests check against.

The files follow the embed stage's format: manifest.json (tokenize shard records, embed
identity and shard hashes) and embeddings/part-NNNNN.parquet with row, doc_id, chunk and
embedding columns, rows in order, one embedding shard per token shard.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.folder import FORMAT_VERSION, IndexFolder, shard_name
from pipeline.hashing import file_sha256
from pipeline.parquet import atomic_write_table, vectors_to_arrow

DEFAULT_IDENTITY = {"model": "random:test", "model_sha256": "0" * 64, "pooling": "mean",
                    "dim": None, "max_tokens": 128}


def random_unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered_unit_vectors(n, dim, clusters, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(clusters, size=n)] + 0.35 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force(vectors, queries, k, exclude=None):
    """Reference: full float64 score matrix, optionally without each query's own row."""
    scores = np.asarray(queries, np.float64) @ np.asarray(vectors, np.float64).T
    if exclude is not None:
        scores[np.arange(len(queries)), exclude] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return scores, order


def write_embedded_folder(index_dir: str | Path, vectors: np.ndarray, shard_rows: int = 1000,
                          identity: dict | None = None) -> dict:
    """Write `vectors` as embedding shards of `shard_rows` rows plus a manifest; return it."""
    folder = IndexFolder(index_dir)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    identity = {**DEFAULT_IDENTITY, "dim": int(vectors.shape[1]), **(identity or {})}
    token_records, embed_records = [], {}
    for number, lo in enumerate(range(0, len(vectors), shard_rows)):
        block = vectors[lo:lo + shard_rows]
        name = shard_name(number)
        rows = np.arange(lo, lo + len(block), dtype=np.int64)
        table = pa.table({"row": pa.array(rows),
                          "doc_id": pa.array([f"doc-{r}" for r in rows], pa.string()),
                          "chunk": pa.array(np.zeros(len(block), np.int32)),
                          "embedding": vectors_to_arrow(block)})
        path = atomic_write_table(table, folder.embeddings_dir / name)
        token_records.append({"name": name, "first_row": lo, "rows": len(block),
                              "docs": len(block), "sha256": "x"})
        embed_records[name] = {"rows": len(block), "sha256": file_sha256(path)}
    manifest = {"format_version": FORMAT_VERSION, "tokenize": {"shards": token_records,
                                                         "settings": {"max_tokens": 256}},
                "embed": {"identity": identity, "dtype": "float32", "shards": embed_records}}
    folder.write_manifest(manifest)
    return manifest


def assert_same_search(index_dir_a, index_dir_b, queries, k: int = 10) -> None:
    """Both folders' indexes, loaded as search loads them, give the same rows and scores."""
    from pipeline.index.store import load_search_index

    a, _ = load_search_index(index_dir_a)
    b, _ = load_search_index(index_dir_b)
    scores_a, rows_a = a.search(queries, k)
    scores_b, rows_b = b.search(queries, k)
    np.testing.assert_array_equal(rows_a, rows_b)
    np.testing.assert_array_equal(scores_a, scores_b)
