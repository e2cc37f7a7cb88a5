"""What a precision costs in quality: min and mean cosine of its vectors to fp32 over the bench
corpus's documents, and STS-B test Spearman for trained models, for each precision side by
side (issue 19: fp8 against bf16; issue 21: CPU choices).

    python benchmarks/precision_quality.py --device cuda --precisions fp32,bf16,fp8 \
        --models pipeline/models/default,random:gpt2:0 [--docs 4096] [--out FILE]

STS-B test is only measured here (pairs embedded, cosine against the human score), never
tuned on; random models get no Spearman (it means nothing for them).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from pipeline.analysis.evaluate import read_pairs
from pipeline.analysis.metrics import spearman
from pipeline.embed.encoder import Encoder

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed_bench import make_corpus  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default=None)
    parser.add_argument("--precisions", default="fp32,bf16,fp8")
    parser.add_argument("--models", default="pipeline/models/default,random:gpt2:0")
    parser.add_argument("--docs", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        corpus = Path(work) / "corpus.txt"
        make_corpus(corpus, args.docs, seed=1)
        texts = corpus.read_text().splitlines()
    pairs = read_pairs(ROOT / "data_sets" / "test.tsv")
    results = []
    for spec in args.models.split(","):
        ref = None
        for precision in args.precisions.split(","):
            encoder = Encoder.load(spec, args.device, precision=precision)
            tokens = [t[:512] for t in encoder.tokenizer.encode_batch(texts)]
            vectors = encoder.embed_token_lists(tokens)
            ref = vectors if ref is None else ref
            cosine = (vectors * ref).sum(1)
            row = {"model": spec, "asked": precision, "precision": encoder.precision,
                   "device": str(encoder.device), "docs": len(texts),
                   "min_cosine_to_first": float(cosine.min()),
                   "mean_cosine_to_first": float(cosine.mean())}
            if not spec.startswith("random:"):
                a, b = encoder.embed_texts(pairs.sentence1), encoder.embed_texts(pairs.sentence2)
                row["stsb_test_spearman"] = spearman((a * b).sum(1), pairs.score)
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
