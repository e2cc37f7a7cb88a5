"""Stage 1: corpus -> tokens/part-NNNNN.parquet + manifest.json.

Documents stream through in batches (tiktoken encodes a batch on several threads) and leave as
shards of at most `shard_rows` rows, so memory is bounded by the shard size (and the set of
given ids, corpus.py), never the corpus.
A document longer than `max_tokens` becomes several overlapping windows (rows with the same
doc_id, chunk 0, 1, ... and their token span), never silently cut.

Token shard columns: row (global row = FAISS id), doc_id, chunk, start, end (token span within
the document), tokens (uint16: GPT-2 ids fit), text (the window's text).

The new shards are written to tokens.tmp/ and swapped in only when complete, so an interrupted
run leaves the previous index untouched; re-tokenizing drops the embeddings and index built on
the old tokens.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline import __version__
from pipeline.children import die_with_parent
from pipeline.errors import IndexFolderError
from pipeline.folder import (
    EMBEDDINGS_DIR,
    FORMAT_VERSION,
    INDEX_FILE,
    INDEX_SIDE_PATTERNS,
    INFO_FILE,
    MANIFEST,
    TOKENS_DIR,
    IndexFolder,
    shard_name,
)
from pipeline.hashing import file_sha256
from pipeline.lock import LOCK_FILE
from pipeline.parquet import atomic_write_table, numpy_to_arrow
from pipeline.text.corpus import (
    CorpusError,
    Document,
    ReadStats,
    corpus_fingerprint,
    iter_documents,
    resolve_corpus,
)
from pipeline.text.rows import (
    BATCH_DOCS,
    TokenizeSettings,
    batched,
    encode_batch_rows,
    row_counts,
    rows_to_table,
    with_text,
)
from pipeline.text.tokenizer import Tokenizer, find_ranks_file

log = logging.getLogger(__name__)

def tokenize_section(files, settings: TokenizeSettings, tokenizer_name: str) -> dict:
    """The part of the manifest that decides whether existing tokens are current."""
    ranks = find_ranks_file()
    return {"corpus": corpus_fingerprint(files), "settings": asdict(settings),
            "tokenizer": {"name": tokenizer_name,
                          "ranks_sha256": file_sha256(ranks) if ranks else None}}


def is_current(folder: IndexFolder, section: dict) -> bool:
    """Whether the folder's tokens were made from this corpus with these settings and are all
    there with the bytes recorded (a damaged shard makes them not current: they are redone)."""
    if not folder.exists() or "tokenize" not in folder.manifest:
        return False
    old = folder.manifest["tokenize"]
    if any(old.get(k) != v for k, v in section.items()):
        return False
    return all((path := folder.tokens_dir / s["name"]).is_file()
               and file_sha256(path) == s["sha256"] for s in old["shards"])


def run_tokenize(corpus: str | Path, index_dir: str | Path, settings: TokenizeSettings,
                 progress=None, force: bool = False, on_shard=None,
                 locked: bool = False, ray: str | None = None,
                 ray_actors: int | None = None) -> dict:
    """Tokenize a corpus into an index folder; returns the manifest's tokenize section.

    `progress` is a tqdm-like object (update(n), set_postfix) or None. `on_shard(record,
    table)` is called with each shard as soon as it is written (the embed stage can start on
    it: `pipeline tokenize --embed`); an exception it raises stops the stage. `locked`: the
    caller (the parent of this process) holds the folder's write lock already. `ray`: a
    cluster's address (ray_cluster.connect) to read and encode on, `ray_actors` workers.
    """
    folder = IndexFolder(index_dir)
    files, root = resolve_corpus(corpus)
    section = tokenize_section(files, settings, Tokenizer.load().name)
    created = not folder.path.exists()
    with contextlib.nullcontext() if locked else folder.writing("tokenize"):
        refuse_foreign_folder(folder)
        if not force and is_current(folder, section):
            return {**folder.manifest["tokenize"], "skipped": True}
        work = folder.path / (TOKENS_DIR + ".tmp")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        source = None
        update = not force and can_update(folder, section)
        try:
            if ray is not None:
                from pipeline.text.ray_tokenize import RayTokenizer

                source = RayTokenizer(ray, files, root, settings, ray_actors)
            shards, stats, counts, seconds = write_token_shards(
                files, root, work, settings, progress, on_shard=None if update else on_shard,
                source=source and source.batches)
            if update:
                result = append_changes(folder, work, shards, section, settings, on_shard,
                                        tokenize_stats(stats, counts, seconds))
                if result is not None:
                    return result
        except BaseException:
            # Nothing half-written survives: the previous tokens (if any) stay as they were.
            shutil.rmtree(work, ignore_errors=True)
            if created:
                shutil.rmtree(folder.path, ignore_errors=True)
            raise
        swap_in_tokens(folder, work)
        result = {**section, "shards": shards, "stats": tokenize_stats(stats, counts, seconds),
                  "versions": versions()}
        if source is not None:
            result["stats"].update(source.summary())
        folder.write_manifest({"format_version": FORMAT_VERSION, "tokenize": result})
    return result


def can_update(folder: IndexFolder, section: dict) -> bool:
    """Whether the folder's tokens were made with these settings and tokenizer (the corpus
    differs): then only what changed is added (text/update.py)."""
    if not folder.exists() or "tokenize" not in folder.manifest:
        return False
    old = folder.manifest["tokenize"]
    # The old rows are kept as they are: only if each shard is the file recorded (a damaged
    # one has the folder tokenized afresh).
    return all(old.get(k) == section[k] for k in ("settings", "tokenizer")) and all(
        (path := folder.tokens_dir / s["name"]).is_file() and file_sha256(path) == s["sha256"]
        for s in old["shards"])


def append_changes(folder: IndexFolder, work: Path, shards: list[dict], section: dict,
                   settings: TokenizeSettings, on_shard, stats: dict) -> dict | None:
    """The corpus tokenized afresh in `work`, compared with the folder's rows by document:
    new and changed documents' rows appended as new shards, deleted and changed ones' old
    rows listed in `deleted_rows`; the embeddings of the old rows stay. Returns the new
    tokenize section, or None when too much changed (the caller replaces all tokens)."""
    from pipeline.text import update

    old = folder.manifest["tokenize"]
    deleted = set(old.get("deleted_rows", []))
    old_docs = update.documents(update.read_shards(folder.tokens_dir, old["shards"]), deleted)
    change = update.compare(old_docs, update.documents(update.read_shards(work, shards), set()))
    if update.too_stale(len(old_docs), change):
        log.info("most documents changed: tokenizing %s afresh", folder.path)
        return None
    writer = ShardWriter(folder.tokens_dir, settings, on_shard, first_row=folder.rows,
                         first_shard=len(old["shards"]))
    for table in update.kept_tables(work, shards, change["keep"]):
        writer.add(table)
    writer.close()
    shutil.rmtree(work, ignore_errors=True)
    result = {**section, "shards": old["shards"] + writer.shards,
              "deleted_rows": sorted(deleted | set(change["delete"])),
              "stats": {**stats, "rows": folder.rows + writer.rows,
                        "update": {"documents": change["documents"], "new_rows": writer.rows,
                                   "deleted_rows": len(change["delete"])}},
              "versions": versions()}
    folder.manifest["tokenize"] = result  # the embed section stays: its shards are still good
    folder.write_manifest()
    return result


# What a folder holds before its first manifest: the lock, and a stage's work in progress.
BEFORE_MANIFEST = {LOCK_FILE, TOKENS_DIR + ".tmp", EMBEDDINGS_DIR + ".tmp"}


def refuse_foreign_folder(folder: IndexFolder) -> None:
    """Refuse to write into a folder that holds files but no manifest: not one we made, and
    the stage would delete its tokens/, embeddings/ and index files."""
    if folder.exists() or not folder.path.is_dir():
        return
    foreign = sorted(p.name for p in folder.path.iterdir() if p.name not in BEFORE_MANIFEST)
    if foreign:
        raise IndexFolderError(f"{folder.path} is not an index folder (it has no {MANIFEST} "
                               f"but holds {', '.join(foreign[:3])}"
                               f"{', ...' if len(foreign) > 3 else ''}): give --index a new "
                               "or empty folder")


def swap_in_tokens(folder: IndexFolder, work: Path) -> None:
    """Replace the folder's tokens by those in `work`; what was built on the old ones (the
    embeddings and the index) is now stale and goes."""
    for stale in (folder.tokens_dir, folder.embeddings_dir):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in (INDEX_FILE, INFO_FILE):
        (folder.path / stale).unlink(missing_ok=True)
    for pattern in INDEX_SIDE_PATTERNS:  # index.<build>.ivfdata / .rescore
        for stale in folder.path.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()
    work.rename(folder.tokens_dir)


def tokenize_stats(stats: ReadStats, counts: dict, seconds: float) -> dict:
    return {"files": stats.files, "documents": stats.documents,
            "empty_skipped": stats.empty_skipped,
            "non_text_skipped": stats.non_text_skipped,
            "undecodable_replaced": stats.undecodable_replaced,
            **counts, "bytes": stats.bytes_read, "seconds": round(seconds, 3),
            "mb_per_s": round(stats.bytes_read / 1e6 / max(seconds, 1e-9), 2)}


FIRST_SHARD_ROWS = 4096


def shard_rows(settings: TokenizeSettings, number: int) -> int:
    """Rows of token shard `number` (the last may have fewer). The first shards are small,
    each twice the one before, up to `settings.shard_rows`: under `tokenize --embed` the GPU
    starts on the first as soon as it is written, and tokenizing (about twice as fast as an
    H200 embeds) writes each next one before the GPU is done with the one before. (With a
    4,096-row first shard and 50,000-row ones after it, the GPU waited ~0.4 s for the second.)
    """
    return min(settings.shard_rows, FIRST_SHARD_ROWS << min(number, 30))


class ShardWriter:
    """Collects token rows and writes them under `work` as shards of `shard_rows(settings,
    n)` rows, renumbering rows globally; `on_shard(record, table)` sees each one written."""

    def __init__(self, work: Path, settings: TokenizeSettings, on_shard=None,
                 first_row: int = 0, first_shard: int = 0):
        """`first_row`, `first_shard`: where the rows and shard names start (an update
        appends after a folder's own)."""
        self.work, self.settings, self.on_shard = work, settings, on_shard
        self.first_row, self.first_shard = first_row, first_shard
        self.shards: list[dict] = []
        self.rows = 0  # rows added so far
        self._pending: list[pa.Table] = []
        self._n_pending = 0

    def add(self, table: pa.Table) -> None:
        self._pending.append(table)
        self._n_pending += table.num_rows
        self.rows += table.num_rows
        while self._n_pending >= (next_rows := shard_rows(self.settings, self._number())):
            self._write(next_rows)

    def close(self) -> None:
        if self._n_pending:
            self._write(self._n_pending)

    def _number(self) -> int:
        return self.first_shard + len(self.shards)

    def _write(self, upto: int) -> None:
        """Write the first `upto` pending rows as the next shard."""
        table = pa.concat_tables(self._pending)
        # One chunk per column: how rows were batched must not show in the file (Parquet's
        # dictionary pages follow the chunks), so any engine's shards are byte-identical.
        shard, rest = table.slice(0, upto).combine_chunks(), table.slice(upto)
        first = self.first_row + self.rows - self._n_pending
        shard = shard.set_column(0, "row", numpy_to_arrow(np.arange(first, first + upto)))
        name = shard_name(self._number())
        # Small row groups let search read the few rows it shows without the whole shard.
        path = atomic_write_table(shard, self.work / name, row_group_size=4096)
        self.shards.append({"name": name, "first_row": first, "rows": upto,
                            "docs": len(set(shard["doc_id"].to_pylist())),
                            "sha256": file_sha256(path)})
        self._pending = [rest] if rest.num_rows else []
        self._n_pending = rest.num_rows
        if self.on_shard is not None:
            self.on_shard(self.shards[-1], shard)


def encoded_batches(docs: Iterator[Document], settings: TokenizeSettings, stats: ReadStats,
                    workers: int) -> Iterator[tuple[int, dict, pa.Table]]:
    """(documents read, their rows, the rows' table) per batch of documents, in order.

    Batches are encoded and windowed by a pool of worker processes (the Python around
    tiktoken holds the GIL, so threads alone leave cores idle), at most a few batches in
    flight so memory stays bounded.
    """
    # Each worker dies with this process, even when it is SIGKILLed: none lives on, holding
    # the folder's lock (inherited over fork) and racing the rerun.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                             initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
        in_flight: collections.deque = collections.deque()
        batches = batched(docs, BATCH_DOCS)
        while True:
            while len(in_flight) < 2 * workers and (batch := next(batches, None)) is not None:
                kept = with_text(batch, stats)
                future = pool.submit(encode_batch_rows, [d.text for d in kept],
                                     settings.max_tokens, settings.overlap)
                in_flight.append((len(batch), kept, future))
            if not in_flight:
                return
            n_read, kept, future = in_flight.popleft()
            rows = future.result()
            yield n_read, rows, rows_to_table(rows, kept, 0)


def write_token_shards(files, root, work: Path, settings: TokenizeSettings,
                       progress, workers: int | None = None, on_shard=None, source=None):
    """Stream documents into shards under `work`; returns (shards, stats, counts, seconds).

    `source(stats)`, if given, yields the encoded batches instead of this machine's worker
    processes, as (documents read, tokens, split documents, table), in corpus order
    (text/ray_tokenize.py's `RayTokenizer.batches`)."""
    stats = ReadStats()
    started = time.perf_counter()
    writer = ShardWriter(work, settings, on_shard)
    n_tokens = split_docs = 0
    batches = (source(stats) if source is not None
               else local_batches(files, root, settings, stats, workers))
    for n_read, batch_tokens, batch_split, table in batches:
        writer.add(table)
        n_tokens += batch_tokens
        split_docs += batch_split
        if progress is not None:
            progress.update(n_read)
            # refresh=False: engines/__init__.py show_rates says why
            progress.set_postfix(rows=writer.rows, MB=f"{stats.bytes_read / 1e6:.0f}",
                                 refresh=False)
    writer.close()
    if writer.rows == 0:
        raise CorpusError(f"{root}: no documents with text "
                          f"({stats.documents} read, {stats.empty_skipped} empty, "
                          f"{stats.non_text_skipped} not text)")
    counts = {"rows": writer.rows, "split_documents": split_docs, "tokens": n_tokens}
    return writer.shards, stats, counts, time.perf_counter() - started


def local_batches(files, root, settings: TokenizeSettings, stats: ReadStats,
                  workers: int | None):
    """This machine's encoded batches, as `write_token_shards` takes them."""
    docs = iter_documents(files, root, stats, settings.text_field, settings.id_field)
    for n_read, rows, table in encoded_batches(docs, settings, stats,
                                               workers or min(8, os.cpu_count() or 1)):
        yield n_read, *row_counts(rows), table


def versions() -> dict:
    """Versions of what made an output (a missing optional library reads None)."""
    import importlib.metadata
    import sys

    found = {"pipeline": __version__, "python": sys.version.split()[0]}
    for package in ("torch", "tiktoken", "pyarrow", "faiss-cpu", "numpy"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found
