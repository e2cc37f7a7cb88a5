"""Exact search in numpy (independent of FAISS) and recall@k against it.

Recall is measured on held-out queries: rows sampled from the data itself, each searched for
k+1 neighbours in both the exact and the approximate result, with the query's own row dropped
from both. Without that, every query would find itself at rank 1 and recall@10 would be
inflated by up to a tenth.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import faiss
import numpy as np

RECALL_K = 10
# Scores are float32 inner products of unit vectors, summed in different orders by FAISS and
# numpy; two neighbours whose exact scores differ by less than this are a tie.
TIE_EPS = 1e-5


def _blocks(vectors: np.ndarray | Iterable[np.ndarray], block_rows: int) -> Iterator[np.ndarray]:
    if isinstance(vectors, np.ndarray):
        for start in range(0, len(vectors), block_rows):
            yield vectors[start:start + block_rows]
    else:
        yield from vectors


# Elements of (queries x candidates x dim) rescored at a time: bounds the float64 temporaries.
RESCORE_ELEMENTS = 1 << 22


def exact_inner(queries: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Inner product of each query (nq, d) with each of its candidates (nq, c, d): (nq, c)
    float64, the same bits for equal vectors wherever they sit.

    A BLAS matmul does not promise that: its kernels sum a row's products in an order that
    depends on where in a block the row falls (and on the CPU), so two copies of one vector
    can score a last bit apart. Here float32 products are exact in float64 and the sum runs
    over the dim axis in one fixed order for every element.
    """
    q = np.asarray(queries, np.float64)
    out = np.empty(candidates.shape[:2], np.float64)
    step = max(1, RESCORE_ELEMENTS // max(1, candidates.shape[1] * candidates.shape[2]))
    for lo in range(0, len(q), step):
        block = candidates[lo:lo + step].astype(np.float64)  # (m, c, d)
        block *= q[lo:lo + step, None, :]
        out[lo:lo + step] = block.sum(axis=2)
    return out


def _candidates(scores: np.ndarray, kb: int, scale: np.ndarray, dim: int) -> np.ndarray:
    """Columns of `scores` (nq, rows; float32 BLAS) that may be in a query's exact top kb: the
    top kb, and every row within float32's rounding error of the kb-th, so that rows tied with
    it are all rescored and the lower one wins, not the one BLAS happened to round up."""
    top = np.argpartition(-scores, kb - 1, axis=1)[:, :kb]
    kth = np.take_along_axis(scores, top, axis=1).min(axis=1)
    # |float32 dot - exact| <= dim * 2^-24 * |q| |x|: twice that as the margin.
    margin = dim * 2.0 ** -23 * scale
    wanted = int((scores >= (kth - margin)[:, None]).sum(axis=1).max())
    if wanted <= kb:
        return top
    return np.argpartition(-scores, wanted - 1, axis=1)[:, :wanted]


# Rows of a block scored against all queries at once: bounds the (queries x rows) score,
# argpartition (int64) and mask temporaries, ~16 bytes per cell, to ~130 MB for 1,000 queries.
SUB_BLOCK_ROWS = 8192


def block_top_k(queries: np.ndarray, block: np.ndarray, first_row: int, k: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of one block of rows (global ids from `first_row`): (scores float64, ids),
    each (nq, min(k, rows)), in `exact_inner`'s arithmetic; `merge_top_k` joins blocks. A
    block's result depends only on the block, so blocks may be done anywhere (a Ray task)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    block = np.asarray(block, dtype=np.float32)
    if len(block) > SUB_BLOCK_ROWS:
        parts = (block_top_k(queries, block[lo:lo + SUB_BLOCK_ROWS], first_row + lo, k)
                 for lo in range(0, len(block), SUB_BLOCK_ROWS))
        return merge_top_k(parts, len(queries), min(k, len(block)))
    kb = min(k, len(block))
    if kb == 0:
        return np.zeros((len(queries), 0), np.float64), np.zeros((len(queries), 0), np.int64)
    scores = queries @ block.T  # (nq, rows in block)
    scale = np.linalg.norm(queries, axis=1) * float(np.linalg.norm(block, axis=1).max())
    top = _candidates(scores, kb, scale, block.shape[1])
    return exact_inner(queries, block[top]), top.astype(np.int64) + first_row


def merge_top_k(parts: Iterable[tuple[np.ndarray, np.ndarray]], nq: int, k: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """The best k of several (scores, ids) results per query, ties to the lower id; ids -1
    (score -inf) where fewer than k were given."""
    best_scores = np.full((nq, k), -np.inf, np.float64)
    best_ids = np.full((nq, k), -1, np.int64)
    for scores, ids in parts:
        cand_scores = np.concatenate([best_scores, scores], axis=1)
        cand_ids = np.concatenate([best_ids, ids], axis=1)
        order = np.lexsort((np.where(cand_ids >= 0, cand_ids, np.iinfo(np.int64).max),
                            -cand_scores), axis=-1)[:, :k]
        best_scores = np.take_along_axis(cand_scores, order, axis=1)
        best_ids = np.take_along_axis(cand_ids, order, axis=1)
    return best_scores, best_ids


def exact_neighbours(vectors: np.ndarray | Iterable[np.ndarray], queries: np.ndarray, k: int,
                     block_rows: int = 16_384) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products, in numpy (independent of FAISS), streaming over the vectors.

    `vectors` is an array or an iterable of consecutive row blocks (e.g. one per shard); memory
    stays at len(queries) x block size. Returns (scores, ids), each (nq, k), best first; ties go
    to the lower row, on any CPU: a float32 matmul picks the candidates and `exact_inner`
    ranks them; ids are -1 (score -inf) where there are fewer than k rows.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)

    def parts():
        start = 0
        for block in _blocks(vectors, block_rows):
            yield block_top_k(queries, block, start, k)
            start += len(block)

    scores, ids = merge_top_k(parts(), len(queries), k)
    return scores.astype(np.float32), ids


def exact_scores(vectors: np.ndarray, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Exact inner product of each query with each of its ids (nq, k); -inf where id is -1.
    The same arithmetic as `exact_neighbours`'s ranking, so both give a pair the same score."""
    safe = np.where(ids >= 0, ids, 0)
    scores = exact_inner(np.asarray(queries, np.float32), vectors[safe]).astype(np.float32)
    return np.where(ids >= 0, scores, -np.inf).astype(np.float32)


def drop_self(ids: np.ndarray, self_rows: np.ndarray, k: int) -> np.ndarray:
    """From k+1 result ids per query, the first k that are not the query's own row (when the row
    was not returned, e.g. behind exact duplicates of itself, simply the first k)."""
    is_self = ids == np.asarray(self_rows)[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")[:, :k]  # others first, order kept
    return np.take_along_axis(ids, order, axis=1)


def recall_at_k(found_ids: np.ndarray, true_ids: np.ndarray, k: int,
                found_scores: np.ndarray | None = None, true_scores: np.ndarray | None = None,
                eps: float = TIE_EPS) -> float:
    """Mean fraction of the true top-k found in the first k results.

    With scores, ties count: a found id is right when its *exact* score (recomputed, e.g. with
    `exact_scores`, not the index's approximate one) is >= the k-th true score - eps, so an index
    returning a different one of several equally near rows is not penalised.
    """
    found_ids, true_ids = np.asarray(found_ids)[:, :k], np.asarray(true_ids)[:, :k]
    if len(found_ids) == 0:
        return float("nan")
    if found_scores is None or true_scores is None:
        hits = sum(len(set(f[f >= 0]) & set(t[t >= 0])) for f, t in zip(found_ids, true_ids,
                                                                          strict=True))
        return hits / (len(found_ids) * k)
    kth = np.asarray(true_scores)[:, :k].min(axis=1, keepdims=True)
    good = (found_ids >= 0) & (np.asarray(found_scores)[:, :k] >= kth - eps)
    return float(good.sum() / (len(found_ids) * k))


def held_out_truth(vectors: np.ndarray, query_rows: np.ndarray,
                   k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of each sampled row among the other rows: (scores, ids). Scores come from
    `exact_scores`, the same arithmetic that scores an index's results, so a pair found by both
    gets bit-identical scores."""
    queries = vectors[query_rows]
    _, ids = exact_neighbours(vectors, queries, k + 1)
    ids = drop_self(ids, query_rows, k)
    return exact_scores(vectors, queries, ids), ids


def measure_recall(index: faiss.Index, vectors: np.ndarray, query_rows: np.ndarray,
                   true_scores: np.ndarray, true_ids: np.ndarray, k: int) -> tuple[float, float]:
    """Held-out recall@k of the index as currently set, and its search ms per query."""
    queries = vectors[query_rows]
    start = time.perf_counter()
    _, found = index.search(queries, k + 1)
    ms_per_query = 1000 * (time.perf_counter() - start) / len(query_rows)
    found = drop_self(found, query_rows, k)
    recall = recall_at_k(found, true_ids, k, exact_scores(vectors, queries, found), true_scores)
    return recall, ms_per_query
