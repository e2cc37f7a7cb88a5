"""IVF inverted lists built on disk, in bounded memory.

Each shard's part is its rows' list numbers and codes, grouped by list (`encode_part`, a pure
function of the shard and the trained index), written to a file of its own; at the end all
parts (after an update's old lists) go into one file of FAISS's OnDiskInvertedLists layout
(`merge_parts`): list j at its offset holds its codes, then its ids, lists in order.

Both the parts and the merged file are read and written with plain file I/O, a range of lists
at a time. FAISS's own merge (`merge_from_multiple`, faiss.contrib.ondisk) maps every part and
the output: each page it touches counts in the process's RSS until unmapped, about twice the
lists' size at the end of a 10M-row build. Here the page cache holds them, and the process
holds one range (MERGE_CHUNK_BYTES) at a time.

A part file: starts (nlist + 1 int64: list j's rows are [starts[j], starts[j + 1])), then the
rows' ids (int64, ascending within a list), then their codes (code_size bytes each).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from pipeline.index.choice import quiet_faiss

MERGE_CHUNK_BYTES = 32 << 20
ID_BYTES = 8  # faiss.idx_t


@dataclass
class Part:
    """One shard's rows of the inverted lists, grouped by list."""

    starts: np.ndarray  # (nlist + 1,) int64
    ids: np.ndarray     # (n,) int64: corpus rows
    codes: np.ndarray   # (n, code_size) uint8

    def write(self, path: Path) -> None:
        with open(path, "wb") as fh:
            for array in (self.starts, self.ids, self.codes):
                fh.write(np.ascontiguousarray(array).tobytes())


def encode_part(index, vectors: np.ndarray, first_row: int) -> Part:
    """The inverted-list entries `index` (a trained IVF index, perhaps behind a transform)
    would store for `vectors` as rows first_row.. : the same list numbers and codes as
    index.add_with_ids, from the index's own sa_encode (list number, then code)."""
    ivf = faiss.extract_index_ivf(index)
    coded = index.sa_encode(np.ascontiguousarray(vectors, np.float32))
    coarse = coded.shape[1] - ivf.code_size  # bytes of the list number, little-endian
    list_nos = np.zeros(len(coded), np.int64)
    for byte in range(coarse):
        list_nos |= coded[:, byte].astype(np.int64) << (8 * byte)
    order = np.argsort(list_nos, kind="stable")  # rows stay ascending within a list
    starts = np.zeros(ivf.nlist + 1, np.int64)
    np.cumsum(np.bincount(list_nos, minlength=ivf.nlist), out=starts[1:])
    return Part(starts, first_row + order.astype(np.int64),
                np.ascontiguousarray(coded[order, coarse:]))


class PartFile:
    """A part written by Part.write, read a range of lists at a time."""

    def __init__(self, path: str | Path, nlist: int, code_size: int):
        self.path, self.nlist, self.code_size = Path(path), nlist, code_size
        self.n = int(np.fromfile(self.path, np.int64, count=1, offset=8 * nlist)[0])
        expected = 8 * (nlist + 1) + self.n * (ID_BYTES + code_size)
        if self.path.stat().st_size != expected:
            raise ValueError(f"{self.path.name}: {self.path.stat().st_size} bytes, a part of "
                             f"{self.n} rows has {expected}")

    def sizes(self) -> np.ndarray:
        return np.diff(np.fromfile(self.path, np.int64, count=self.nlist + 1))

    def lists(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sizes of lists a..b-1, their ids, their codes), list after list."""
        bounds = np.fromfile(self.path, np.int64, count=b - a + 1, offset=8 * a)
        lo, count = int(bounds[0]), int(bounds[-1] - bounds[0])
        ids_at = 8 * (self.nlist + 1)
        ids = np.fromfile(self.path, np.int64, count=count, offset=ids_at + ID_BYTES * lo)
        codes = np.fromfile(self.path, np.uint8, count=count * self.code_size,
                            offset=ids_at + ID_BYTES * self.n + self.code_size * lo)
        return np.diff(bounds), ids, codes.reshape(count, self.code_size)


class OnDiskLists:
    """An existing OnDiskInvertedLists file (an update's old lists), read by file I/O at the
    offsets its index records."""

    def __init__(self, path: str | Path, invlists):
        lists = faiss.downcast_InvertedLists(invlists)
        if not isinstance(lists, faiss.OnDiskInvertedLists):
            raise TypeError("the base index's lists are not on disk")
        self.path, self.code_size = Path(path), lists.code_size
        entries = [lists.lists.at(j) for j in range(lists.nlist)]
        self._sizes = np.array([e.size for e in entries], np.int64)
        self._capacity = np.array([e.capacity for e in entries], np.int64)
        self._offset = np.array([e.offset for e in entries], np.int64)

    def sizes(self) -> np.ndarray:
        return self._sizes.copy()

    def lists(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids, codes = [], []
        with open(self.path, "rb") as fh:
            fd = fh.fileno()
            for j in range(a, b):
                size = int(self._sizes[j])
                if size:
                    at, cap = int(self._offset[j]), int(self._capacity[j])
                    codes.append(read_exactly(fd, size * self.code_size, at))
                    ids.append(read_exactly(fd, size * ID_BYTES, at + cap * self.code_size))
        sizes = self._sizes[a:b]
        return (sizes, np.frombuffer(b"".join(ids), np.int64),
                np.frombuffer(b"".join(codes), np.uint8).reshape(-1, self.code_size))


def read_exactly(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise ValueError(f"short read: {len(data)} of {size} bytes at {offset}")
    return data


def list_ranges(offsets: np.ndarray, chunk_bytes: int) -> list[tuple[int, int]]:
    """Consecutive ranges [a, b) of lists, each at most chunk_bytes (or a single list)."""
    ranges, a, nlist = [], 0, len(offsets) - 1
    while a < nlist:
        b = int(np.searchsorted(offsets, offsets[a] + chunk_bytes, side="right")) - 1
        b = min(max(b, a + 1), nlist)
        ranges.append((a, b))
        a = b
    return ranges


def merge_parts(index, sources: list, ivfdata: Path,
                chunk_bytes: int = MERGE_CHUNK_BYTES) -> None:
    """The sources' lists (PartFile / OnDiskLists, in order: within a list, the first
    source's rows come first) into one OnDiskInvertedLists file `ivfdata`, installed in the
    empty trained IVF `index`, which refers to it by file name only (index.faiss is read with
    IO_FLAG_ONDISK_SAME_DIR, so the folder may move)."""
    ivf = faiss.extract_index_ivf(index)
    nlist, code_size = ivf.nlist, ivf.code_size
    sizes = np.zeros(nlist, np.int64)
    for source in sources:
        sizes += source.sizes()
    offsets = np.zeros(nlist + 1, np.int64)
    np.cumsum(sizes * (code_size + ID_BYTES), out=offsets[1:])
    with quiet_faiss():  # FAISS prints the file it resizes
        lists = faiss.OnDiskInvertedLists(nlist, code_size, str(ivfdata))
        list_sizes = sizes.astype(np.uint64)  # named: swig_ptr keeps no reference to it
        lists.set_all_lists_sizes(faiss.swig_ptr(list_sizes))
        lists.update_totsize(max(int(offsets[-1]), 1))  # creates the file: mapped, untouched
    try:
        with open(ivfdata, "r+b") as out:
            for a, b in list_ranges(offsets, chunk_bytes):
                out.seek(int(offsets[a]))
                out.write(lists_bytes(sources, a, b, sizes, code_size))
    except BaseException:
        del lists
        raise
    total = int(sizes.sum())
    ivf.replace_invlists(lists, True)
    lists.this.disown()
    lists.filename = ivfdata.name
    index.ntotal = ivf.ntotal = total


def lists_bytes(sources: list, a: int, b: int, sizes: np.ndarray, code_size: int) -> bytes:
    """Lists a..b-1 as the on-disk file lays them out: per list its codes, then its ids."""
    counts, ids, codes = [], [], []
    for source in sources:
        c, i, k = source.lists(a, b)
        counts.append(c)
        ids.append(i)
        codes.append(k)
    list_of_row = np.concatenate([np.repeat(np.arange(a, b), c) for c in counts])
    order = np.argsort(list_of_row, kind="stable")  # by list; source order kept within one
    ids = np.concatenate(ids)[order]
    codes = np.concatenate(codes)[order]
    pieces, row = [], 0
    for j in range(a, b):
        end = row + int(sizes[j])
        pieces.append(codes[row:end].tobytes())
        pieces.append(ids[row:end].tobytes())
        row = end
    return b"".join(pieces)
