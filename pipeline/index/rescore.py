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
r * row_bytes, mapped read-only; the pages a search touches are handed back to the page
cache as it goes (RescoreFile), so they do not pile up in the process's RSS.
"""

from __future__ import annotations

import contextlib
import mmap
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import IndexKeyError

KINDS = ("int8", "fp16", "fp32")
# Candidates per wanted neighbour: the first tried and the grid tuning rises over.
DEFAULT_FACTOR = 4
FACTORS = (4, 8, 16, 32, 64)
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
    """Reads rows of index.rescore by position, through a read-only mapping whose pages are
    handed back (MADV_DONTNEED) once a search has touched RELEASE_BYTES of them: the kernel's
    page cache keeps them, but they do not pile up in this process's RSS as a long-running
    server reads a file far larger than its memory."""

    RELEASE_BYTES = 64 << 20

    def __init__(self, path: str | Path, rescore: Rescore, calibration: dict, dim: int):
        self.path, self.rescore, self.calibration, self.dim = Path(path), rescore, calibration, dim
        self.row_bytes = rescore.row_bytes(dim)
        size = self.path.stat().st_size
        self._touched = 0
        self._map = None
        if size:
            with open(self.path, "rb") as fh:
                self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        self._rows = (np.frombuffer(self._map, np.uint8).reshape(-1, self.row_bytes)
                      if self._map is not None else np.zeros((0, self.row_bytes), np.uint8))

    def close(self) -> None:
        self._rows = None
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view still held: it keeps the mapping
                self._map.close()
            self._map = None

    def __del__(self):
        self.close()

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """Decoded vectors of `rows` (any shape of non-negative ints): rows.shape + (dim,)."""
        flat = np.asarray(rows, np.int64).reshape(-1)
        taken = self._rows[flat]  # a copy: the mapping's pages may go after this
        self._touched += len(flat) * 4096  # at most a page per row
        if self._touched > self.RELEASE_BYTES and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)
            self._touched = 0
        decoded = decode(taken, self.rescore, self.calibration, self.dim)
        return decoded.reshape(*np.shape(rows), self.dim)


def rescore_candidates(queries: np.ndarray, candidates: np.ndarray, store: RescoreFile,
                       k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top k of each query's candidate rows (nq, c; -1 = none) by inner product with the
    stored vectors: (scores, rows), best first, ties to the lower row, -1 / -inf padding."""
    queries = np.asarray(queries, np.float32)
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
