"""What the worker thread does with a batch of requests (`run_jobs`): one tokenization, one
forward pass over every text of every request, and one FAISS search per distinct k.

A request is a Job: texts to embed and, for a search, its k. The answers are those of
`Searcher.search` and `Searcher.embed`, taken apart per request, plus what the HTTP answer
says besides: which texts were cut to the model's context, and how many tokens were read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.search import Hit, Searcher


@dataclass(frozen=True)
class Job:
    texts: tuple[str, ...]
    k: int | None = None  # None: embed only


@dataclass
class Answer:
    vectors: np.ndarray             # (len(texts), dim) float32 unit vectors
    truncated: list[bool]           # the text was longer than the model's context
    tokens: list[int]               # tokens embedded per text (after truncation)
    hits: list[list[Hit]] | None    # per text, for a search
    model: str


def estimated_tokens(texts: Sequence[str], max_tokens: int) -> int:
    """A batch's cost before tokenizing (which the worker does, off the event loop): about
    four characters a token in English, never more than the context per text."""
    return sum(min(max_tokens, len(t) // 4 + 1) for t in texts)


def run_jobs(searcher: Searcher, jobs: Sequence[Job]) -> list[Answer]:
    """The answer to each job, in order, from one forward pass."""
    encoder = searcher.encoder
    limit = encoder.max_tokens
    texts = [t for job in jobs for t in job.texts]
    token_lists = encoder.tokenizer.encode_batch(texts)
    # As Searcher.embed (embed_texts is these two steps), with the lengths kept.
    vectors = encoder.embed_token_lists(token_lists).astype(np.float32)
    bounds = np.cumsum([0] + [len(job.texts) for job in jobs]).tolist()
    spans = list(zip(bounds[:-1], bounds[1:], strict=True))
    hits = search_groups(searcher, jobs, vectors, spans)
    return [Answer(vectors[lo:hi], [len(t) > limit for t in token_lists[lo:hi]],
                   [min(len(t), limit) for t in token_lists[lo:hi]], hits.get(j), encoder.spec)
            for j, (lo, hi) in enumerate(spans)]


def search_groups(searcher: Searcher, jobs: Sequence[Job], vectors: np.ndarray,
                  spans: Sequence[tuple[int, int]]) -> dict[int, list[list[Hit]]]:
    """Hits per search job (by position): one FAISS search per distinct k, so that each
    request gets exactly what `Searcher.search(texts, k)` would."""
    out: dict[int, list[list[Hit]]] = {}
    for k in sorted({job.k for job in jobs if job.k is not None}):
        group = [j for j, job in enumerate(jobs) if job.k == k]
        rows = np.concatenate([np.arange(*spans[j]) for j in group])
        found = searcher.search_vectors(vectors[rows], k)
        start = 0
        for j in group:
            n = spans[j][1] - spans[j][0]
            out[j], start = found[start:start + n], start + n
    return out
