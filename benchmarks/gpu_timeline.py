"""Where the GPU waits during the embed stage: the gaps in its kernel timeline.

    python benchmarks/gpu_timeline.py [--docs 300000] [--tokenize] [--profile]

Runs the embed stage over token shards of the bench corpus (with --tokenize, raw text to
embeddings as `pipeline tokenize --embed`) and prints where cuda:0 waited between forward
passes, with what its feeding thread was doing meanwhile (`Encoder.pass_log`). With
--profile, under torch.profiler (GPU activity only): how much of the GPU's span its kernels
and copies fill, the idle time by gap size, and the largest gaps with the kernels around them.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from embed_bench import make_corpus
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from pipeline.embed.encoder import Encoder
from pipeline.embed.overlap import run_tokenize_and_embed
from pipeline.embed.stage import run_embed
from pipeline.model.checkpoint import random_model, save_checkpoint
from pipeline.text.stage import TokenizeSettings, run_tokenize


def gpu_intervals(prof, device_index: int = 0) -> list[tuple[int, int, str]]:
    """(start ns, end ns, name) of each kernel and copy the GPU ran, in start order."""
    out = [(e.start_ns(), e.end_ns(), e.name()) for e in prof.profiler.kineto_results.events()
           if e.device_type() == DeviceType.CUDA and e.device_index() == device_index]
    return sorted(out)


def summarize(intervals: list[tuple[int, int, str]]) -> str:
    starts = np.array([a for a, _, _ in intervals], dtype=np.int64)
    ends = np.maximum.accumulate(np.array([b for _, b, _ in intervals], dtype=np.int64))
    gaps = np.maximum(starts[1:] - ends[:-1], 0) / 1e3  # us
    span = (ends[-1] - starts[0]) / 1e9
    lines = [f"GPU span {span:.3f} s, busy {span - gaps.sum() / 1e6:.3f} s "
             f"({1 - gaps.sum() / 1e6 / span:.1%}), {len(intervals):,} kernels and copies"]
    for low, high in ((0, 20), (20, 100), (100, 1000), (1000, 10_000), (10_000, 1e12)):
        sel = (gaps >= low) & (gaps < high)
        lines.append(f"  gaps {low:>6}-{high:<6.0f} us: {sel.sum():>7,} of them, "
                     f"{gaps[sel].sum() / 1e6:.3f} s idle")
    for i in np.argsort(-gaps)[:12]:
        lines.append(f"  {gaps[i] / 1e3:8.2f} ms at {(ends[i] - starts[0]) / 1e9:7.3f} s after "
                     f"{intervals[i][2][:50]!r} before {intervals[i + 1][2][:50]!r}")
    return "\n".join(lines)


def pass_gaps(log: list[dict]) -> str:
    """The GPU's idle time between consecutive passes, and the host's doings before each."""
    rows, seen = [], {log[0]["window_tokens"]}
    for before, after in zip(log, log[1:], strict=False):
        after["new_shape"] = after["window_tokens"] not in seen
        seen.add(after["window_tokens"])
        idle_ms = before["end"].elapsed_time(after["begin"])
        between_s = after["at"] - (before["at"] + before["wait_s"] + before["launch_s"])
        rows.append((idle_ms, between_s, after))
    idle = np.array([r[0] for r in rows])
    first = np.array([r[2]["first_of_call"] for r in rows])
    new = np.array([r[2]["new_shape"] for r in rows])
    lines = [f"{len(log)} passes; {len(seen)} window counts {sorted(seen)}; GPU idle between "
             f"passes {idle.sum() / 1e3:.3f} s, of it {idle[first].sum() / 1e3:.3f} s before "
             f"a shard's first pass, {idle[new].sum() / 1e3:.3f} s before the first pass of a "
             f"window count; passes after > 5 ms idle: {(idle > 5).sum()}"]
    for i in np.argsort(-idle)[:15]:
        idle_ms, between_s, p = rows[i]
        lines.append(f"  {idle_ms:7.2f} ms idle before pass {i + 1}: host "
                     f"{between_s * 1e3:7.2f} ms elsewhere, {p['wait_s'] * 1e3:6.2f} ms waiting "
                     f"for the GPU, {p['launch_s'] * 1e3:7.2f} ms launching"
                     f"{'; first of a shard' if p['first_of_call'] else ''}"
                     f"{'; new window count' if p['new_shape'] else ''}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=300_000)
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--tokenize", action="store_true",
                        help="raw text to embeddings (tokenize --embed), not the embed stage")
    parser.add_argument("--profile", action="store_true", help="also under torch.profiler")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gpu-timeline-"))
    try:
        corpus = work / "corpus.txt"
        make_corpus(corpus, args.docs)
        settings = TokenizeSettings(max_tokens=512, overlap=32)
        spec = str(save_checkpoint(random_model(args.preset, 0), work / "model"))
        if not args.tokenize:
            run_tokenize(corpus, work / "idx", settings)
        logs = []
        load = Encoder.load.__func__

        def load_logged(cls, *args, **kwargs):  # every encoder the run loads keeps a log
            encoder = load(cls, *args, **kwargs)
            encoder.pass_log = []
            logs.append(encoder.pass_log)
            return encoder

        Encoder.load = classmethod(load_logged)
        torch.cuda.init()
        t = time.perf_counter()
        profiled = profile(activities=[ProfilerActivity.CUDA]) if args.profile else None
        with profiled or contextlib.nullcontext():
            if args.tokenize:
                result = run_tokenize_and_embed(corpus, work / "idx", settings, model=spec,
                                                device="cuda", dtype="float16")[1]
            else:
                result = run_embed(work / "idx", model=spec, device="cuda", dtype="float16")
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
        stats = result["stats"]
        how = "under the profiler " if args.profile else ""
        print(f"{torch.cuda.get_device_name()}: {stats['tokens']:,} tokens in {wall:.2f} s "
              f"{how}({stats['tokens'] / wall / 1e6:.2f}M tok/s); "
              f"models warm at {stats.get('models_ready_at_s')} s, first token shard at "
              f"{stats.get('first_tokens_at_s')} s, "
              f"first shard at {stats.get('first_shard_at_s')} s, last vectors at "
              f"{stats.get('last_vectors_at_s')} s; waited {stats.get('read_wait_s')} s for "
              f"shards to be read, {stats.get('slot_wait_s')} s for writers")
        print(f"first pass queued at {logs[0][0]['at'] - t:.3f} s")
        print(pass_gaps(logs[0]))
        if args.profile:
            print(summarize(gpu_intervals(profiled)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
