"""Which FAISS index fits a corpus, and the search parameters each kind is tuned by.

Vectors are L2-normalised, so inner product is cosine similarity; every index is built with
`faiss.METRIC_INNER_PRODUCT`. The thresholds below come from benchmarks/index_choice.py; the
measurements behind them are in docs/performance.md ("Index choice").
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys

import faiss

from pipeline.errors import IndexKeyError, UsageError
from pipeline.index.rescore import is_binary_key, split_key

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
# From this many lists on, an HNSW graph over the centroids assigns vectors to lists (autofaiss
# does the same): a flat quantizer's nlist * dim multiply-adds per vector dominate the build.
HNSW_QUANTIZER_LISTS = 16_384


def ivf_lists(n: int) -> int:
    """IVF list count, as autofaiss chooses it: ~4*sqrt(n) (FAISS guidelines: 4..16*sqrt(N))
    as the nearest power of two below 1M vectors; 2^16 up to 10M, 2^17 up to 300M, 2^18
    beyond; always capped so k-means gets FAISS's minimum of 39 training points per list."""
    if n < 1_000_000:
        nlist = 2 ** round(math.log2(4 * math.sqrt(max(n, 1))))
    else:
        nlist = 2 ** (16 if n <= 10_000_000 else 17 if n <= 300_000_000 else 18)
    cap = 2 ** int(math.log2(max(n // MIN_POINTS_PER_LIST, 1)))
    return max(1, min(nlist, cap))


def coarse_quantizer(nlist: int) -> str:
    """FAISS's IVF prefix: a flat quantizer compares each vector with every list centroid, so
    past HNSW_QUANTIZER_LISTS lists an HNSW graph over the centroids assigns them instead."""
    return f"IVF{nlist}_HNSW32" if nlist >= HNSW_QUANTIZER_LISTS else f"IVF{nlist}"


def pq_subquantizers(dim: int) -> int:
    """PQ code bytes per vector: the largest divisor of dim that is at most dim/4, i.e. about
    four dimensions per byte, accurate enough to shortlist candidates for refinement."""
    return max(m for m in range(1, max(dim // 4, 1) + 1) if dim % m == 0)


def parse_bytes(text: str | int) -> int:
    """'4GB', '512MB', '2GiB', '1.5G', '1000000' -> bytes (GB = 10^9, GiB = 2^30)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if match is None or float(match.group(1)) <= 0:
        raise UsageError(f"memory budget {text!r} is not a size: write e.g. 4GB, 512MB, 2GiB")
    number, unit, binary = float(match.group(1)), match.group(2).upper(), match.group(3)
    power = " KMGT".index(unit) if unit else 0
    return int(number * (1024 if binary else 1000) ** power)


def default_memory_budget() -> int:
    """Half the machine's RAM."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def index_bytes(n: int, dim: int, key: str) -> int:
    """What an index of n vectors takes in RAM when searched, roughly: codes and ids per
    vector, plus the coarse quantizer's centroids (and graph); a rescore file stays on disk."""
    base, _ = split_key(key)
    nlist = int(m.group(1)) if (m := re.search(r"IVF(\d+)", base)) else 0
    quantizer = nlist * (4 * dim + (HNSW_LINK_BYTES if "_HNSW" in base else 0))
    ids = IVF_ID_BYTES if nlist else 0
    if base.startswith("B"):
        per_vector = dim // 8 + ids
    elif base == "Flat" or base.endswith(",Flat") and nlist:
        per_vector = 4 * dim + ids
    elif base.startswith("HNSW"):
        per_vector = 4 * dim + HNSW_LINK_BYTES
    elif m := re.search(r"PQ(\d+)x8(,Refine\(SQfp16\))?", base):
        per_vector = int(m.group(1)) + (2 * dim if m.group(2) else 0) + ids
    elif "SQ8" in base:
        per_vector = dim + ids
    else:
        per_vector = 4 * dim + ids
    return n * per_vector + quantizer


def choose_index_key(n: int, dim: int, memory_bytes: int | None = None) -> str:
    """An index key for n vectors of dim dims, after FAISS's guidelines and autofaiss.

    `Flat` (exact) while n*dim <= FLAT_MAX_FLOATS. Beyond, the first of these whose RAM
    (`index_bytes`) fits half of `memory_bytes` (default: half this machine's RAM; the other
    half is the build's, for its training sample and a shard at a time). Each step roughly
    halves the bytes per vector and gives up some recall, which tuning and index.json show:
    - `HNSW32` (up to HNSW_MAX_ROWS rows): best recall per ms of query, slowest build.
    - `IVF{nlist},Flat`, nlist as `ivf_lists`: float32 vectors in lists; all nprobe = exact.
    - `IVF{nlist},PQ{m}x8,Refine(SQfp16)`: PQ codes shortlist, float16 codes re-rank in RAM.
    - `IVF{nlist},SQ8`: one byte per dimension (of the residual to the list centroid).
    - `IVF{nlist},PQ{m}x8,Rescore(fp16)`: m bytes per vector in RAM (the most that fit, m
      dividing dim, up to dim/4), float16 vectors on disk to re-rank the shortlist.
    """
    if n * dim <= FLAT_MAX_FLOATS:
        return "Flat"
    if memory_bytes is None:
        memory_bytes = default_memory_budget()
    nlist = ivf_lists(n)
    ivf, m = coarse_quantizer(nlist), pq_subquantizers(dim)
    tiers = [f"{ivf},Flat", f"{ivf},PQ{m}x8,Refine(SQfp16)", f"{ivf},SQ8"]
    if n <= HNSW_MAX_ROWS:
        tiers.insert(0, f"HNSW{HNSW_M}")
    # PQ sizes down to ~48 dims per byte, past which the shortlist is too poor to rescore. No
    # OPQ rotation in front, though autofaiss adds one: its training took 373 s on 65k x 384
    # on 2 cores (the IVF-PQ itself 17 s), and with float16 rescoring it buys little recall.
    compressed = [f"{ivf},PQ{s}x8,Rescore(fp16)" for s in range(m, 0, -1)
                  if dim % s == 0 and (s >= dim // 48 or s == m)]
    for key in tiers + compressed:
        if index_bytes(n, dim, key) <= memory_bytes // 2:
            return key
    return compressed[-1]


def streamed_key(key: str) -> str:
    """The key a streamed build uses for `key` chosen by size: Refine(SQfp16)'s float16 codes
    live in RAM, so out of core they go to the rescore file instead (Rescore(fp16), the same
    re-ranking read from disk)."""
    return key.replace(",Refine(SQfp16)", ",Rescore(fp16)")


@contextlib.contextmanager
def quiet_faiss():
    """Silence what FAISS's C++ prints on stdout and stderr meanwhile (the on-disk lists
    report each resize and the file they map), which would land in a command's output."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
        yield
    finally:
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)


def faiss_reason(err: Exception) -> str:
    """FAISS errors read 'Error in <signature> at file.cpp:123: reason'; keep the reason."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    match = re.search(r" at \S+:\d+: (.*)", text)
    return match.group(1) if match else text


def make_index(dim: int, key: str) -> faiss.Index | faiss.IndexBinary:
    """An empty index from an index key: a FAISS factory string (inner product), or a binary
    one (BFlat, BIVF1024, ...: Hamming distance over `rescore.binary_codes`), optionally followed
    by `,Rescore(int8|fp16|fp32)` (rescore.py; binary keys need it). IndexKeyError (one line)
    if the key does not parse or makes an index that cannot serve as row-numbered search."""
    if not key or not key.strip():
        raise IndexKeyError("index key is empty; give a FAISS factory string such as 'HNSW32'")
    base, rescore = split_key(key)
    if is_binary_key(base):
        if rescore is None:
            raise IndexKeyError(f"index key {key!r}: binary codes rank by Hamming distance, not "
                                f"cosine: add ',Rescore(int8)' (or fp16/fp32)")
        if dim % 8:
            raise IndexKeyError(f"index key {key!r}: binary codes need dims divisible by 8, "
                                f"have {dim}")
        try:
            return faiss.index_binary_factory(dim, base)
        except RuntimeError as err:
            raise IndexKeyError(f"invalid index key {key!r}: {faiss_reason(err)}") from None
    try:
        index = faiss.index_factory(dim, base, faiss.METRIC_INNER_PRODUCT)
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
