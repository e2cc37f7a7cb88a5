"""Similarity metrics between vectors and similarity matrices over many.

Conventions follow the seed: cosine similarity (1 = same direction), Euclidean and Manhattan
*distances* (0 = identical), the dot product, and Pearson correlation of the two vectors'
components. Our embeddings are L2-normalised, so the dot product equals the cosine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from pipeline.errors import UsageError

# A model as every evaluation takes it: texts in, (N, D) vectors out.
Embedder = Callable[[Sequence[str]], np.ndarray]

METRICS = ("cosine", "euclidean", "manhattan", "dot", "pearson")
# How to read each number, shown next to it in the CLI.
METRIC_HINTS = {
    "cosine": "(0=different, 1=identical)",
    "euclidean": "(0=identical, higher=different)",
    "manhattan": "(0=identical, higher=different)",
    "dot": "(normalized vectors)",
    "pearson": "(-1..1, 1=identical shape)",
}
METRIC_LABELS = {
    "cosine": "Cosine Similarity",
    "euclidean": "Euclidean Distance",
    "manhattan": "Manhattan Distance",
    "dot": "Dot Product Sim",
    "pearson": "Pearson Correlation",
}


# Distances grow as vectors part; the other metrics shrink.
DISTANCES = ("euclidean", "manhattan")


def higher_is_similar(metric: str) -> bool:
    return metric not in DISTANCES


def unit_rows(x: np.ndarray, dtype=np.float32) -> np.ndarray:
    """A C-contiguous copy of x with each row scaled to length 1 (zero rows stay zero).

    Stored vectors are float16 or rounded, so "unit" vectors read back are not exactly 1 long;
    the pooled vectors of documents are not unit length at all.
    """
    x = np.array(x, dtype=dtype, order="C")
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    x /= np.maximum(norms, np.finfo(x.dtype).tiny)
    return x


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of a with the same row of b (0 where either is zero)."""
    return (unit_rows(a, np.float64) * unit_rows(b, np.float64)).sum(-1)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom else 0.0


def euclidean(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))


def manhattan(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).sum())


def dot(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.asarray(a, np.float64) @ np.asarray(b, np.float64))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two equally long arrays: of two vectors' components here, of
    two models' scores in evaluate.py. 0 (not NaN) when either is constant."""
    a = np.asarray(a, np.float64) - np.mean(a)
    b = np.asarray(b, np.float64) - np.mean(b)
    return cosine(a, b)


METRIC_FUNCTIONS = {"cosine": cosine, "euclidean": euclidean, "manhattan": manhattan,
                    "dot": dot, "pearson": pearson}


def rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (as scipy.stats.rankdata)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Runs of equal values: each gets the mean of the ranks it spans.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(rankdata(x), rankdata(y))


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise UsageError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")


def similarity(a: np.ndarray, b: np.ndarray, metric: str = "cosine") -> float:
    check_metric(metric)
    return METRIC_FUNCTIONS[metric](a, b)


def all_metrics(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    return {m: METRIC_FUNCTIONS[m](a, b) for m in METRICS}


def similarity_matrix(vectors: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """(N, N) matrix of `metric` between all rows, vectorised (no Python double loop)."""
    x, sq = _matrix_inputs(vectors, metric)
    return _rows_against_all(x, sq, 0, len(x), metric)


def similarity_blocks(vectors: np.ndarray, metric: str = "cosine", block_rows: int = 1024
                      ) -> Iterator[np.ndarray]:
    """The rows of `similarity_matrix(vectors, metric)`, `block_rows` at a time, each block
    against all columns: a matrix too large to hold is made (and written) a block at a time,
    in memory of `block_rows` x N."""
    if block_rows < 1:
        raise ValueError(f"block_rows must be at least 1, not {block_rows}")
    x, sq = _matrix_inputs(vectors, metric)
    for lo in range(0, len(x), block_rows):
        yield _rows_against_all(x, sq, lo, min(len(x), lo + block_rows), metric)


def _matrix_inputs(vectors: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The float64 rows a matrix is made of (unit rows for cosine, centred unit rows for
    pearson) and, for euclidean, their squared lengths."""
    check_metric(metric)
    x = np.asarray(vectors, np.float64)
    if metric == "pearson":
        x = x - x.mean(axis=1, keepdims=True)
    if metric in ("cosine", "pearson"):
        x = unit_rows(x, np.float64)
    return x, (x * x).sum(1) if metric == "euclidean" else None


def _rows_against_all(x: np.ndarray, sq: np.ndarray | None, lo: int, hi: int, metric: str
                      ) -> np.ndarray:
    """Rows lo..hi of the matrix of `metric` over the rows of x (from `_matrix_inputs`)."""
    rows = x[lo:hi]
    if metric in ("dot", "cosine", "pearson"):
        return rows @ x.T
    if metric == "euclidean":
        d2 = np.maximum(sq[lo:hi, None] + sq[None, :] - 2 * rows @ x.T, 0)
        d2[np.arange(hi - lo), np.arange(lo, hi)] = 0  # each row's own column: exactly 0
        return np.sqrt(d2)
    # manhattan: row blocks keep the (block, N, D) difference tensor near 64 MB.
    out = np.empty((hi - lo, len(x)))
    block = max(1, (1 << 23) // max(1, x.size))
    for i in range(0, hi - lo, block):
        out[i : i + block] = np.abs(rows[i : i + block, None, :] - x[None, :, :]).sum(-1)
    return out


def adjusted_rand_index(a: Sequence[int], b: Sequence[int]) -> float:
    """Hubert & Arabie's ARI of two labelings: 1 = same partition, ~0 = chance agreement."""
    _, a = np.unique(np.asarray(a), return_inverse=True)
    _, b = np.unique(np.asarray(b), return_inverse=True)
    table = np.zeros((a.max() + 1, b.max() + 1), np.int64)
    np.add.at(table, (a, b), 1)

    def pairs(counts):
        return float((counts * (counts - 1) // 2).sum())

    index = pairs(table)
    rows, cols = pairs(table.sum(1)), pairs(table.sum(0))
    expected = rows * cols / pairs(np.array([len(a)]))
    maximum = (rows + cols) / 2
    if maximum == expected:  # both partitions trivial (one cluster, or all singletons)
        return 1.0
    return (index - expected) / (maximum - expected)
