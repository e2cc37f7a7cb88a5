"""A corpus that changed since it was tokenized: only its new and changed documents become
new rows, appended after the old ones, so the embeddings and the index of the old rows stay
(row r is still FAISS id r); rows of documents deleted or changed are listed as deleted in
the manifest, and search never returns them.

The corpus is tokenized again into a work folder (that is cheap: the default corpus takes
about a second; embedding is what an update saves), then compared document by document, by
id, with the rows the folder holds: a document whose rows carry the same tokens and text is
unchanged and its new rows are dropped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# Past this share of the old documents gone or changed, an update would keep more deleted
# rows than live ones: the folder is tokenized afresh instead.
MAX_STALE_SHARE = 0.5


def row_digests(table: pa.Table) -> list[bytes]:
    """A digest per row of what its vector is made from (tokens) and what search shows."""
    tokens = table["tokens"].combine_chunks()
    offsets = tokens.offsets.to_numpy()
    values = tokens.values.to_numpy()
    texts = table["text"].to_pylist()
    return [hashlib.blake2b(values[offsets[i]:offsets[i + 1]].tobytes() + b"\0"
                            + texts[i].encode(), digest_size=16).digest()
            for i in range(table.num_rows)]


def documents(tables: Iterable[tuple[int, pa.Table]], deleted: set[int]
              ) -> dict[str, tuple[list[int], bytes]]:
    """doc_id -> (its rows, one digest of all its rows), over (first_row, table) pairs; rows
    in `deleted` are left out."""
    rows: dict[str, list[int]] = {}
    parts: dict[str, list[bytes]] = {}
    for first_row, table in tables:
        ids = table["doc_id"].to_pylist()
        for i, (doc_id, digest) in enumerate(zip(ids, row_digests(table), strict=True)):
            row = first_row + i
            if row in deleted:
                continue
            rows.setdefault(doc_id, []).append(row)
            parts.setdefault(doc_id, []).append(digest)
    return {d: (rows[d], hashlib.blake2b(b"".join(parts[d]), digest_size=16).digest())
            for d in rows}


def read_shards(folder: Path, shards: list[dict]) -> Iterable[tuple[int, pa.Table]]:
    for shard in shards:
        yield shard["first_row"], pq.read_table(folder / shard["name"],
                                                columns=["doc_id", "tokens", "text"])


def compare(old: dict, new: dict) -> dict:
    """What changed between two `documents` maps: new rows to keep (sorted), old rows to
    delete (sorted), and counts of documents added, changed, deleted and unchanged."""
    keep, delete = [], []
    counts = {"added": 0, "changed": 0, "deleted": 0, "unchanged": 0}
    for doc_id, (rows, digest) in new.items():
        before = old.get(doc_id)
        if before is None:
            counts["added"] += 1
            keep.extend(rows)
        elif before[1] != digest:
            counts["changed"] += 1
            keep.extend(rows)
            delete.extend(before[0])
        else:
            counts["unchanged"] += 1
    for doc_id, (rows, _) in old.items():
        if doc_id not in new:
            counts["deleted"] += 1
            delete.extend(rows)
    return {"keep": np.array(sorted(keep), np.int64), "delete": sorted(delete),
            "documents": counts}


def kept_tables(work: Path, shards: list[dict], keep: np.ndarray) -> Iterable[pa.Table]:
    """The rows of the work folder's shards named in `keep` (their row numbers there), in
    order, as tables of the token schema (row is renumbered by the writer)."""
    for shard in shards:
        lo, hi = shard["first_row"], shard["first_row"] + shard["rows"]
        local = keep[(keep >= lo) & (keep < hi)] - lo
        if len(local):
            table = pq.read_table(work / shard["name"])
            yield table.take(pa.array(local))


def too_stale(old_live: int, change: dict) -> bool:
    gone = change["documents"]["changed"] + change["documents"]["deleted"]
    return old_live > 0 and gone / old_live > MAX_STALE_SHARE
