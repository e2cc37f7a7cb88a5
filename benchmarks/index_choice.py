"""The measurements behind pipeline.index.choice.choose_index_key's thresholds.

    python benchmarks/index_choice.py [--dim 384] [--rows 100000]

1. Exact (Flat) search: ms for one query, and per query in a batch of 1000, as n*dim grows
   (FLAT_MAX_FLOATS = 2**25).
2. Build rates: HNSW32 (vectors/s) and IVF{4*sqrt(n)},Flat (train + add), which bound where HNSW
   is worth its build time (HNSW_MAX_ROWS).
3. Memory: serialized HNSW32 / IVF size against the per-vector estimates used for the choice.
Prints one JSON object with the machine's faiss version and thread count next to the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import faiss
import numpy as np

from pipeline.index import build, choice


def unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def flat_latency(dim: int) -> list[dict]:
    all_threads = faiss.omp_get_max_threads()
    out = []
    for floats in (2**22, 2**23, 2**24, 2**25, 2**26):
        n = floats // dim
        x = unit_vectors(n, dim)
        index = faiss.IndexFlatIP(dim)
        index.add(x)
        q = x[:1000].copy()
        index.search(q[:1], 10)  # warm-up
        row = {"n": n, "dim": dim, "floats_log2": int(np.log2(floats))}
        # One thread too: on a busy machine OpenMP's threads wait on each other for one query.
        for threads in sorted({1, all_threads}):
            faiss.omp_set_num_threads(threads)
            times = []
            for i in range(50):
                start = time.perf_counter()
                index.search(q[i:i + 1], 10)
                times.append(time.perf_counter() - start)
            row[f"single_query_ms_median_{threads}_threads"] = round(1000 * np.median(times), 2)
        faiss.omp_set_num_threads(all_threads)
        start = time.perf_counter()
        index.search(q, 10)
        row["batch_ms_per_query"] = round(1000 * (time.perf_counter() - start) / len(q), 3)
        out.append(row)
    return out


def saved_bytes(index: faiss.Index) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "index.faiss")
        faiss.write_index(index, path)
        return os.path.getsize(path)


def build_rates(n: int, dim: int) -> dict:
    x = unit_vectors(n, dim, seed=1)
    start = time.perf_counter()
    hnsw = choice.make_index(dim, f"HNSW{choice.HNSW_M}")
    hnsw.add(x)
    hnsw_s = time.perf_counter() - start
    nlist = choice.ivf_lists(n)
    start = time.perf_counter()
    ivf, _ = build.build_index(x, f"IVF{nlist},Flat", n_queries=1)  # build only, ~no tuning
    ivf_s = time.perf_counter() - start
    return {
        "n": n, "dim": dim,
        "hnsw_build_s": round(hnsw_s, 1), "hnsw_vectors_per_s": round(n / hnsw_s),
        "hnsw_bytes": saved_bytes(hnsw),
        "hnsw_bytes_estimate": n * (4 * dim + choice.HNSW_LINK_BYTES),
        f"ivf{nlist}_build_s": round(ivf_s, 1), "ivf_vectors_per_s": round(n / ivf_s),
        "ivf_bytes": saved_bytes(ivf), "ivf_bytes_estimate": n * (4 * dim + choice.IVF_ID_BYTES),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--rows", type=int, default=100_000, help="rows for the build rates")
    args = parser.parse_args()
    print(json.dumps({"faiss": faiss.__version__, "threads": faiss.omp_get_max_threads(),
                      "flat": flat_latency(args.dim),
                      "build": build_rates(args.rows, args.dim)}, indent=1))


if __name__ == "__main__":
    main()
