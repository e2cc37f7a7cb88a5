"""Teacher-labelled silver pairs for CoSENT (pipeline/train/silver.py), on the GPU recipe's
cached teacher vectors: STS-B train plus, for --anchors distillation texts, their neighbours
of several ranks and a random text, scored by the ensemble's cosine mapped onto 0-5 by a line
fitted on STS-B train. One TSV that `pipeline train --pairs` reads.

    python3 benchmarks/train_gpu_silver.py --teacher 'st:all-mpnet-base-v2*0.7+...' \\
        --distill-data TEXTS --distill-data PARQUET --cache DIR --out PAIRS.tsv
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from pipeline.analysis.evaluate import load_embedder, read_pairs
from pipeline.train.ensemble import combine, parse_teacher
from pipeline.train.objectives import distill_corpus, ensemble_targets
from pipeline.train.silver import calibration, neighbours, pick_pairs, to_scores

GOLD_LABEL = 4.0  # STS-B's label 1 is a score of 4 or more


def field(text: str) -> str:
    return " ".join(text.split())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--distill-data", action="append", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--stsb", default="data_sets/train.tsv")
    parser.add_argument("--anchors", type=int, default=100_000)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    texts, _ = distill_corpus(tuple(args.distill_data), 256)
    full = ensemble_targets(texts, args.teacher, args.device, args.cache)
    members = parse_teacher(args.teacher)
    weights = [w for _, w in members]
    stsb = read_pairs(args.stsb)
    sides = []
    for spec, _ in members:
        embed, _ = load_embedder(spec, args.device)
        sides.append((embed(stsb.sentence1), embed(stsb.sentence2)))
    v1 = combine([s[0] for s in sides], weights).astype(np.float32)
    v2 = combine([s[1] for s in sides], weights).astype(np.float32)
    a, b = calibration((v1 * v2).sum(1), stsb.score)
    print(f"calibration on {args.stsb}: score = {a:.3f} * cos + {b:.3f}", flush=True)
    rng = np.random.default_rng(args.seed)
    anchors = np.sort(rng.choice(len(texts), size=min(args.anchors, len(texts)), replace=False))
    ids, sims = neighbours(full, anchors, min(args.k, len(texts) - 1), args.device, chunk=1024)
    first, second, cos = pick_pairs(anchors, ids, sims, full, args.seed)
    scores = to_scores(cos, a, b)
    rows = [(s1, s2, score) for s1, s2, score in zip(stsb.sentence1, stsb.sentence2,
                                                     stsb.score, strict=True)]
    rows += [(texts[i], texts[j], score) for i, j, score in zip(first, second, scores,
                                                                strict=True)]
    with open(args.out, "w", encoding="utf-8") as fh:
        # The format read_pairs reads (csv.QUOTE_NONE): no tab or line break inside a field.
        fh.write("sentence1\tsentence2\tlabel\tscore\n")
        for s1, s2, score in rows:
            fh.write(f"{field(s1)}\t{field(s2)}\t{int(score >= GOLD_LABEL)}\t{score:.3f}\n")
    print(f"{len(stsb)} STS-B + {len(first)} silver pairs -> {args.out} "
          f"(score mean {scores.mean():.2f}) in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
