"""Paragraph-level checks of sentence encoders on held-out (query, document) TSV files.

A paragraph file has a header ``query<TAB>document`` (csv QUOTE_NONE, UTF-8); row i's query
belongs with row i's document (wiki: "Title: short description" -> the article's lead; bible:
a KJV passage -> the WEB translation of the same verses). Metrics, pure functions of numpy
arrays:

- retrieval: each query must find its own document among all documents of the file
  (recall@1, recall@10, MRR); a tie with a *different* text counts against the right answer,
  so a model that maps everything to one vector scores rank N, not rank 1;
- margin: mean cosine of matching (query, document) pairs minus the mean over all
  non-matching pairs;
- agreement with a reference model (a teacher): Pearson and Spearman between the model's and
  the reference's cosines over a fixed set of document pairs (each document's 5 nearest
  others by the reference, plus 5 seeded-random others). The pairs depend only on the
  reference's vectors and the seed, so every model is scored on the same pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.analysis.metrics import Embedder, pearson, spearman, unit_rows
from pipeline.analysis.tsv import read_tsv
from pipeline.errors import InputFileError, UsageError

NEIGHBOURS = 5  # nearest other documents per document in the agreement pairs
RANDOM_OTHERS = 5  # seeded-random other documents per document
AGREEMENT_SEED = 0
BLOCK_ROWS = 1024  # rows of an N x N similarity matrix held at once


# ---------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class ParagraphData:
    """Aligned queries and documents of one file; `name` (the file stem) keys its results."""

    path: Path
    queries: list[str]
    documents: list[str]

    @property
    def name(self) -> str:
        return self.path.stem

    def __len__(self) -> int:
        return len(self.queries)


def read_paragraphs(path: str | Path) -> ParagraphData:
    """Read a TSV with a header naming query and document; every row needs both, non-empty."""
    path = Path(path)
    rows = read_tsv(path, ("query", "document"))
    for line, row in enumerate(rows, start=2):
        # DictReader fills a short row with None; an empty text would embed as nothing.
        if not row["query"] or not row["document"]:
            raise InputFileError(f"{path}: line {line} lacks a query or a document")
    return ParagraphData(path, [r["query"] for r in rows], [r["document"] for r in rows])


def read_paragraph_files(paths: Sequence[str | Path]) -> list[ParagraphData]:
    """Every file, read before any model loads; their stems must differ (they key results)."""
    files = [read_paragraphs(p) for p in paths]
    names = [f.name for f in files]
    for name in names:
        if names.count(name) > 1:
            raise UsageError(f"two --paragraphs files are named {name!r}; rename one")
    return files


def embed_paragraphs(embed: Embedder, data: ParagraphData) -> tuple[np.ndarray, np.ndarray]:
    """(query vectors, document vectors), unit rows, each distinct text encoded once."""
    unique = list(dict.fromkeys(data.queries + data.documents))
    row = {s: i for i, s in enumerate(unique)}
    vectors = unit_rows(embed(unique))
    return vectors[[row[s] for s in data.queries]], vectors[[row[s] for s in data.documents]]


# ---------------------------------------------------------------------------------------------
# Retrieval and margin


def retrieval_ranks(queries: np.ndarray, docs: np.ndarray, doc_texts: Sequence[str]
                    ) -> np.ndarray:
    """1-based rank of doc i for query i: 1 + the documents of another text scoring at least
    as high. Unlike evaluate.retrieval_metrics, ties count against the right answer (else a
    collapsed model would look perfect); a copy of the right text never does, whatever
    rounding gives it. Rows are unit vectors; the N x N matrix is made BLOCK_ROWS at a time."""
    queries, docs = np.asarray(queries, np.float32), np.asarray(docs, np.float32)
    _, text_id = np.unique(np.asarray(doc_texts, dtype=object), return_inverse=True)
    ranks = np.empty(len(queries), np.int64)
    for lo in range(0, len(queries), BLOCK_ROWS):
        hi = min(len(queries), lo + BLOCK_ROWS)
        sims = queries[lo:hi] @ docs.T
        right = sims[np.arange(hi - lo), np.arange(lo, hi)]
        other_text = text_id[None, :] != text_id[lo:hi, None]
        ranks[lo:hi] = 1 + ((sims >= right[:, None]) & other_text).sum(axis=1)
    return ranks


def rank_metrics(ranks: np.ndarray, ks: Sequence[int] = (1, 10)) -> dict[str, float]:
    """recall@k and mean reciprocal rank, named as evaluate.retrieval_metrics names them."""
    out = {f"recall@{k}": float((ranks <= k).mean()) for k in ks}
    out["mrr"] = float((1.0 / ranks).mean())
    return out


def margin_metrics(queries: np.ndarray, docs: np.ndarray) -> dict[str, float]:
    """Mean cosine of matching pairs, of all N(N-1) non-matching pairs, and their difference.

    The non-matching mean is exact and needs no sample: the sum over all (i, j) of
    q_i . d_j is (sum q) . (sum d); taking away the diagonal leaves the non-matching sum.
    """
    q, d = np.asarray(queries, np.float64), np.asarray(docs, np.float64)
    n = len(q)
    matching = (q * d).sum(axis=1)
    out = {"match_cosine": float(matching.mean())}
    if n > 1:
        others = (q.sum(axis=0) @ d.sum(axis=0) - matching.sum()) / (n * (n - 1))
        out["other_cosine"] = float(others)
        out["margin"] = out["match_cosine"] - out["other_cosine"]
    return out


# ---------------------------------------------------------------------------------------------
# Agreement with a reference model


def nearest_others(docs: np.ndarray, k: int) -> np.ndarray:
    """(N, k) indices of each row's k highest-cosine other rows (unit rows), in blocks."""
    docs = np.asarray(docs, np.float32)
    n = len(docs)
    out = np.empty((n, k), np.int64)
    for lo in range(0, n, BLOCK_ROWS):
        hi = min(n, lo + BLOCK_ROWS)
        sims = docs[lo:hi] @ docs.T
        sims[np.arange(hi - lo), np.arange(lo, hi)] = -np.inf  # a document is not its own pair
        out[lo:hi] = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    return out


def agreement_pairs(reference_docs: np.ndarray, neighbours: int = NEIGHBOURS,
                    random_others: int = RANDOM_OTHERS, seed: int = AGREEMENT_SEED
                    ) -> np.ndarray:
    """(P, 2) sorted, distinct index pairs i < j: each document with its nearest others by the
    reference (the pairs a teacher ranks most finely, where a student most often errs) and with
    seeded-random others (the broad scale of cosines). Empty for fewer than two documents."""
    n = len(reference_docs)
    if n < 2:
        return np.empty((0, 2), np.int64)
    rows = np.arange(n)[:, None]
    near = nearest_others(unit_rows(reference_docs), min(neighbours, n - 1))
    # Random j != i: draw from the n - 1 others by skipping i.
    drawn = np.random.default_rng(seed).integers(0, n - 1, size=(n, random_others))
    drawn += drawn >= rows
    partners = np.concatenate([near, drawn], axis=1)
    firsts = np.broadcast_to(rows, partners.shape)
    pairs = np.stack([np.minimum(firsts, partners), np.maximum(firsts, partners)], axis=-1)
    return np.unique(pairs.reshape(-1, 2), axis=0)


def pair_cosines(docs: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    docs = unit_rows(docs, np.float64)
    return (docs[pairs[:, 0]] * docs[pairs[:, 1]]).sum(axis=1)


def agreement_metrics(docs: np.ndarray, reference_docs: np.ndarray, pairs: np.ndarray
                      ) -> dict[str, float]:
    """Pearson and Spearman of the model's against the reference's cosines over `pairs`."""
    if not len(pairs):
        return {}
    mine, theirs = pair_cosines(docs, pairs), pair_cosines(reference_docs, pairs)
    return {"agreement_pearson": pearson(mine, theirs),
            "agreement_spearman": spearman(mine, theirs),
            "agreement_pairs": float(len(pairs))}


@dataclass(frozen=True)
class Reference:
    """A reference model's document vectors and agreement pairs, per paragraph file name."""

    name: str
    documents: dict[str, np.ndarray]
    pairs: dict[str, np.ndarray]


def make_reference(name: str, documents: dict[str, np.ndarray]) -> Reference:
    return Reference(name, documents, {k: agreement_pairs(v) for k, v in documents.items()})


def reference_from_model(embed: Embedder, name: str, files: Sequence[ParagraphData]
                         ) -> Reference:
    """Encode only the documents: agreement compares documents with documents."""
    return make_reference(name, {f.name: unit_rows(embed(f.documents)) for f in files})


# ---------------------------------------------------------------------------------------------
# One model on one file


def paragraph_metrics(queries: np.ndarray, docs: np.ndarray, data: ParagraphData,
                      reference: Reference | None = None) -> dict[str, float]:
    """Every paragraph metric of one model on one file, from its query and document vectors."""
    out: dict[str, float] = {"pairs": float(len(data))}
    out.update(rank_metrics(retrieval_ranks(queries, docs, data.documents)))
    out.update(margin_metrics(queries, docs))
    if reference is not None:
        out.update(agreement_metrics(docs, reference.documents[data.name],
                                     reference.pairs[data.name]))
    return out
