"""The committed default model: what its folder records, and its STS-B test score on CPU."""

import json
from pathlib import Path

import pytest

from pipeline.analysis.evaluate import evaluate_embedder, read_pairs
from pipeline.embed.encoder import DEFAULT_MODEL_DIR, Encoder, default_model_spec

ROOT = Path(__file__).resolve().parent.parent
BAR = 0.80  # STS-B test Spearman the default model must keep (0.809 when trained)
# recall@1 on the held-out paragraph checks (data_sets/paragraphs_*.tsv) it must keep: the
# model trained on 2 Dec 2026 reached 0.899 and 0.993 (the first recipe's: 0.902, 0.965).
PARAGRAPH_BARS = {"paragraphs_wiki": 0.88, "paragraphs_bible": 0.98}

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").is_file(),
                                reason="no default model committed yet")


def test_default_model_folder():
    config = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    assert config["attention"] in ("causal", "bidirectional")
    assert config["pooling"] and config["projection_dim"] >= 0
    assert config["n_layer"] <= 4 and config["n_embd"] <= 256  # the CPU budget of `make index`
    total = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file())
    assert total <= 40e6
    for name in ("train_log.jsonl", "eval_test.json"):
        assert (DEFAULT_MODEL_DIR / name).is_file(), name
    assert default_model_spec() == str(DEFAULT_MODEL_DIR)


def test_default_model_meets_the_sts_bar():
    enc = Encoder.load(str(DEFAULT_MODEL_DIR), device="cpu")
    metrics = evaluate_embedder(enc.embed_texts, read_pairs(ROOT / "data_sets" / "test.tsv"),
                                read_pairs(ROOT / "data_sets" / "dev.tsv"))
    assert metrics["spearman"] >= BAR, metrics
    # The committed eval results were measured on this model (CPU and GPU differ by rounding).
    recorded = json.loads((DEFAULT_MODEL_DIR / "eval_test.json").read_text())
    ours = next(r for r in recorded if Path(r["model"]).name == DEFAULT_MODEL_DIR.name)
    assert ours["metrics"]["spearman"] == pytest.approx(metrics["spearman"], abs=0.01)


@pytest.mark.parametrize("name", sorted(PARAGRAPH_BARS))
def test_default_model_meets_the_paragraph_bars(name):
    from pipeline.analysis.paragraphs import (
        embed_paragraphs,
        rank_metrics,
        read_paragraphs,
        retrieval_ranks,
    )

    data = read_paragraphs(ROOT / "data_sets" / f"{name}.tsv")
    enc = Encoder.load(str(DEFAULT_MODEL_DIR), device="cpu")
    queries, docs = embed_paragraphs(enc.embed_texts, data)
    metrics = rank_metrics(retrieval_ranks(queries, docs, data.documents))
    assert metrics["recall@1"] >= PARAGRAPH_BARS[name], metrics
    recorded = json.loads((DEFAULT_MODEL_DIR / "eval_test.json").read_text())
    ours = next(r for r in recorded if Path(r["model"]).name == DEFAULT_MODEL_DIR.name)
    assert ours["paragraphs"][name]["recall@1"] == pytest.approx(metrics["recall@1"], abs=0.01)
