"""Parquet on disk: vector columns, atomic writes, manifests.

Vectors are stored as a FixedSizeList<float32|float16>[dim] column, which Arrow reads back
as one contiguous buffer (zero-copy into numpy). A file is written to `NAME.tmp` and renamed,
so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FORMAT_VERSION = 1


def vectors_to_arrow(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """(N, D) float array -> FixedSizeList array of N lists of D values, no copy."""
    vectors = np.ascontiguousarray(vectors)
    n, dim = vectors.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)


def arrow_to_vectors(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """FixedSizeList column -> (N, D) numpy array (float32 or float16 as stored)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(-1, dim)


def atomic_write_table(table: pa.Table, path: str | Path, compression: str = "zstd") -> Path:
    """Write to a temp file in the same folder, fsync, then rename over the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression=compression)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(path)
    return path


def atomic_write_json(data: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def write_vectors_table(path: str | Path, ids: Sequence, texts: Sequence[str],
                        vectors: np.ndarray, metadata: dict | None = None) -> Path:
    """id, text, embedding columns; `metadata` (what made the vectors) in the schema."""
    table = pa.table({"id": pa.array(ids), "text": pa.array(texts, pa.string()),
                      "embedding": vectors_to_arrow(vectors)})
    if metadata:
        table = table.replace_schema_metadata({"pipeline": json.dumps(metadata)})
    return atomic_write_table(table, path)


def read_table_metadata(path: str | Path) -> dict:
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(b"pipeline")
    return json.loads(raw) if raw else {}
