"""Encode the distillation corpus with one teacher into the teacher-vector cache, before the
training runs start (they then all read the cache instead of each encoding it again).

    python3 benchmarks/train_gpu_teachers.py --teacher st:all-mpnet-base-v2 \\
        --distill-data TEXTS --distill-data PARQUET --cache DIR [--max-tokens 256]

The texts, their order and the teacher spec are exactly those `pipeline train` uses, so the
cache key (a hash of spec and texts) is the same.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from pipeline.train.objectives import distill_corpus, teacher_targets


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--distill-data", action="append", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    start = time.perf_counter()
    texts, table = distill_corpus(tuple(args.distill_data), args.max_tokens)
    print(f"{len(texts)} texts, {int(table.lengths.sum())} GPT-2 tokens, read in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    vectors = teacher_targets(texts, args.teacher, args.device, args.cache)
    print(f"{args.teacher}: {vectors.shape} in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
