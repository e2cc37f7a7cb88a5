"""Parquet on disk: vector columns, atomic writes (index folders: folder.py).

Vectors are stored as a FixedSizeList<float32|float16>[dim] column, which Arrow reads back
as one contiguous buffer (zero-copy into numpy). A file is written to `NAME.tmp` and renamed,
so a crash never leaves a half-written file under the final name; a full disk raises
errors.DiskFull, naming the file, and leaves no `NAME.tmp` behind.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import traceback
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DiskFull


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


# ---------------------------------------------------------------------------------------------
# Full disks: one line naming the file, not a traceback (errors.DiskFull)

# The errnos of a write that found no room: the disk is full, or the user's quota is.
NO_ROOM = (errno.ENOSPC, errno.EDQUOT)
# numpy's `tofile` (np.save) reports a short write without the errno: "N requested and M
# written", counted in items.
SHORT_WRITE = re.compile(r"(\d+) requested and (\d+) written")


def format_bytes(n: float) -> str:
    """Bytes as `df -H` shows them: 950 B, 45.1 kB, 1.2 GB (powers of 1000)."""
    units = ("B", "kB", "MB", "GB", "TB")
    power = 0
    while n >= 1000 and power < len(units) - 1:
        n, power = n / 1000, power + 1
    return f"{n:.0f} B" if power == 0 else f"{n:.1f} {units[power]}"


def free_bytes(path: str | Path) -> int | None:
    """Free space (for this user) on the filesystem of `path`, or of its nearest existing
    folder; None where it cannot be read."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def disk_full_message(path: str | Path | None, free: int | None, needed: int | None = None,
                      reason: str = "no space left on device") -> str:
    sizes = [f"{format_bytes(needed)} needed" if needed is not None else None,
             f"{format_bytes(free)} free there" if free is not None else None]
    detail = ", ".join(s for s in sizes if s)
    return (f"{reason}{f' writing {path}' if path else ''}{f' ({detail})' if detail else ''}"
            ": free some space (or write elsewhere) and run the command again")


def disk_full(path: str | Path | None, err: OSError | None = None,
              needed: int | None = None) -> DiskFull:
    """The DiskFull error for a write of `path` (None: not known) that found no room."""
    reason = "no space left on device"
    if isinstance(err, OSError) and err.errno == errno.EDQUOT:
        reason = "disk quota exceeded"
    return DiskFull(disk_full_message(path, free_bytes(path) if path else None, needed,
                                      reason))


def is_disk_full(err: BaseException) -> bool:
    """An OSError of a full disk or quota, or an error of a C++ library (FAISS) that gives
    the failed write's errno only as the C library's text in its message."""
    if isinstance(err, OSError) and err.errno in NO_ROOM:
        return True
    return isinstance(err, OSError | RuntimeError) and any(
        os.strerror(number) in str(err) for number in NO_ROOM)


def require_space(path: Path, needed: int) -> None:
    """Refuse a write of at least `needed` bytes to `path` that cannot fit, before it fills
    the disk (and makes every other writer there fail too)."""
    free = free_bytes(path)
    if free is not None and needed > free:
        raise DiskFull(disk_full_message(path, free, needed))


@contextlib.contextmanager
def disk_full_names(path: Path, clean_up: Callable[[], None]):
    """In the block, which writes `path`, a full disk runs `clean_up` (removing the partial
    file, so that the free space reported is what the user has) and raises DiskFull."""
    try:
        yield
    except OSError as err:
        if not is_disk_full(err):
            raise
        clean_up()
        raise disk_full(path, err) from err


def disk_full_error(err: BaseException) -> DiskFull | None:
    """The DiskFull to report for an exception from a write that did not go through this
    module (a FAISS index, an np.save, a report's HTML), or None where the disk is not why
    it failed. The file is found in the error, or in the traceback's open files."""
    if isinstance(err, DiskFull):
        return err
    file = written_file(err)
    if not is_disk_full(err) and not short_write_of_full_disk(err, file):
        return None
    return disk_full(file, err if isinstance(err, OSError) else None)


def written_file(err: BaseException) -> str | None:
    """The file an error came from writing: its `filename`, the file FAISS names in its
    message, else the innermost file open for writing among the traceback's variables."""
    if getattr(err, "filename", None):
        return str(err.filename)
    faiss_file = re.search(r"write error in (.+): \d+ != \d+", str(err))
    if faiss_file:
        return faiss_file.group(1)
    frames = [frame for frame, _ in traceback.walk_tb(err.__traceback__)]
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            name, mode = getattr(value, "name", None), getattr(value, "mode", "")
            if isinstance(value, io.IOBase) and isinstance(name, str) and isinstance(
                    mode, str) and set(mode) & set("wax+"):
                return name
    return None


def short_write_of_full_disk(err: BaseException, file: str | None) -> bool:
    """numpy's short write of `file`, on a disk with less room than the part not written
    (at least one byte an item)."""
    match = SHORT_WRITE.fullmatch(str(err)) if isinstance(err, OSError) else None
    if match is None or file is None:
        return False
    free = free_bytes(file)
    return free is not None and free < int(match.group(1)) - int(match.group(2))


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
                        vector_column: str | None = None, plain_columns: Collection[str] = ()):
    """A function that appends a table (same schema each time) to the Parquet file `path`,
    each call one or more row groups; the file gets its final name only when the block
    ends without an error, and is removed otherwise. Lets a writer start on the first rows
    of a file while the last are still being made.

    The rename makes a killed process leave either the old file or the whole new one. There
    is no fsync (it tripled the write time of vector shards): after a power loss a stage
    finds a damaged shard through the sha256 its manifest records, and redoes it.

    `vector_column` is written without dictionary encoding and min/max statistics: neither
    helps dense vectors, and both are slow on float16 (writes went from 43 to 170 MB/s).
    So are `plain_columns` (the thousands of score columns of a similarity matrix).

    A full disk raises DiskFull naming `path`, with the temp file removed; uncompressed
    vectors that cannot fit in the space left are refused before a byte of them is written.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    writer: list[pq.ParquetWriter] = []  # opened by the first table: its schema

    def discard() -> None:
        if writer:
            with contextlib.suppress(OSError):  # a full disk may fail the close as well
                writer.pop().close()
        tmp.unlink(missing_ok=True)

    def write(table: pa.Table, row_group_size: int | None = None) -> None:
        if compression == "none" and vector_column is not None:
            require_space(path, table.column(vector_column).nbytes)
        with disk_full_names(path, discard):
            if not writer:
                plain = {vector_column, *plain_columns}
                others = [name for name in table.column_names if name not in plain]
                writer.append(pq.ParquetWriter(str(tmp), table.schema,
                                               compression=compression,
                                               use_dictionary=others, write_statistics=others))
            writer[0].write_table(table, row_group_size=row_group_size)

    try:
        with disk_full_names(path, discard):
            path.parent.mkdir(parents=True, exist_ok=True)
        yield write
        if not writer:
            raise ValueError(f"nothing was written to {path}")
        with disk_full_names(path, discard):
            writer.pop().close()  # writes the footer: the disk may fill here too
            tmp.replace(path)
    except BaseException:
        discard()
        raise


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", **open_args) -> Iterator[IO]:
    """`path` open for writing, in fact its temp file, which gets the final name when the
    block ends without an error and is removed otherwise (as `atomic_table_writer`). The
    block writes this file: a full disk in it raises DiskFull naming `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")

    def discard() -> None:
        tmp.unlink(missing_ok=True)

    try:
        with disk_full_names(path, discard):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, mode, **open_args) as fh:
                yield fh
            tmp.replace(path)
    except BaseException:
        discard()
        raise


def atomic_write_bytes(data: bytes, path: str | Path) -> Path:
    """`data` to `path` through a temp file renamed over it (`atomic_open`)."""
    with atomic_open(path) as fh:
        fh.write(data)
    return Path(path)


def atomic_write_json(data: dict, path: str | Path) -> Path:
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    return atomic_write_bytes(text.encode("utf-8"), path)


def write_vectors_table(path: str | Path, ids: Sequence, texts: Sequence[str],
                        vectors: np.ndarray, metadata: dict | None = None) -> Path:
    """id, text, embedding columns; `metadata` (what made the vectors) in the schema."""
    table = pa.table({"id": pa.array(ids), "text": pa.array(texts, pa.string()),
                      "embedding": vectors_to_arrow(vectors)})
    if metadata:
        table = table.replace_schema_metadata({"pipeline": json.dumps(metadata)})
    return atomic_write_table(table, path, vector_column="embedding")
