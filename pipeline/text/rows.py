"""Documents -> token rows: the pure part of the tokenize stage, shared by its local
worker processes (stage.py) and its Ray actors (ray_tokenize.py).

Token shard columns: row (global row = FAISS id), doc_id, chunk, start, end (token span within
the document), tokens (uint16: GPT-2 ids fit), text (the window's text).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.errors import UsageError
from pipeline.parquet import numpy_to_arrow, strings_to_arrow
from pipeline.text.corpus import DEFAULT_ID_FIELD, DEFAULT_TEXT_FIELD, Document
from pipeline.text.tokenizer import Tokenizer, window_spans

TOKEN_SCHEMA = pa.schema([
    ("row", pa.int64()), ("doc_id", pa.string()), ("chunk", pa.int32()),
    ("start", pa.int32()), ("end", pa.int32()), ("tokens", pa.list_(pa.uint16())),
    ("text", pa.string()),
])


@dataclass(frozen=True)
class TokenizeSettings:
    text_field: str = DEFAULT_TEXT_FIELD
    id_field: str | None = DEFAULT_ID_FIELD
    max_tokens: int = 256
    overlap: int = 32
    shard_rows: int = 50_000

    def __post_init__(self):
        if self.max_tokens < 2:
            raise UsageError("--max-tokens must be at least 2")
        if not 0 <= self.overlap < self.max_tokens:
            raise UsageError("--overlap must be at least 0 and below --max-tokens")
        if self.shard_rows < 1:
            raise UsageError("--shard-rows must be at least 1")


def window_rows(token_lists: list[list[int]], max_tokens: int, overlap: int) -> dict:
    """The rows of encoded documents as flat arrays: one row per document, or one per window
    of a long one. Pure: the same ids give the same rows.

    Returns doc (index into token_lists), chunk, start, end (int32 arrays), tokens (flat
    uint16) and offsets (int64, len rows + 1).
    """
    lengths = np.fromiter(map(len, token_lists), dtype=np.int64, count=len(token_lists))
    if lengths.size and lengths.max() > max_tokens:
        spans = [window_spans(int(n), max_tokens, overlap) for n in lengths]
    else:  # the common case: every document fits in one window
        spans = [[(0, int(n))] for n in lengths]
    doc = np.fromiter((d for d, sp in enumerate(spans) for _ in sp), dtype=np.int32)
    chunk = np.fromiter((c for sp in spans for c in range(len(sp))), dtype=np.int32,
                        count=doc.size)
    start = np.fromiter((a for sp in spans for a, _ in sp), dtype=np.int32, count=doc.size)
    end = np.fromiter((b for sp in spans for _, b in sp), dtype=np.int32, count=doc.size)
    flat = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.uint16,
                       count=int(lengths.sum()))
    # A window of document d covers flat[doc_start[d] + start : doc_start[d] + end].
    doc_start = np.zeros(len(token_lists) + 1, dtype=np.int64)
    np.cumsum(lengths, out=doc_start[1:])
    row_lengths = (end - start).astype(np.int64)
    offsets = np.zeros(doc.size + 1, dtype=np.int64)
    np.cumsum(row_lengths, out=offsets[1:])
    if doc.size == len(token_lists):
        tokens = flat  # one row per document: the rows are the documents, in order
    else:
        starts = doc_start[doc] + start
        gather = np.repeat(starts - offsets[:-1], row_lengths) + np.arange(offsets[-1])
        tokens = flat[gather]
    return {"doc": doc, "chunk": chunk, "start": start, "end": end, "tokens": tokens,
            "offsets": offsets}


def encode_batch_rows(texts: list[str], max_tokens: int, overlap: int) -> dict:
    """Worker task: encode texts and cut them into rows; split windows get their own text."""
    tokenizer = Tokenizer.load()
    rows = window_rows(tokenizer.encode_batch(texts, num_threads=1), max_tokens, overlap)
    windows_per_doc = np.bincount(rows["doc"], minlength=len(texts))
    split = np.flatnonzero(windows_per_doc[rows["doc"]] > 1)
    rows["window_text"] = {int(r): tokenizer.decode(
        rows["tokens"][rows["offsets"][r]:rows["offsets"][r + 1]].tolist()) for r in split}
    return rows


def rows_to_table(rows: dict, docs: list[Document], first_row: int) -> pa.Table:
    n = rows["doc"].size
    texts = [rows["window_text"].get(r) or docs[d].text
             for r, d in enumerate(rows["doc"].tolist())]
    # numpy_to_arrow and strings_to_arrow, not pa.array: see numpy_to_arrow.
    return pa.table({
        "row": numpy_to_arrow(np.arange(first_row, first_row + n, dtype=np.int64)),
        "doc_id": strings_to_arrow([docs[d].doc_id for d in rows["doc"].tolist()]),
        "chunk": numpy_to_arrow(rows["chunk"]),
        "start": numpy_to_arrow(rows["start"]),
        "end": numpy_to_arrow(rows["end"]),
        "tokens": pa.ListArray.from_arrays(numpy_to_arrow(rows["offsets"].astype(np.int32)),
                                           numpy_to_arrow(rows["tokens"])),
        "text": strings_to_arrow(texts),
    }, schema=TOKEN_SCHEMA)


BATCH_DOCS = 2048  # documents per encode


def batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def with_text(batch: list[Document], stats) -> list[Document]:
    """The documents of a batch that hold text; the empty ones are counted in `stats`."""
    kept = [d for d in batch if d.text.strip()]
    stats.empty_skipped += len(batch) - len(kept)
    return kept


def row_counts(rows: dict) -> tuple[int, int]:
    """(tokens, documents split into windows) of `window_rows`'s rows."""
    return int(rows["offsets"][-1]), int((rows["chunk"] == 1).sum())
