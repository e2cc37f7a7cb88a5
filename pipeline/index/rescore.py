"""Compressed vectors and rescoring: a cheap index shortlists k x factor candidates, and their
vectors, kept on disk in a compact code, re-rank them.

Two uses, one mechanism:
- binary codes (`BFlat,Rescore(int8)`): one bit per dimension in memory, Hamming distance for
  candidates, calibrated int8 vectors on disk for the final scores; the recipe of
  sentence-transformers' `quantize_embeddings` and its binary + int8 rescoring example.
- PQ codes past the memory budget (`OPQ..,IVF..,PQ..,Rescore(fp16)`): PQ shortlists, float16
  vectors on disk re-rank, as FAISS's `Refine` does but without holding the refinement codes
  in RAM.

The rescore file (index.<build>.rescore) is rows of `row_bytes` bytes, row r at offset
r * row_bytes, read row by row with pread (RescoreFile): the page cache keeps what is hot, and
the process's RSS holds only the rows of the queries at hand.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import IndexKeyError

KINDS = ("int8", "fp16", "fp32")
# Candidates per wanted neighbour: the first tried and the grid tuning rises over.
DEFAULT_FACTOR = 4
FACTORS = (4, 8, 16, 32, 64)
# Decoded candidate vectors held at once while rescoring a batch of queries (8 MB: at 32 MB
# the 10M-row search peaked at 1.017 GB, 0.99 GB after; docs/performance.md).
RESCORE_BLOCK_BYTES = 8 << 20
RESCORE_PATTERN = re.compile(r"^(.*?),?\s*Rescore\((\w+)\)\s*$")


@dataclass(frozen=True)
class Rescore:
    kind: str  # int8 | fp16 | fp32

    def row_bytes(self, dim: int) -> int:
        return dim * {"int8": 1, "fp16": 2, "fp32": 4}[self.kind]


def split_key(key: str) -> tuple[str, Rescore | None]:
    """'FAISS KEY,Rescore(kind)' -> (FAISS key, Rescore); a key without it -> (key, None)."""
    match = RESCORE_PATTERN.match(key.strip())
    if match is None:
        if "Rescore" in key:
            raise IndexKeyError(f"index key {key!r}: write Rescore(kind) last, kind one of "
                                f"{', '.join(KINDS)}")
        return key, None
    base, kind = match.group(1).strip(), match.group(2)
    if kind not in KINDS:
        raise IndexKeyError(f"index key {key!r}: Rescore({kind}) is not one of "
                            f"{', '.join(f'Rescore({k})' for k in KINDS)}")
    if not base:
        raise IndexKeyError(f"index key {key!r} has nothing before Rescore: e.g. "
                            "'BFlat,Rescore(int8)'")
    return base, Rescore(kind)


def is_binary_key(key: str) -> bool:
    """FAISS's binary factory strings: BFlat, BIVF1024, BHNSW32, ..."""
    return key.strip().startswith("B") and not key.strip().startswith("BF16")


# -- codecs: pure functions of a calibration sample --------------------------------------------

def calibrate(sample: np.ndarray) -> dict:
    """Per-dimension statistics of a sample of the vectors, the codecs' parameters: the median
    (the binary threshold: each bit is then 1 for half the corpus, where a threshold of 0 wastes
    bits on dimensions that all vectors share) and the min and max (int8's range)."""
    sample = np.asarray(sample, np.float32)
    return {"median": np.median(sample, axis=0).astype(np.float32).tolist(),
            "min": sample.min(axis=0).astype(np.float32).tolist(),
            "max": sample.max(axis=0).astype(np.float32).tolist()}


def binary_codes(vectors: np.ndarray, calibration: dict) -> np.ndarray:
    """One bit per dimension (1 above the dimension's median), packed 8 to a byte."""
    bits = np.asarray(vectors, np.float32) > np.asarray(calibration["median"], np.float32)
    return np.packbits(bits, axis=1)


def _int8_steps(calibration: dict) -> tuple[np.ndarray, np.ndarray]:
    low = np.asarray(calibration["min"], np.float32)
    step = (np.asarray(calibration["max"], np.float32) - low) / 255
    return low, np.where(step > 0, step, 1).astype(np.float32)


def encode(vectors: np.ndarray, rescore: Rescore, calibration: dict) -> np.ndarray:
    """Rows of the rescore file for `vectors` (n, row_bytes) as uint8."""
    vectors = np.asarray(vectors, np.float32)
    if rescore.kind == "fp32":
        coded = vectors
    elif rescore.kind == "fp16":
        coded = vectors.astype(np.float16)
    else:  # 256 buckets between the calibration's min and max per dimension, clipped
        low, step = _int8_steps(calibration)
        coded = (np.clip(np.floor((vectors - low) / step), 0, 255) - 128).astype(np.int8)
    return np.ascontiguousarray(coded).view(np.uint8).reshape(len(vectors), -1)


def decode(rows: np.ndarray, rescore: Rescore, calibration: dict, dim: int) -> np.ndarray:
    """The vectors (n, dim) float32 back from rescore-file rows; int8 to its bucket's middle."""
    rows = np.ascontiguousarray(rows, np.uint8)
    if rescore.kind == "fp32":
        return rows.view(np.float32).reshape(-1, dim)
    if rescore.kind == "fp16":
        return rows.view(np.float16).reshape(-1, dim).astype(np.float32)
    low, step = _int8_steps(calibration)
    codes = rows.view(np.int8).reshape(-1, dim).astype(np.float32) + 128.5
    return low + codes * step


# -- the file ----------------------------------------------------------------------------------

class RescoreFile:
    """Reads rows of index.rescore by position with plain reads (pread), rows close together
    in one read. Not mapped: a page fault on a mapped file maps up to 16 neighbouring pages
    that the page cache holds ("fault-around"), so reading a few thousand scattered rows of a
    file just written put gigabytes in the process's RSS; a read copies only what it asks."""

    # Rows this many bytes apart or closer are read together: past a page, two reads are
    # cheaper than the bytes between them.
    GAP_BYTES = 4096

    def __init__(self, path: str | Path, rescore: Rescore, calibration: dict, dim: int):
        self.path, self.rescore, self.calibration, self.dim = Path(path), rescore, calibration, dim
        self.row_bytes = rescore.row_bytes(dim)
        self.rows = self.path.stat().st_size // self.row_bytes
        self._fd = os.open(self.path, os.O_RDONLY)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """The stored bytes of sorted distinct `rows` (n, row_bytes)."""
        out = np.empty((len(rows), self.row_bytes), np.uint8)
        if not len(rows):
            return out
        if rows[0] < 0 or rows[-1] >= self.rows:
            raise IndexError(f"{self.path.name} holds rows 0..{self.rows - 1}, asked for "
                             f"{rows[0]}..{rows[-1]}")
        gap_rows = max(1, self.GAP_BYTES // self.row_bytes)
        breaks = np.flatnonzero(np.diff(rows) > gap_rows) + 1
        run_starts, run_ends = np.r_[0, breaks].tolist(), np.r_[breaks, len(rows)].tolist()
        for lo, hi in zip(run_starts, run_ends, strict=True):
            first, last = int(rows[lo]), int(rows[hi - 1])
            size = (last - first + 1) * self.row_bytes
            data = os.pread(self._fd, size, first * self.row_bytes)
            if len(data) != size:
                raise OSError(f"{self.path.name}: short read at row {first}")
            run = np.frombuffer(data, np.uint8).reshape(-1, self.row_bytes)
            out[lo:hi] = run[rows[lo:hi] - first]
        return out

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """Decoded vectors of `rows` (any shape of non-negative ints): rows.shape + (dim,)."""
        distinct, where = np.unique(np.asarray(rows, np.int64).reshape(-1), return_inverse=True)
        decoded = decode(self.read_rows(distinct), self.rescore, self.calibration, self.dim)
        return decoded[where].reshape(*np.shape(rows), self.dim)


def rescore_candidates(queries: np.ndarray, candidates: np.ndarray, store: RescoreFile,
                       k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top k of each query's candidate rows (nq, c; -1 = none) by inner product with the
    stored vectors: (scores, rows), best first, ties to the lower row, -1 / -inf padding.
    Queries go in blocks, so the decoded candidates stay near RESCORE_BLOCK_BYTES."""
    queries = np.asarray(queries, np.float32)
    per_query = max(1, candidates.shape[1] * store.dim * 4)
    step = max(1, RESCORE_BLOCK_BYTES // per_query)
    blocks = [_rescore_block(queries[i:i + step], candidates[i:i + step], store, k)
              for i in range(0, len(queries), step)]
    if not blocks:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])


def _rescore_block(queries, candidates, store, k):
    valid = candidates >= 0
    vectors = store.vectors(np.where(valid, candidates, 0))  # (nq, c, dim)
    scores = np.matmul(vectors, queries[:, :, None])[:, :, 0]  # (nq, c): batched dots
    scores = np.where(valid, scores, -np.inf).astype(np.float32)
    order = np.lexsort((np.where(valid, candidates, np.iinfo(np.int64).max), -scores),
                       axis=-1)[:, :k]
    top_scores = np.take_along_axis(scores, order, axis=1)
    top_rows = np.where(np.isfinite(top_scores), np.take_along_axis(candidates, order, axis=1),
                        -1)
    return top_scores, top_rows
