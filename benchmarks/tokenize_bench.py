"""Tokenize a synthetic 1M-line corpus with `pipeline tokenize` in a subprocess; report MB/s and
peak memory (the bar: under 1 GB, i.e. memory bounded by the shard size, not the corpus).

The stage encodes in forked worker processes, so the peak of any one process (ru_maxrss) is not
the whole: on Linux the process tree's summed RSS and PSS (shared pages split between the
processes sharing them) are sampled every 20 ms, and PSS is held to the bar.

    python benchmarks/tokenize_bench.py [--lines 1000000] [--shard-rows 50000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

WORDS = ("the a of to and in is for on with as by at from that this package library tool "
         "provides support files data python debian system network server client image audio "
         "video text editor terminal graphics game kernel module driver documentation").split()


def write_corpus(path: Path, lines: int, seed: int = 0) -> int:
    """Lines of 5-120 words (mean ~40 tokens), with a few long ones that get split."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(lines):
            n = 600 if i % 1000 == 0 else rng.randint(5, 60)
            fh.write(" ".join(rng.choices(WORDS, k=n)) + f" #{i}\n")
    return path.stat().st_size


def process_tree(root: int) -> list[int]:
    """root and its descendants, from /proc/*/stat (Linux)."""
    parent = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:  # exited meanwhile
                continue
            parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, ppid in parent.items() if ppid in frontier]
        tree += frontier
    return tree


def tree_memory_mb(root: int) -> tuple[float, float]:
    """(RSS, PSS) in MB summed over root's process tree; (0, 0) where /proc cannot tell."""
    rss = pss = 0
    for pid in process_tree(root):
        try:
            lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith("Rss:"):
                rss += int(line.split()[1])
            elif line.startswith("Pss:"):
                pss += int(line.split()[1])
    return rss / 1024, pss / 1024


def run_sampled(cmd: list[str]) -> tuple[float, float]:
    """Run cmd to completion; the peak (RSS, PSS) of its process tree, sampled every 20 ms."""
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    peak = [0.0, 0.0]

    def sample():
        while proc.poll() is None:
            rss, pss = tree_memory_mb(proc.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if proc.wait() != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    sampler.join()
    return peak[0], peak[1]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--shard-rows", type=int, default=50_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        size = write_corpus(corpus, args.lines)
        started = time.perf_counter()
        tree_rss_mb, tree_pss_mb = run_sampled(
            [sys.executable, "-m", "pipeline.cli", "tokenize", str(corpus),
             "--index", str(Path(tmp) / "idx"), "--shard-rows", str(args.shard_rows)])
        seconds = time.perf_counter() - started
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        stats = json.loads((Path(tmp) / "idx" / "manifest.json").read_text())["tokenize"]["stats"]
    result = {"lines": args.lines, "corpus_mb": round(size / 1e6, 1),
              "rows": stats["rows"], "tokens": stats["tokens"],
              "wall_s": round(seconds, 1), "mb_per_s_wall": round(size / 1e6 / seconds, 2),
              "mb_per_s_stage": stats["mb_per_s"],
              "peak_rss_mb_one_process": round(peak_mb),
              "peak_rss_mb_all_processes": round(tree_rss_mb),
              "peak_pss_mb_all_processes": round(tree_pss_mb), "bar_peak_mb": 1024}
    print(json.dumps(result, indent=2))
    return 0 if max(peak_mb, tree_pss_mb) < 1024 else 1


if __name__ == "__main__":
    sys.exit(main())
