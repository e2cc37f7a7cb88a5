"""Where the GPU time of the packed forward goes (GPT-2 124M, bf16 or fp8, CUDA).

    python benchmarks/model_profile.py [--tokens 4000000] [--precision fp8]

Times `Encoder.start_embed_flat` on random ids with the bench corpus's length distribution
(lognormal, mean ~46 tokens) for a few token budgets per forward pass, then the GPU's idle
gaps over all passes and the kernels that take the most time in one pass (torch.profiler).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from pipeline.embed.encoder import Encoder


def lengths_like_the_bench(n_tokens: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(30), 0.8, n_tokens // 20), 2, 512).astype(np.int64)
    return lengths[np.cumsum(lengths) <= n_tokens]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4_000_000)
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--window", type=int, default=128,
                        help="attention window of short sequences; 0: varlen kernel for all")
    parser.add_argument("--precision", default="bf16", help="bf16 or fp8")
    args = parser.parse_args()
    encoder = Encoder.load(f"random:{args.preset}:0", "cuda", precision=args.precision)
    encoder.window = args.window
    lengths = lengths_like_the_bench(args.tokens)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.random.default_rng(1).integers(0, 50257, int(offsets[-1])).astype(np.int32)
    print(f"{torch.cuda.get_device_name()}: {len(lengths):,} sequences, {offsets[-1]:,} tokens, "
          f"mean {lengths.mean():.1f}")
    for budget in (32768, 65536, 131072):
        # Warm up: the fused kernel's compile, cuDNN's plans for these window counts.
        encoder.start_embed_flat(values[:offsets[20000]], offsets[:20001], budget).result()
        torch.cuda.synchronize()
        t = time.perf_counter()
        pending = encoder.start_embed_flat(values, offsets, budget, dtype=np.float16)
        pending.result()
        wall = time.perf_counter() - t
        print(f"batch tokens {budget:>7}: {offsets[-1] / wall / 1e6:.2f}M tokens/s wall, "
              f"{offsets[-1] / pending.gpu_seconds / 1e6:.2f}M tokens/s GPU span")
    n = int(np.searchsorted(offsets, 65536, side="right")) - 1
    from gpu_timeline import gpu_intervals, summarize
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:  # idle gaps over all passes
        encoder.start_embed_flat(values, offsets, 65536, dtype=np.float16).result()
    print("65536 tokens a pass:", summarize(gpu_intervals(prof)))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        encoder.start_embed_flat(values[:offsets[n]], offsets[:n + 1], 65536).result()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14,
                                    max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
