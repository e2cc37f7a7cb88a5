"""Stage 1: corpus -> tokens/part-NNNNN.parquet + manifest.json.

Documents stream through in batches (tiktoken encodes a batch on several threads) and leave as
shards of at most `shard_rows` rows, so memory is bounded by the shard size, never the corpus.
A document longer than `max_tokens` becomes several overlapping windows (rows with the same
doc_id, chunk 0, 1, ... and their token span), never silently cut.

Token shard columns: row (global row = FAISS id), doc_id, chunk, start, end (token span within
the document), tokens (uint16: GPT-2 ids fit), text (the window's text).

The new shards are written to tokens.tmp/ and swapped in only when complete, so an interrupted
run leaves the previous index untouched; re-tokenizing drops the embeddings and index built on
the old tokens.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from . import __version__
from .corpus import (
    DEFAULT_ID_FIELD,
    DEFAULT_TEXT_FIELD,
    CorpusError,
    Document,
    ReadStats,
    corpus_fingerprint,
    iter_documents,
    resolve_corpus,
)
from .shards import (
    EMBEDDINGS_DIR,
    FORMAT_VERSION,
    MANIFEST,
    TOKENS_DIR,
    atomic_write_table,
    file_sha256,
    shard_name,
    write_manifest,
)
from .tokenizer import Tokenizer, find_ranks_file, window_spans

log = logging.getLogger(__name__)

TOKEN_SCHEMA = pa.schema([
    ("row", pa.int64()), ("doc_id", pa.string()), ("chunk", pa.int32()),
    ("start", pa.int32()), ("end", pa.int32()), ("tokens", pa.list_(pa.uint16())),
    ("text", pa.string()),
])
INDEX_OUTPUTS = ("index.faiss", "index.json")


@dataclass(frozen=True)
class TokenizeSettings:
    text_field: str = DEFAULT_TEXT_FIELD
    id_field: str | None = DEFAULT_ID_FIELD
    max_tokens: int = 256
    overlap: int = 32
    shard_rows: int = 50_000

    def __post_init__(self):
        if self.max_tokens < 2:
            raise ValueError("--max-tokens must be at least 2")
        if not 0 <= self.overlap < self.max_tokens:
            raise ValueError("--overlap must be at least 0 and below --max-tokens")
        if self.shard_rows < 1:
            raise ValueError("--shard-rows must be at least 1")


@dataclass
class Chunk:
    doc_id: str
    chunk: int
    start: int
    end: int
    tokens: list[int]
    text: str


def chunk_documents(docs: Iterable[Document], token_lists: Iterable[list[int]],
                    tokenizer: Tokenizer, max_tokens: int, overlap: int) -> Iterator[Chunk]:
    """Rows for encoded documents: one per document, or one per window of a long one."""
    for doc, ids in zip(docs, token_lists, strict=True):
        spans = window_spans(len(ids), max_tokens, overlap)
        for number, (start, end) in enumerate(spans):
            window = ids[start:end]
            text = doc.text if len(spans) == 1 else tokenizer.decode(window)
            yield Chunk(doc.doc_id, number, start, end, window, text)


def chunks_to_table(chunks: list[Chunk], first_row: int) -> pa.Table:
    lengths = np.fromiter((len(c.tokens) for c in chunks), dtype=np.int64, count=len(chunks))
    offsets = np.zeros(len(chunks) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((t for c in chunks for t in c.tokens), dtype=np.uint16,
                       count=int(lengths.sum()))
    tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
    return pa.table({
        "row": pa.array(np.arange(first_row, first_row + len(chunks), dtype=np.int64)),
        "doc_id": pa.array([c.doc_id for c in chunks], pa.string()),
        "chunk": pa.array([c.chunk for c in chunks], pa.int32()),
        "start": pa.array([c.start for c in chunks], pa.int32()),
        "end": pa.array([c.end for c in chunks], pa.int32()),
        "tokens": tokens,
        "text": pa.array([c.text for c in chunks], pa.string()),
    }, schema=TOKEN_SCHEMA)


def batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_section(files, settings: TokenizeSettings, tokenizer_name: str) -> dict:
    """The part of the manifest that decides whether existing tokens are current."""
    ranks = find_ranks_file()
    return {"corpus": corpus_fingerprint(files), "settings": asdict(settings),
            "tokenizer": {"name": tokenizer_name,
                          "ranks_sha256": file_sha256(ranks) if ranks else None}}


def is_current(manifest: dict | None, section: dict, index_dir: Path) -> bool:
    if not manifest or "tokenize" not in manifest:
        return False
    old = manifest["tokenize"]
    if any(old.get(k) != v for k, v in section.items()):
        return False
    return all((index_dir / TOKENS_DIR / s["name"]).is_file() for s in old.get("shards", []))


def run_tokenize(corpus: str | Path, index_dir: str | Path, settings: TokenizeSettings,
                 progress=None, force: bool = False) -> dict:
    """Tokenize a corpus into an index folder; returns the manifest's tokenize section.

    `progress` is a tqdm-like object (update(n), set_postfix) or None.
    """
    import json

    index_dir = Path(index_dir)
    files, root = resolve_corpus(corpus)
    tokenizer = Tokenizer.load()
    section = tokenize_section(files, settings, tokenizer.name)
    manifest_path = index_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    if not force and is_current(manifest, section, index_dir):
        return {**manifest["tokenize"], "skipped": True}

    created = not index_dir.exists()
    work = index_dir / (TOKENS_DIR + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        shards, stats, counts, seconds = write_token_shards(files, root, work, settings,
                                                            tokenizer, progress)
    except BaseException:
        # Nothing half-written survives: the previous tokens (if any) stay as they were.
        shutil.rmtree(work, ignore_errors=True)
        if created:
            shutil.rmtree(index_dir, ignore_errors=True)
        raise

    # Swap in the new tokens; what was built on the old ones is now stale.
    for stale in (TOKENS_DIR, EMBEDDINGS_DIR):
        shutil.rmtree(index_dir / stale, ignore_errors=True)
    for stale in INDEX_OUTPUTS:
        (index_dir / stale).unlink(missing_ok=True)
    work.rename(index_dir / TOKENS_DIR)
    result = {
        **section,
        "shards": shards,
        "stats": {"files": stats.files, "documents": stats.documents,
                  "empty_skipped": stats.empty_skipped,
                  "undecodable_replaced": stats.undecodable_replaced,
                  **counts, "bytes": stats.bytes_read, "seconds": round(seconds, 3),
                  "mb_per_s": round(stats.bytes_read / 1e6 / max(seconds, 1e-9), 2)},
        "versions": versions(),
    }
    write_manifest(index_dir, {"format_version": FORMAT_VERSION, "tokenize": result})
    return result


def write_token_shards(files, root, work: Path, settings: TokenizeSettings,
                       tokenizer: Tokenizer, progress):
    """Stream documents into shards under `work`; returns (shards, stats, counts, seconds)."""
    stats = ReadStats()
    started = time.perf_counter()
    shards: list[dict] = []
    pending: list[Chunk] = []
    docs_in_pending: set[str] = set()
    n_rows = n_tokens = split_docs = 0

    def flush():
        nonlocal pending, docs_in_pending
        name = shard_name(len(shards))
        path = atomic_write_table(chunks_to_table(pending, n_rows - len(pending)), work / name)
        shards.append({"name": name, "first_row": n_rows - len(pending), "rows": len(pending),
                       "docs": len(docs_in_pending), "sha256": file_sha256(path)})
        pending, docs_in_pending = [], set()

    docs = iter_documents(files, root, stats, settings.text_field, settings.id_field)
    for batch in batched(docs, 4096):
        kept = [d for d in batch if d.text.strip()]
        stats.empty_skipped += len(batch) - len(kept)
        token_lists = tokenizer.encode_batch([d.text for d in kept])
        for chunk in chunk_documents(kept, token_lists, tokenizer, settings.max_tokens,
                                     settings.overlap):
            pending.append(chunk)
            docs_in_pending.add(chunk.doc_id)
            n_rows += 1
            n_tokens += len(chunk.tokens)
            split_docs += chunk.chunk == 1  # counts each split document once
            if len(pending) >= settings.shard_rows:
                flush()
        if progress is not None:
            progress.update(len(batch))
            progress.set_postfix(rows=n_rows, MB=f"{stats.bytes_read / 1e6:.0f}")
    if pending:
        flush()
    if n_rows == 0:
        raise CorpusError(f"{root}: no documents with text "
                          f"({stats.documents} read, {stats.empty_skipped} empty)")
    counts = {"rows": n_rows, "split_documents": split_docs, "tokens": n_tokens}
    return shards, stats, counts, time.perf_counter() - started


def versions() -> dict:
    import sys

    import faiss
    import pyarrow
    import tiktoken
    import torch

    return {"pipeline": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
            "tiktoken": tiktoken.__version__, "pyarrow": pyarrow.__version__,
            "faiss": faiss.__version__}
