"""The tokenize stage's reading and encoding on a Ray cluster (`pipeline tokenize --ray`).

The corpus is cut into *pieces*: a file, or a run of a large Parquet file's row groups. A
pool of Ray actors (`TokenizeWorker`: the tokenizer loaded once per actor) reads and encodes
each piece into token rows, exactly as the local stage's worker processes encode a batch
(`encode_batch_rows`, `rows_to_table`); the pool hands the results back in piece order, and
the driver feeds them to the same `ShardWriter` as the local stage. Rows are cut into shards
and numbered only there, so the shards, their names and the manifest are the local stage's,
whatever the cluster. Ids are checked for repeats across the whole corpus on the driver
(`IdCheck`), in corpus order.

Workers read the corpus where it is (a shared filesystem; the paths are the driver's) and
get GPT-2's ranks file through the object store.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.text.corpus import (
    IdCheck,
    ReadStats,
    check_repeat,
    file_documents,
    file_name,
    split_suffixes,
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
from pipeline.text.tokenizer import ENV_RANKS, RANKS_FILENAME, find_ranks_file

PIECE_ROWS = 50_000  # rows of Parquet row groups per piece, at least (one shard's worth)


def corpus_pieces(files: list[Path], piece_rows: int) -> list[dict]:
    """The pieces, in corpus order: each file whole, except a Parquet file of several row
    groups, cut into runs of row groups of at least `piece_rows` rows."""
    pieces = []
    for path in files:
        groups = parquet_row_groups(path)
        if len(groups) <= 1:
            pieces.append({"path": str(path), "row_groups": None})
            continue
        run, rows = [], 0
        for group, n in enumerate(groups):
            run.append(group)
            rows += n
            if rows >= piece_rows:
                pieces.append({"path": str(path), "row_groups": run})
                run, rows = [], 0
        if run:
            pieces.append({"path": str(path), "row_groups": run})
    return pieces


def parquet_row_groups(path: Path) -> list[int]:
    """Rows per row group of a Parquet file; [] for other files (and unreadable Parquet,
    which the reader then refuses with its own message)."""
    if split_suffixes(path)[0] != "parquet":
        return []
    try:
        metadata = pq.ParquetFile(str(path)).metadata
    except (pa.ArrowInvalid, OSError):
        return []
    return [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]


def tokenize_piece(piece: dict, root: Path, settings) -> dict:
    """One piece read and encoded: its token rows (row numbers from 0: the driver numbers
    them), the ids of its documents with text in order (with whether each is derived), the
    counts of the local stage's batches, and its ReadStats. Pure but for reading the file."""
    path = Path(piece["path"])
    name = file_name(path, root)
    stats = ReadStats()
    ids, derived, tables, n_tokens, split = [], [], [], 0, 0

    def documents():  # with their ids noted, for the driver's check across the corpus
        for document, is_derived, _ in file_documents(path, name, stats, settings.text_field,
                                                      settings.id_field, piece["row_groups"]):
            ids.append(document.doc_id)
            derived.append(is_derived)
            yield document

    for batch in batched(documents(), BATCH_DOCS):  # the local stage's batches
        kept = with_text(batch, stats)
        rows = encode_batch_rows([d.text for d in kept], settings.max_tokens, settings.overlap)
        tables.append(rows_to_table(rows, kept, 0))
        tokens, windows = row_counts(rows)
        n_tokens, split = n_tokens + tokens, split + windows
    return {"table": pa.concat_tables(tables) if tables else None, "name": name, "ids": ids,
            "derived": derived, "tokens": n_tokens, "split": split, "stats": stats}


class TokenizeWorker:
    """A Ray actor (`ray.remote(TokenizeWorker)`): the tokenizer loaded once, then one piece
    per call."""

    def __init__(self, root: str, settings: dict, ranks_files):
        import ray

        from pipeline.ray_cluster import unpack_files, worker_name
        from pipeline.text.tokenizer import Tokenizer

        if ranks_files is not None:
            os.environ[ENV_RANKS] = str(unpack_files(ray.get(ranks_files[0]), "ranks")
                                        / RANKS_FILENAME)
        Tokenizer.load()  # once, before the first piece
        self.root, self.settings = Path(root), TokenizeSettings(**settings)
        self.name = worker_name()

    def tokenize(self, piece: dict) -> dict:
        started = time.perf_counter()
        result = tokenize_piece(piece, self.root, self.settings)
        result["stats"] = asdict(result["stats"])
        result.update(worker=self.name, seconds=time.perf_counter() - started)
        return result  # its Arrow table travels as Arrow, through the object store


class RayTokenizer:
    """The source of the tokenize stage's batches on a Ray cluster (`write_token_shards`'s
    `source`): (documents read, tokens, split documents, table) per piece, in corpus order.

    A pool of Ray actors (`ray.util.ActorPool`: results in submission order, one piece in
    flight per actor, so memory stays bounded), not Ray Data: the stage needs its pieces back
    in corpus order, and Ray Data's ordered execution stalled for good now and then on a
    cluster another dataset had just used (seen in the tests, Ray 2.60). A lost actor is
    restarted and its piece retried (max_restarts, max_task_retries).
    """

    def __init__(self, address: str, files: list[Path], root: Path, settings,
                 actors: int | None = None, piece_rows: int | None = None):
        from pipeline.ray_cluster import connect

        self.files, self.root, self.settings = files, root, settings
        self.cluster = connect(address)
        self.actors = actors or max(int(self.cluster["cpus"]), 1)
        self.pieces = corpus_pieces(files, piece_rows or PIECE_ROWS)
        self.workers: dict[str, dict] = {}

    def batches(self, stats: ReadStats):
        import ray
        from ray.util import ActorPool

        from pipeline.ray_cluster import ship_files

        ranks = find_ranks_file()
        ranks_files = [ship_files({RANKS_FILENAME: ranks})] if ranks else None
        n = min(self.actors, len(self.pieces))
        worker = ray.remote(TokenizeWorker).options(
            num_cpus=max(self.cluster["cpus"], 1.0) / n, max_restarts=-1, max_task_retries=-1)
        actors = [worker.remote(str(self.root), asdict(self.settings), ranks_files)
                  for _ in range(n)]
        try:
            results = ActorPool(actors).map(lambda actor, piece: actor.tokenize.remote(piece),
                                            self.pieces)
            yield from self._in_order(results, stats)
        finally:
            for actor in actors:  # their CPUs back to the cluster now
                ray.kill(actor)

    def _in_order(self, results, stats: ReadStats):
        ids = IdCheck()
        for result in results:
            for doc_id, derived in zip(result["ids"], result["derived"], strict=True):
                if ids.may_repeat(doc_id, result["name"], derived):
                    check_repeat(self.files, self.root, doc_id, None, self.settings.text_field,
                                 self.settings.id_field)
            add_stats(stats, result["stats"])
            self._tally(result)
            if result["table"] is None:
                continue
            yield len(result["ids"]), result["tokens"], result["split"], result["table"]

    def _tally(self, result: dict) -> None:
        tally = self.workers.setdefault(result["worker"], {
            "worker": result["worker"], "pieces": 0, "documents": 0, "tokens": 0,
            "seconds": 0.0})
        tally["pieces"] += 1
        tally["documents"] += len(result["ids"])
        tally["tokens"] += result["tokens"]
        tally["seconds"] = round(tally["seconds"] + result["seconds"], 3)

    def summary(self) -> dict:
        return {"engine": "ray", "cluster": self.cluster, "pieces": len(self.pieces),
                "workers": sorted(self.workers.values(), key=lambda w: -w["documents"])}


def add_stats(stats: ReadStats, piece: dict) -> None:
    """Add a piece's ReadStats (as a dict) into the stage's."""
    for key, value in piece.items():
        if key == "per_file":
            for name, n in value.items():
                stats.per_file[name] = stats.per_file.get(name, 0) + n
        else:
            setattr(stats, key, getattr(stats, key) + value)
