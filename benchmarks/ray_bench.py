"""The Ray engines against the local ones, in the same run, on the same token shards.

    python benchmarks/ray_bench.py                        # CPU: the default corpus and model
    python benchmarks/ray_bench.py --docs 500000 --preset gpt2 --dtype float16   # a GPU host

Tokenizes the corpus with the local stage and with `--ray local` (checking the shards are
byte-identical), then embeds the same tokens with the local engine and with the Ray engine
(`--actors` actors; default one per GPU, else one per CPU) and reports each stage's time and
tokens/s, the Ray engine's share of the local one's throughput, its overhead over the local
stage (with and without starting the cluster), when its first actor was ready, what each
worker did, and whether the embedding shards are byte-identical (else the min cosine).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed_bench import DEBIAN, cpu_name, make_corpus  # noqa: E402

from pipeline.embed.engines import ray as ray_engine  # noqa: E402
from pipeline.embed.stage import RayOptions, run_embed  # noqa: E402
from pipeline.folder import IndexFolder  # noqa: E402
from pipeline.model.checkpoint import random_model, save_checkpoint  # noqa: E402
from pipeline.ray_cluster import connect  # noqa: E402
from pipeline.text.stage import TokenizeSettings, run_tokenize  # noqa: E402


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("*.parquet"))
    return names == sorted(p.name for p in b.glob("*.parquet")) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def min_cosine(a: Path, b: Path) -> float:
    x, y = IndexFolder(a).load_vectors(), IndexFolder(b).load_vectors()
    x, y = x.astype(np.float64), y.astype(np.float64)
    cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    return float(cos.min())


def embed_figures(section: dict, seconds: float) -> dict:
    """The stage's wall (model loading and, on Ray, the actors' start included) and its
    steady rate: tokens from the first finished vectors to the last, over that time (both
    engines record when their first shard's vectors and their last came back)."""
    stats = section["stats"]
    first, last = stats.get("first_shard_at_s"), stats.get("last_vectors_at_s")
    return {"seconds": round(seconds, 3), "rows": stats["rows"], "tokens": stats["tokens"],
            "tokens_per_s": round(stats["tokens"] / seconds, 1),
            "steady_tokens_per_s": round(stats["tokens"] / (last - first), 1)
            if first is not None and last and last > first else None,
            **ray_steady(stats), "stats": stats}


def ray_steady(stats: dict) -> dict:
    """The Ray engine's steady rate from its first actor ready to every shard committed:
    what the driver sees, against `steady_tokens_per_s`'s first shard ready for a GPU to the
    last vectors back from one (as the local engine's)."""
    first, done = stats.get("models_ready_at_s"), stats.get("ray_done_at_s")
    if first is None or done is None or done <= first:
        return {}
    return {"steady_to_committed_tokens_per_s": round(stats["tokens"] / (done - first), 1)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=0,
                        help="a generated corpus of N documents (embed_bench's); 0: --corpus")
    parser.add_argument("--corpus", type=Path, default=DEBIAN)
    parser.add_argument("--model", default=None, help="default: the shipped model, or "
                        "random:PRESET saved as a checkpoint with --preset")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--actors", type=int, default=None)
    parser.add_argument("--gpu-calls", default=str(ray_engine.GPU_CALLS),
                        help="comma-separated: one Ray run per value of calls a GPU actor "
                        "runs at a time")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    try:
        spec = args.model
        if args.preset:
            spec = str(save_checkpoint(random_model(args.preset, 0), work / "model"))
        corpus = args.corpus
        settings = TokenizeSettings()
        if args.docs:
            corpus = work / "corpus.txt"
            make_corpus(corpus, args.docs)
            settings = TokenizeSettings(max_tokens=512 if args.preset else 256, overlap=32)

        t = time.perf_counter()
        run_tokenize(corpus, work / "local", settings)
        tokenize_local_s = time.perf_counter() - t
        t = time.perf_counter()
        cluster = connect("local")
        cluster_start_s = time.perf_counter() - t
        t = time.perf_counter()
        run_tokenize(corpus, work / "ray", settings, ray="local")
        tokenize_ray_s = time.perf_counter() - t
        tokens_identical = same_files(work / "local" / "tokens", work / "ray" / "tokens")

        t = time.perf_counter()
        local = run_embed(work / "local", model=spec, device=device, dtype=args.dtype)
        local_s = time.perf_counter() - t
        runs = {}
        for calls in [int(c) for c in args.gpu_calls.split(",")]:
            ray_engine.GPU_CALLS = calls
            shutil.rmtree(work / "ray" / "embeddings", ignore_errors=True)
            t = time.perf_counter()
            on_ray = run_embed(work / "ray", model=spec, device=device, dtype=args.dtype,
                               ray=RayOptions("local", args.actors), overwrite=True)
            runs[calls] = (on_ray, time.perf_counter() - t)
        best = min(runs, key=lambda c: runs[c][1])
        on_ray, ray_s = runs[best]  # the embeddings on disk are the last run's
        identical = same_files(work / "local" / "embeddings", work / "ray" / "embeddings")
        result = {
            "machine": torch.cuda.get_device_name() if device == "cuda" else cpu_name(),
            "cpu": cpu_name(), "device": device, "model": spec or "the default model",
            "corpus": str(corpus if not args.docs else f"{args.docs} generated documents"),
            "cluster": cluster, "cluster_start_s": round(cluster_start_s, 3),
            "tokenize": {"local_s": round(tokenize_local_s, 3),
                         "ray_s": round(tokenize_ray_s, 3),
                         "shards_identical": tokens_identical},
            "embed_local": embed_figures(local, local_s),
            "embed_ray": embed_figures(on_ray, ray_s),
            "embed_ray_by_gpu_calls": {c: embed_figures(*runs[c]) for c in runs},
            "gpu_calls_best": best,
            "ray_share_of_local_tokens_per_s": round(local_s / ray_s, 4),
            "ray_overhead": round(ray_s / local_s - 1, 4),
            "ray_overhead_with_cluster_start": round((ray_s + cluster_start_s) / local_s - 1,
                                                     4),
            "embeddings_identical": identical,
            "min_cosine": 1.0 if identical else min_cosine(work / "local", work / "ray"),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    e_local, e_ray = result["embed_local"], result["embed_ray"]
    steady = (e_ray["steady_tokens_per_s"] or 0) / (e_local["steady_tokens_per_s"] or 1)
    result["ray_share_of_local_steady_tokens_per_s"] = round(steady, 4)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    print(f"\n{result['machine']}: embed stage local {e_local['seconds']:.1f} s "
          f"({e_local['tokens_per_s']:,.0f} tok/s), Ray {e_ray['seconds']:.1f} s "
          f"({e_ray['tokens_per_s']:,.0f} tok/s, {len(e_ray['stats']['workers'])} actors, "
          f"first ready at {e_ray['stats']['models_ready_at_s']} s): "
          f"{result['ray_share_of_local_tokens_per_s']:.1%}"
          f" of local ({steady:.1%} steady: first shard ready to last vectors), overhead "
          f"{result['ray_overhead']:.1%} "
          f"({result['ray_overhead_with_cluster_start']:.1%} with the cluster's "
          f"{cluster_start_s:.1f} s start); shards identical: {identical}; tokenize local "
          f"{tokenize_local_s:.1f} s, Ray {tokenize_ray_s:.1f} s (identical: "
          f"{tokens_identical})")
    for calls, figures in (result["embed_ray_by_gpu_calls"] if device == "cuda"
                           else {"": result["embed_ray"]}).items():
        stats, rate = figures["stats"], figures["steady_tokens_per_s"] or 0
        runs = f"{calls} calls per GPU actor" if device == "cuda" else "CPU actors"
        print(f"Ray, {runs}: {figures['seconds']:.1f} s wall, steady "
              f"{rate:,.0f} tok/s ({rate / (e_local['steady_tokens_per_s'] or 1):.1%}"
              f" of local's {e_local['steady_tokens_per_s'] or 0:,.0f}); first ready at "
              f"{stats.get('models_ready_at_s')} s, first shard ready at "
              f"{stats.get('first_shard_at_s')} s, last vectors at "
              f"{stats.get('last_vectors_at_s')} s, all committed at "
              f"{stats.get('ray_done_at_s')} s (actor ready to committed: "
              f"{figures.get('steady_to_committed_tokens_per_s', 0):,.0f} tok/s); "
              f"local: first shard at "
              f"{e_local['stats'].get('first_shard_at_s')} s, last vectors at "
              f"{e_local['stats'].get('last_vectors_at_s')} s)")
        for w in stats["workers"]:
            print(f"  {w['worker']}: {w['shards']} shards ({w['shards_written']} written "
                  f"there), GPU first to last kernel {w.get('gpu_first_to_last_s')} s, idle "
                  f"between shards {w.get('gpu_idle_between_shards_s')} s; start-up "
                  f"{json.dumps(w['startup'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
