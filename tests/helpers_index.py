"""Index folders with embeddings, written without the tokenize/embed stages.

The files follow the embed stage's format: manifest.json (tokenize shard records, embed
identity and shard hashes) and embeddings/part-NNNNN.parquet with row, doc_id, chunk and
embedding columns, rows in order, one embedding shard per token shard.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline import parquet as shards
from pipeline.hashing import file_sha256

DEFAULT_IDENTITY = {"model": "random:test", "model_sha256": "0" * 64, "pooling": "mean",
                    "dim": None, "max_tokens": 128}


def random_unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_embedded_folder(index_dir: str | Path, vectors: np.ndarray, shard_rows: int = 1000,
                          identity: dict | None = None) -> dict:
    """Write `vectors` as embedding shards of `shard_rows` rows plus a manifest; return it."""
    index_dir = Path(index_dir)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    identity = {**DEFAULT_IDENTITY, "dim": int(vectors.shape[1]), **(identity or {})}
    token_records, embed_records = [], {}
    for number, lo in enumerate(range(0, len(vectors), shard_rows)):
        block = vectors[lo:lo + shard_rows]
        name = shards.shard_name(number)
        rows = np.arange(lo, lo + len(block), dtype=np.int64)
        table = pa.table({"row": pa.array(rows),
                          "doc_id": pa.array([f"doc-{r}" for r in rows], pa.string()),
                          "chunk": pa.array(np.zeros(len(block), np.int32)),
                          "embedding": shards.vectors_to_arrow(block)})
        path = shards.atomic_write_table(table, index_dir / shards.EMBEDDINGS_DIR / name)
        token_records.append({"name": name, "first_row": lo, "rows": len(block),
                              "docs": len(block), "sha256": "x"})
        embed_records[name] = {"rows": len(block), "sha256": file_sha256(path)}
    manifest = {"format_version": shards.FORMAT_VERSION, "tokenize": {"shards": token_records},
                "embed": {"identity": identity, "dtype": "float32", "shards": embed_records}}
    shards.write_manifest(index_dir, manifest)
    return manifest
