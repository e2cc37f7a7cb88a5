"""Which FAISS index fits a corpus, and the search parameters each kind is tuned by.

Vectors are L2-normalised, so inner product is cosine similarity; every index is built with
`faiss.METRIC_INNER_PRODUCT`. The thresholds below come from benchmarks/index_choice.py; the
measurements behind them are in docs/performance.md ("Index choice").
"""

from __future__ import annotations

import math
import os
import re

import faiss

from pipeline.errors import IndexKeyError

# Exact search reads every vector for every query, with no build or tuning and no recall lost;
# past 2**25 floats (128 MiB; 87k rows at 384 dims) its time per query is worth an approximate
# index (docs/performance.md, "Index choice").
FLAT_MAX_FLOATS = 2**25
# HNSW builds slowly (docs/performance.md): past 1M rows IVF, which trains on a sample and adds
# an order of magnitude faster, as FAISS's guidelines recommend for 1M+ vectors.
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
# Refinement re-ranks k * K_FACTOR candidates shortlisted by PQ codes with float16 codes; 32 is
# where recall@10 stops rising (docs/performance.md) and stays cheap next to scanning IVF lists.
REFINE_K_FACTOR = 32
MAX_EF_SEARCH = 4096
ADD_BLOCK_ROWS = 65_536


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


def faiss_reason(err: Exception) -> str:
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
        raise IndexKeyError(f"invalid index key {key!r}: {faiss_reason(err)}") from None
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
