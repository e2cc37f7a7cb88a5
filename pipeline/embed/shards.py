"""Embedding shards: each is made from the token shard of the same name, same rows, same
order, and written block by block as its vectors come back.

Embedding shard columns: row, doc_id, chunk, embedding (FixedSizeList<float32|float16>[dim],
L2-normalised).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.errors import UsageError
from pipeline.hashing import file_sha256
from pipeline.parquet import atomic_table_writer, vectors_to_arrow

DTYPES = {"float32": np.float32, "float16": np.float16}  # stored vector types (`--dtype`)


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}")


def shard_tokens(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """A token shard's `tokens` column as (flat ids, offsets): Arrow's own layout, no copies."""
    tokens = table["tokens"].combine_chunks()
    offsets = tokens.offsets.to_numpy().astype(np.int64)
    values = tokens.values.to_numpy()[offsets[0]:offsets[-1]]
    return values, offsets - offsets[0]


def embedding_table(table: pa.Table, vectors: np.ndarray) -> pa.Table:
    """The embedding shard of a token shard: same rows, same order."""
    return pa.table({"row": table["row"], "doc_id": table["doc_id"], "chunk": table["chunk"],
                     "embedding": vectors_to_arrow(vectors)})


def write_embedding_shard(path: Path, table: pa.Table, vector_blocks) -> dict:
    """Write the embedding shard of token shard `table` from `vector_blocks`, its vectors as
    (first row, vectors) blocks in row order (`PendingVectors.parts`), each as it comes."""
    # Uncompressed: vectors barely compress (docs/performance.md).
    with atomic_table_writer(path, compression="none", vector_column="embedding") as write:
        for first, vectors in vector_blocks:
            write(embedding_table(table.slice(first, len(vectors)), vectors))
    return {"rows": table.num_rows, "sha256": file_sha256(path)}
