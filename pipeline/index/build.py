"""Embedding shards -> FAISS inner-product index, with its recall measured against exact search.

Vectors are L2-normalised, so inner product is cosine similarity; every index is built with
`faiss.METRIC_INNER_PRODUCT`. Vectors are added in row order, so FAISS id i is corpus row i.

The pure part (index choice, exact search, recall, tuning grids) takes arrays; `run_build_index`
and `load_index` do the index folder: `index.faiss` + `index.json` next to `manifest.json`.

Recall is measured on held-out queries: `n_queries` rows sampled from the data itself, each
searched for k+1 neighbours in both the exact and the approximate result, with the query's own
row dropped from both. Without that, every query would find itself at rank 1 and recall@10 would
be inflated by up to a tenth.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
from rich.markup import escape

from pipeline.errors import IndexKeyError, UsageError
from pipeline.parquet import (
    EMBEDDINGS_DIR,
    IndexFolderError,
    atomic_write_json,
    load_vectors,
    read_manifest,
    require_embeddings,
    token_shards,
    total_rows,
)

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
INFO_FILE = "index.json"
INDEX_FORMAT_VERSION = 1

RECALL_K = 10
# Scores are float32 inner products of unit vectors, summed in different orders by FAISS and
# numpy; two neighbours whose exact scores differ by less than this are a tie.
TIE_EPS = 1e-5

# Exact search reads every vector for every query. Up to 2**25 floats (128 MiB) one query takes
# ~5-12 ms on one core of the 2-core CI machine and a batch ~1.4 ms per query
# (benchmarks/index_choice.py), with no build or tuning and no recall lost; beyond that the time
# grows linearly and an approximate index pays off. At 384 dims this keeps corpora up to 87k rows
# exact (the default Debian corpus: ~62k).
FLAT_MAX_FLOATS = 2**25
# HNSW builds at ~2-3k vectors/s at 384 dims on 2 cores (benchmarks/index_choice.py): 1M rows is
# ~6 min. Beyond that IVF, which trains on a sample and adds ~10x faster, as FAISS's guidelines
# recommend for 1M+ vectors.
HNSW_M = 32
HNSW_MAX_ROWS = 1_000_000
# Per-vector memory beside the float32 vector: HNSW's level-0 links (2*M int32) plus upper levels
# and bookkeeping (~16 B); IVF's int64 id per vector.
HNSW_LINK_BYTES = 2 * HNSW_M * 4 + 16
IVF_ID_BYTES = 8
# FAISS warns when k-means gets fewer than 39 points per centroid and itself subsamples above
# 256; 64 gives stable centroids at a quarter of the cost of 256. PQ's 256 centroids per
# sub-quantizer want 39 * 256 = 9984 points at least.
TRAIN_POINTS_PER_LIST = 64
MIN_POINTS_PER_LIST = 39
MIN_TRAIN_ROWS = 16_384
# Refinement re-ranks k * K_FACTOR candidates shortlisted by PQ codes with float16 codes. Measured
# on 50k clustered vectors (PQ of 4 dims per byte): recall@10 0.89 at 8, 0.98 at 16, 0.996 at 32;
# 32 * 11 float16 vectors per query is still cheap next to scanning the IVF lists.
REFINE_K_FACTOR = 32
MAX_EF_SEARCH = 4096
ADD_BLOCK_ROWS = 65_536

Progress = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# Index choice


def ivf_lists(n: int) -> int:
    """IVF list count: ~4*sqrt(n) (FAISS guidelines: 4..16*sqrt(N)) as the nearest power of two,
    capped so k-means gets FAISS's minimum of 39 training points per list."""
    nlist = 2 ** round(math.log2(4 * math.sqrt(max(n, 1))))
    cap = 2 ** int(math.log2(max(n // MIN_POINTS_PER_LIST, 1)))
    return max(1, min(nlist, cap))


def pq_subquantizers(dim: int) -> int:
    """PQ code bytes per vector: the largest divisor of dim that is at most dim/4, i.e. about
    four dimensions per byte, accurate enough to shortlist candidates for refinement."""
    return max(m for m in range(1, max(dim // 4, 1) + 1) if dim % m == 0)


def default_memory_budget() -> int:
    """Half the machine's RAM: the build holds all float32 vectors beside the index."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def choose_index_key(n: int, dim: int, memory_bytes: int | None = None) -> str:
    """A FAISS factory string for n vectors of dim dims, after FAISS's guidelines and autofaiss.

    `Flat` (exact) while n*dim <= FLAT_MAX_FLOATS. Beyond, the first of these whose size fits
    `memory_bytes` (default: half this machine's RAM); each step roughly halves the bytes per
    vector and gives up some recall, which tuning and index.json then show:
    - `HNSW32` (up to HNSW_MAX_ROWS rows): best recall per ms of query, slowest build.
    - `IVF{nlist},Flat`, nlist ~ 4*sqrt(n): float32 vectors in lists; all nprobe = exact.
    - `IVF{nlist},PQ{m}x8,Refine(SQfp16)`: PQ codes shortlist, float16 codes re-rank (RFlat
      would keep the float32 vectors and save nothing).
    - `IVF{nlist},SQ8`: one byte per dimension (of the residual to the list centroid).
    - `IVF{nlist},PQ{m}x8`: a quarter byte per dimension; recall may miss the target.
    """
    if n * dim <= FLAT_MAX_FLOATS:
        return "Flat"
    if memory_bytes is None:
        memory_bytes = default_memory_budget()
    nlist, m = ivf_lists(n), pq_subquantizers(dim)
    tiers = [(f"IVF{nlist},Flat", 4 * dim + IVF_ID_BYTES),
             (f"IVF{nlist},PQ{m}x8,Refine(SQfp16)", m + 2 * dim + IVF_ID_BYTES),
             (f"IVF{nlist},SQ8", dim + IVF_ID_BYTES),
             (f"IVF{nlist},PQ{m}x8", m + IVF_ID_BYTES)]
    if n <= HNSW_MAX_ROWS:
        tiers.insert(0, (f"HNSW{HNSW_M}", 4 * dim + HNSW_LINK_BYTES))
    for key, bytes_per_vector in tiers:
        if n * bytes_per_vector <= memory_bytes:
            return key
    return tiers[-1][0]


def _faiss_reason(err: Exception) -> str:
    """FAISS errors read 'Error in <signature> at file.cpp:123: reason'; keep the reason."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    match = re.search(r" at \S+:\d+: (.*)", text)
    return match.group(1) if match else text


def make_index(dim: int, key: str) -> faiss.Index:
    """An empty inner-product index from a FAISS factory string; ValueError (one line) if the
    string does not parse or makes an index that cannot serve as row-numbered IP search."""
    if not key or not key.strip():
        raise IndexKeyError("index key is empty; give a FAISS factory string such as 'HNSW32'")
    try:
        index = faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise IndexKeyError(f"invalid index key {key!r}: {_faiss_reason(err)}") from None
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise IndexKeyError(f"index key {key!r} does not support inner-product search")
    if isinstance(faiss.downcast_index(index), faiss.IndexIDMap):
        raise IndexKeyError(f"index key {key!r}: IDMap is not needed, FAISS id i is corpus row i")
    return index


def _unwrap(index: faiss.Index) -> faiss.Index:
    """The index that does the search, beneath refinement and pre-transforms."""
    index = faiss.downcast_index(index)
    while True:
        if isinstance(index, faiss.IndexRefine):
            index = faiss.downcast_index(index.base_index)
        elif isinstance(index, faiss.IndexPreTransform):
            index = faiss.downcast_index(index.index)
        else:
            return index


def search_params_grid(index: faiss.Index) -> list[dict]:
    """Search settings from cheapest to most accurate, for tuning: nprobe for IVF (up to every
    list, which is exact for IVF-Flat), efSearch for HNSW, nothing for Flat/PQ/SQ. Steps grow by
    ~1.5x (1, 2, 3, 4, 6, 8, 12, ...) so the chosen value overshoots the needed one by < 1.5x."""
    steps = sorted({s for p in range(20) for s in (2**p, 3 * 2**p // 2)})
    extra = {"k_factor_rf": REFINE_K_FACTOR} if isinstance(
        faiss.downcast_index(index), faiss.IndexRefine) else {}
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        values = [s for s in steps if s < ivf.nlist] + [ivf.nlist]
        return [{"nprobe": v, **extra} for v in values]
    if isinstance(_unwrap(index), faiss.IndexHNSW):
        return [{"efSearch": v, **extra} for v in steps if 16 <= v <= MAX_EF_SEARCH]
    return [dict(extra)]


def apply_params(index: faiss.Index, params: dict) -> None:
    """Set search-time parameters (nprobe, efSearch, k_factor_rf) through FAISS's ParameterSpace,
    which finds the sub-index each one belongs to."""
    space = faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, value)


# ---------------------------------------------------------------------------------------------
# Exact search and recall


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


def exact_neighbours(vectors: np.ndarray | Iterable[np.ndarray], queries: np.ndarray, k: int,
                     block_rows: int = 16_384) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products, in numpy (independent of FAISS), streaming over the vectors.

    `vectors` is an array or an iterable of consecutive row blocks (e.g. one per shard); memory
    stays at len(queries) x block size. Returns (scores, ids), each (nq, k), best first; ties go
    to the lower row, on any CPU: a float32 matmul picks the candidates and `exact_inner`
    ranks them; ids are -1 (score -inf) where there are fewer than k rows.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    nq = len(queries)
    query_norms = np.linalg.norm(queries, axis=1)
    best_scores = np.full((nq, k), -np.inf, np.float64)
    best_ids = np.full((nq, k), -1, np.int64)
    start = 0
    for block in _blocks(vectors, block_rows):
        block = np.asarray(block, dtype=np.float32)
        kb = min(k, len(block))
        if kb:
            scores = queries @ block.T  # (nq, rows in block)
            scale = query_norms * float(np.linalg.norm(block, axis=1).max())
            top = _candidates(scores, kb, scale, block.shape[1])
            cand_scores = np.concatenate([best_scores, exact_inner(queries, block[top])], axis=1)
            cand_ids = np.concatenate([best_ids, top + start], axis=1)
            order = np.lexsort((cand_ids, -cand_scores), axis=-1)[:, :k]
            best_scores = np.take_along_axis(cand_scores, order, axis=1)
            best_ids = np.take_along_axis(cand_ids, order, axis=1)
        start += len(block)
    return best_scores.astype(np.float32), best_ids


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


def sample_queries(n: int, count: int, seed: int) -> np.ndarray:
    """`count` distinct rows of n (all when count >= n), sorted, reproducible from seed."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(count, n), replace=False)).astype(np.int64)


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


# ---------------------------------------------------------------------------------------------
# Build


def _check_vectors(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) == 0 or vectors.shape[1] == 0:
        raise ValueError(f"need a non-empty (N, dim) array of vectors, got shape {vectors.shape}")
    sample = vectors[:: max(1, len(vectors) // 10_000)]
    worst = float(np.abs(np.linalg.norm(sample, axis=1) - 1).max())
    if worst > 1e-2:
        log.warning("vectors are not L2-normalised (|norm - 1| up to %.3f): inner-product "
                    "scores will not be cosine similarities", worst)
    return vectors


def training_rows(index: faiss.Index, n: int) -> int:
    ivf = faiss.try_extract_index_ivf(index)
    nlist = ivf.nlist if ivf is not None else 0
    if nlist > n:
        raise IndexKeyError(f"IVF{nlist} needs at least {nlist} vectors to train, have {n}")
    return min(n, max(TRAIN_POINTS_PER_LIST * nlist, MIN_TRAIN_ROWS))


def build_index(vectors: np.ndarray, key: str | None = None, target_recall: float = 0.95,
                n_queries: int = 1000, seed: int = 0,
                progress: Progress | None = None) -> tuple[faiss.Index, dict]:
    """Build an inner-product index over `vectors` (row i -> FAISS id i) and tune it.

    key: a FAISS factory string, default `choose_index_key`. Trainable indexes train on a seeded
    sample. Then nprobe (IVF) / efSearch (HNSW) rise over `search_params_grid` until held-out
    recall@10 (see module docstring) reaches `target_recall`; if none does, the best setting is
    kept, a warning logged and `target_met` is false. Returns (index, info).
    """
    report = progress or (lambda message: None)
    vectors = _check_vectors(vectors)
    n, dim = vectors.shape
    key = key or choose_index_key(n, dim)
    index = make_index(dim, key)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQ):
        # On by default for PQ..x8; it only serves polysemous search, which we never switch on,
        # and took 3/4 of the training time on 50k x 64 vectors.
        faiss.downcast_index(ivf).do_polysemous_training = False
    seconds: dict[str, float] = {}
    train_rows = 0

    start = time.perf_counter()
    if not index.is_trained:
        train_rows = training_rows(index, n)
        report(f"training {key} on {train_rows:,} vectors")
        sample = vectors[sample_queries(n, train_rows, seed + 1)]
        try:
            index.train(sample)
        except RuntimeError as err:
            raise IndexKeyError(f"cannot train {key!r} on {train_rows:,} vectors: "
                             f"{_faiss_reason(err)}") from None
    seconds["train"] = round(time.perf_counter() - start, 3)

    start = time.perf_counter()
    for lo in range(0, n, ADD_BLOCK_ROWS):
        report(f"adding vectors to {key}: {lo:,}/{n:,}")
        index.add(vectors[lo:lo + ADD_BLOCK_ROWS])
    if index.ntotal != n:
        raise RuntimeError(f"index holds {index.ntotal} vectors after adding {n}")
    seconds["add"] = round(time.perf_counter() - start, 3)

    start = time.perf_counter()
    k = min(RECALL_K, n - 1)
    grid = search_params_grid(index)
    tuning: list[dict] = []
    params, recall, queries_used = grid[0], None, 0
    if k >= 1:
        query_rows = sample_queries(n, n_queries, seed)
        report(f"exact search for {len(query_rows):,} held-out queries")
        true_scores, true_ids = held_out_truth(vectors, query_rows, k)
        for candidate in grid:
            apply_params(index, candidate)
            got, ms = measure_recall(index, vectors, query_rows, true_scores, true_ids, k)
            tuning.append({**candidate, "recall": round(got, 4), "ms_per_query": round(ms, 4)})
            report(f"tuning {key}: {candidate or 'no parameters'} -> recall@{k} {got:.3f}")
            if recall is None or got > recall:
                params, recall = candidate, got
            if got >= target_recall:
                break
        apply_params(index, params)
        queries_used = len(query_rows)
    seconds["tune"] = round(time.perf_counter() - start, 3)

    target_met = None if recall is None else recall >= target_recall
    if target_met is False:
        log.warning("%s reaches recall@%d %.3f at best (%s), below the target %.3f",
                    key, k, recall, params, target_recall)
    info = {
        "key": key, "params": params, "n": int(n), "dim": int(dim), "metric": "inner_product",
        "recall_k": k, "recall": None if recall is None else round(recall, 4),
        "n_queries": queries_used, "queries": "held-out: sampled rows, own row excluded",
        "target_recall": target_recall, "target_met": target_met, "seed": seed,
        "train_rows": train_rows, "tuning": tuning, "seconds": seconds,
        "faiss_version": faiss.__version__,
    }
    return index, info


# ---------------------------------------------------------------------------------------------
# Index folders


def embeddings_fingerprint(manifest: dict) -> str:
    """sha256 over the embedding shards' names, row counts and file hashes, in row order: it
    changes whenever any embedding shard is redone."""
    done = manifest.get("embed", {}).get("shards", {})
    records = [[s["name"], done.get(s["name"], {}).get("rows"),
                done.get(s["name"], {}).get("sha256")] for s in token_shards(manifest)]
    return hashlib.sha256(json.dumps(records).encode()).hexdigest()


def _source(manifest: dict) -> dict:
    """What the index was built from: the embed identity and the embeddings' fingerprint."""
    return {"embed_identity": manifest.get("embed", {}).get("identity"),
            "embeddings": {"rows": total_rows(manifest),
                           "sha256": embeddings_fingerprint(manifest)}}


def run_build_index(index_dir: str | Path, *, index_key: str | None = None,
                    target_recall: float = 0.95, force: bool = False, console=None) -> dict:
    """The build-index stage: embedding shards -> index.faiss + index.json in `index_dir`.

    Skips (returns the existing info, with "skipped": True) when index.json was built from the
    current embeddings with the same settings, unless `force`. `console` (rich) shows progress.
    """
    index_dir = Path(index_dir)
    if not 0 < target_recall <= 1:
        raise UsageError(f"target recall must be in (0, 1], got {target_recall}")
    manifest = require_embeddings(index_dir)
    source = _source(manifest)
    settings = {"index_key": index_key, "target_recall": target_recall}
    info_path, index_path = index_dir / INFO_FILE, index_dir / INDEX_FILE
    if not force and info_path.is_file() and index_path.is_file():
        old = json.loads(info_path.read_text())
        if old.get("settings") == settings and all(old.get(k) == v for k, v in source.items()):
            log.info("%s is current: skipping build-index", info_path)
            if console is not None:
                console.print(f"index is current: {old['key']}, recall@{old['recall_k']} "
                              f"{old['recall']} ({escape(str(info_path))})", highlight=False)
            return {**old, "skipped": True}

    status = console.status("loading vectors") if console is not None else contextlib.nullcontext()
    with status as shown:
        def progress(message: str) -> None:
            log.info(message)
            if shown is not None:
                shown.update(message)

        if index_key is not None:  # a bad key fails before the vectors are read
            make_index(_embedding_dim(index_dir, manifest), index_key)
        vectors = load_vectors(index_dir)
        if len(vectors) != source["embeddings"]["rows"]:
            raise IndexFolderError(f"{index_dir}: embedding shards hold {len(vectors)} rows, the "
                                   f"manifest {source['embeddings']['rows']}: "
                                   "run `pipeline embed --index`")
        index, info = build_index(vectors, index_key, target_recall, progress=progress)

        # No index.json while index.faiss is replaced: a crash in between leaves a folder that
        # load_index and the skip check refuse, rather than a new index with old settings.
        info_path.unlink(missing_ok=True)
        tmp = index_path.with_name(index_path.name + ".tmp")
        faiss.write_index(index, str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, index_path)
        info = {"format_version": INDEX_FORMAT_VERSION, **info, "settings": settings, **source,
                "index_file": {"name": INDEX_FILE, "bytes": index_path.stat().st_size}}
        atomic_write_json(info, info_path)

    if console is not None:
        met = "" if info["target_met"] is not False else " [red](below target)[/red]"
        params = (", ".join(f"{k}={v}" for k, v in info["params"].items())
                  or ("exact" if info["key"] == "Flat" else "no search parameters"))
        console.print(f"index: {info['key']} over {info['n']:,} x {info['dim']}, "
                      f"{params}, recall@{info['recall_k']} {info['recall']} "
                      f"(target {target_recall}){met} in {sum(info['seconds'].values()):.1f} s "
                      f"-> {escape(str(index_path))}", highlight=False)
    return info


def _embedding_dim(index_dir: Path, manifest: dict) -> int:
    """Vector dims from the first embedding shard's schema, without reading its data."""
    first = index_dir / EMBEDDINGS_DIR / token_shards(manifest)[0]["name"]
    return pq.read_schema(first).field("embedding").type.list_size


def read_index_info(index_dir: str | Path) -> dict:
    path = Path(index_dir) / INFO_FILE
    if not path.is_file() or not (Path(index_dir) / INDEX_FILE).is_file():
        raise IndexFolderError(f"{index_dir} has no index: run `pipeline build-index --index "
                               f"{index_dir}`")
    return json.loads(path.read_text())


def load_index(index_dir: str | Path) -> tuple[faiss.Index, dict]:
    """index.faiss with its tuned search parameters applied, and index.json.

    Refuses (IndexFolderError) an index built from other embeddings than the manifest's current
    ones, or one whose file does not match its index.json.
    """
    index_dir = Path(index_dir)
    info = read_index_info(index_dir)
    if info.get("format_version") != INDEX_FORMAT_VERSION:
        raise IndexFolderError(f"{index_dir}/{INFO_FILE} has format version "
                               f"{info.get('format_version')}: run `pipeline build-index --force`")
    source = _source(read_manifest(index_dir))
    if any(info.get(k) != v for k, v in source.items()):
        raise IndexFolderError(f"{index_dir}: index is stale (the embeddings changed since it was "
                               "built): run `pipeline build-index`")
    index_path = index_dir / INDEX_FILE
    if index_path.stat().st_size != info["index_file"]["bytes"]:
        raise IndexFolderError(f"{index_path} does not match {INFO_FILE}: "
                               "run `pipeline build-index --force`")
    index = faiss.read_index(str(index_path))
    if (index.ntotal, index.d) != (info["n"], info["dim"]):
        raise IndexFolderError(f"{index_path} holds {index.ntotal} x {index.d}, {INFO_FILE} says "
                               f"{info['n']} x {info['dim']}: run `pipeline build-index --force`")
    apply_params(index, info["params"])
    return index, info


# ---------------------------------------------------------------------------------------------
# Range search (near-duplicates)


def range_search(index: faiss.Index, queries: np.ndarray,
                 threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All rows with inner product > threshold to each query, as FAISS returns them:
    (lims, scores, ids), query i's hits being scores/ids[lims[i]:lims[i + 1]], unordered.

    Flat is exact; IVF is approximate (only the nprobe nearest lists are scanned). HNSW has no
    range search in older FAISS and only a greedy approximation with no measured recall in newer
    ones, so for HNSW with float storage we scan that storage exactly instead (same vectors, O(N)
    per query).
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    target = faiss.downcast_index(index)
    if isinstance(target, faiss.IndexHNSW):
        storage = faiss.downcast_index(target.storage)
        if not isinstance(storage, faiss.IndexFlat):
            raise IndexKeyError("range search over HNSW needs float (Flat) storage")
        target = storage
    try:
        return target.range_search(queries, threshold)
    except RuntimeError as err:
        raise IndexKeyError(f"range search is not supported by this index: "
                         f"{_faiss_reason(err)}") from None
