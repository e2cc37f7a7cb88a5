"""Time spherical k-means the way `pipeline cluster` runs it, on synthetic clustered vectors.

    python benchmarks/cluster_bench.py                          # 1M x 768 into 1000 clusters
    python benchmarks/cluster_bench.py --n 100000 --dim 256 --k 100
    python benchmarks/cluster_bench.py --threads 16 --nredo 1   # one k-means run, 16 threads

Phases, each timed: generate the vectors (not part of the pipeline), train k-means on a
uniform sample (pipeline.analysis.cluster.train_spherical_kmeans: k-means++ seeding where
faiss has it, best of --nredo runs), assign every vector to its nearest centroid in blocks of
--block rows (as the pipeline does shard by shard), and score the result against the
generating groups (adjusted Rand index) and by mean similarity to the centroid.

The vectors: k random unit centres plus Gaussian noise, normalised; the noise is set so that
a point's cosine to its centre is about --cosine (default 0.7), so groups overlap like real
topic clusters rather than being cleanly separable.
Needs faiss (faiss-cpu, or faiss-gpu to use the GPUs) and numpy; run from the repository root
or with the package installed.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import faiss  # noqa: E402

from pipeline.analysis import cluster  # noqa: E402
from pipeline.analysis.metrics import adjusted_rand_index, unit_rows  # noqa: E402


def clustered_vectors(n: int, dim: int, k: int, cosine: float, seed: int,
                      block: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 unit vectors around k centres and their generating labels."""
    # centre + noise has cosine 1 / sqrt(1 + noise^2 dim) to the centre, on average
    noise = np.sqrt((1 / cosine**2 - 1) / dim)
    rng = np.random.default_rng(seed)
    centres = unit_rows(rng.standard_normal((k, dim), dtype=np.float32))
    labels = rng.integers(0, k, n).astype(np.int32)
    x = np.empty((n, dim), np.float32)
    for lo in range(0, n, block):  # in blocks, so the noise never needs a second (n, dim)
        hi = min(n, lo + block)
        x[lo:hi] = centres[labels[lo:hi]]
        x[lo:hi] += noise * rng.standard_normal((hi - lo, dim), dtype=np.float32)
        faiss.normalize_L2(x[lo:hi])
    return x, labels


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="vectors (default 1,000,000)")
    p.add_argument("--dim", type=int, default=768, help="dimensions (default 768)")
    p.add_argument("--k", type=int, default=1000, help="clusters (default 1000)")
    p.add_argument("--sample", type=int, default=None,
                   help="training rows (default: min(n, 256 k), faiss's own cap)")
    p.add_argument("--nredo", type=int, default=cluster.NREDO,
                   help=f"k-means runs, best kept (default {cluster.NREDO}, as the pipeline)")
    p.add_argument("--niter", type=int, default=cluster.NITER)
    p.add_argument("--cosine", type=float, default=0.7,
                   help="typical cosine of a vector to its group's centre (default 0.7)")
    p.add_argument("--block", type=int, default=50_000, help="rows per assignment block")
    p.add_argument("--threads", type=int, default=None, help="OpenMP threads (default: all)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    sample = min(args.n, args.sample or 256 * args.k)

    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, "
          f"{faiss.get_num_gpus()} GPU(s), numpy {np.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(f"n={args.n:,} dim={args.dim} k={args.k} sample={sample:,} nredo={args.nredo} "
          f"niter={args.niter} cosine={args.cosine} seed={args.seed}")
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    x, truth = clustered_vectors(args.n, args.dim, args.k, args.cosine, args.seed)
    seconds["generate (not timed in pipeline)"] = time.perf_counter() - start

    start = time.perf_counter()
    rows = np.sort(np.random.default_rng(args.seed).choice(args.n, sample, replace=False))
    centroids = cluster.train_spherical_kmeans(x[rows], args.k, args.seed, niter=args.niter,
                                               nredo=args.nredo)
    seconds["train k-means"] = time.perf_counter() - start

    start = time.perf_counter()
    labels = np.empty(args.n, np.int32)
    sims = np.empty(args.n, np.float32)
    for lo in range(0, args.n, args.block):
        hi = min(args.n, lo + args.block)
        labels[lo:hi], sims[lo:hi] = cluster.nearest_centroid(x[lo:hi], centroids)
    seconds["assign all"] = time.perf_counter() - start

    ari = adjusted_rand_index(truth, labels)
    sizes = np.bincount(labels, minlength=args.k)
    print()
    print(f"{'phase':<34} {'seconds':>9} {'vectors/s':>12}")
    for phase, s in seconds.items():
        count = sample if phase.startswith("train") else args.n
        print(f"{phase:<34} {s:>9.2f} {count / s:>12,.0f}")
    total = seconds["train k-means"] + seconds["assign all"]
    print(f"{'k-means total (train + assign)':<34} {total:>9.2f}")
    print()
    print(f"ARI vs generating groups {ari:.4f}; mean similarity to centroid "
          f"{sims.mean():.4f}; cluster sizes min {sizes.min()} / median "
          f"{int(np.median(sizes))} / max {sizes.max()}; empty clusters "
          f"{int((sizes == 0).sum())}")
    return {"seconds": seconds, "ari": ari, "total": total}


if __name__ == "__main__":
    main()
