"""Parquet on disk: vector columns, atomic writes (index folders: folder.py).

Vectors are stored as a FixedSizeList<float32|float16>[dim] column, which Arrow reads back
as one contiguous buffer (zero-copy into numpy). A file is written to `NAME.tmp` and renamed,
so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def numpy_to_arrow(values: np.ndarray) -> pa.Array:
    """A 1-D numeric numpy array as an Arrow array of the same type, without a copy.

    Not `pa.array`: its first call imports pandas, where installed, to check for pandas
    types (0.2-0.45 s on a GPU host, which the first shard of `tokenize --embed` waited for).
    """
    values = np.ascontiguousarray(values)
    if values.ndim != 1 or values.dtype.kind not in "iuf":  # Arrow's bools are bits
        raise TypeError(f"expected a 1-D numeric array, got {values.dtype} {values.shape}")
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values),
                                 [None, pa.py_buffer(values)])


def strings_to_arrow(texts: Sequence[str]) -> pa.StringArray:
    """Python strings as an Arrow string array (as numpy_to_arrow, without pa.array)."""
    encoded = [text.encode("utf-8") for text in texts]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError(f"{offsets[-1]:,} bytes of text are more than one Arrow string "
                         "array holds (2 GiB)")
    return pa.Array.from_buffers(pa.string(), len(encoded), [
        None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(b"".join(encoded))])


def vectors_to_arrow(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """(N, D) float array -> FixedSizeList array of N lists of D values, no copy."""
    vectors = np.ascontiguousarray(vectors)
    n, dim = vectors.shape
    return pa.FixedSizeListArray.from_arrays(numpy_to_arrow(vectors.reshape(-1)), dim)


def arrow_to_vectors(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """FixedSizeList column -> (N, D) numpy array (float32 or float16 as stored)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(-1, dim)


def atomic_write_table(table: pa.Table, path: str | Path, compression: str = "zstd",
                       row_group_size: int | None = None, vector_column: str | None = None
                       ) -> Path:
    """Write to a temp file in the same folder, then rename over the final name
    (`atomic_table_writer`, all in one part)."""
    with atomic_table_writer(path, compression, vector_column) as write:
        write(table, row_group_size)
    return Path(path)


@contextlib.contextmanager
def atomic_table_writer(path: str | Path, compression: str = "zstd",
                        vector_column: str | None = None):
    """A function that appends a table (same schema each time) to the Parquet file `path`,
    each call one or more row groups; the file gets its final name only when the block
    ends without an error, and is removed otherwise. Lets a writer start on the first rows
    of a file while the last are still being made.

    The rename makes a killed process leave either the old file or the whole new one. There
    is no fsync (it tripled the write time of vector shards): after a power loss a stage
    finds a damaged shard through the sha256 its manifest records, and redoes it.

    `vector_column` is written without dictionary encoding and min/max statistics: neither
    helps dense vectors, and both are slow on float16 (writes went from 43 to 170 MB/s).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer: list[pq.ParquetWriter] = []  # opened by the first table: its schema

    def write(table: pa.Table, row_group_size: int | None = None) -> None:
        if not writer:
            others = [name for name in table.column_names if name != vector_column]
            writer.append(pq.ParquetWriter(str(tmp), table.schema, compression=compression,
                                           use_dictionary=others, write_statistics=others))
        writer[0].write_table(table, row_group_size=row_group_size)

    try:
        yield write
        if not writer:
            raise ValueError(f"nothing was written to {path}")
        writer[0].close()
    except BaseException:
        if writer:
            writer[0].close()
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


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
    return atomic_write_table(table, path, vector_column="embedding")
