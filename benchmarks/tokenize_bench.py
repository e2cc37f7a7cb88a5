"""Tokenize a synthetic 1M-line corpus with `pipeline tokenize` in a subprocess; report MB/s and
peak RSS (the bar: under 1 GB, i.e. memory bounded by the shard size, not the corpus).

    python benchmarks/tokenize_bench.py [--lines 1000000] [--shard-rows 50000]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--shard-rows", type=int, default=50_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        size = write_corpus(corpus, args.lines)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipeline.cli", "tokenize", str(corpus),
                        "--index", str(Path(tmp) / "idx"), "--shard-rows",
                        str(args.shard_rows)], check=True, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        stats = json.loads((Path(tmp) / "idx" / "manifest.json").read_text())["tokenize"]["stats"]
    result = {"lines": args.lines, "corpus_mb": round(size / 1e6, 1),
              "rows": stats["rows"], "tokens": stats["tokens"],
              "wall_s": round(seconds, 1), "mb_per_s_wall": round(size / 1e6 / seconds, 2),
              "mb_per_s_stage": stats["mb_per_s"], "peak_rss_mb": round(peak_mb),
              "bar_peak_rss_mb": 1024}
    print(json.dumps(result, indent=2))
    return 0 if peak_mb < 1024 else 1


if __name__ == "__main__":
    sys.exit(main())
