"""index.faiss and index.json in an index folder: written atomically, loaded only when they
match the embeddings the manifest records now."""

from __future__ import annotations

import json
import os
from pathlib import Path

import faiss
import numpy as np

from pipeline.errors import IndexFolderError, IndexKeyError
from pipeline.folder import IndexFolder
from pipeline.index.choice import apply_params, faiss_reason
from pipeline.parquet import atomic_write_json

INDEX_FORMAT_VERSION = 1


def source(folder: IndexFolder) -> dict:
    """What an index is built from: the embed identity and the embeddings' fingerprint."""
    return {"embed_identity": folder.identity,
            "embeddings": {"rows": folder.rows, "sha256": folder.embeddings_fingerprint()}}


def current_info(folder: IndexFolder, settings: dict) -> dict | None:
    """index.json if the index there was built from the current embeddings with `settings`."""
    if not (folder.info_file.is_file() and folder.index_file.is_file()):
        return None
    old = json.loads(folder.info_file.read_text())
    now = source(folder)
    if old.get("settings") == settings and all(old.get(k) == v for k, v in now.items()):
        return old
    return None


def write_index(folder: IndexFolder, index: faiss.Index, info: dict) -> dict:
    """index.faiss, then index.json (with what it was built from); returns that info."""
    # No index.json while index.faiss is replaced: a crash in between leaves a folder that
    # load_index and the skip check refuse, rather than a new index with old settings.
    folder.info_file.unlink(missing_ok=True)
    tmp = folder.index_file.with_name(folder.index_file.name + ".tmp")
    faiss.write_index(index, str(tmp))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, folder.index_file)
    info = {"format_version": INDEX_FORMAT_VERSION, **info, **source(folder),
            "index_file": {"name": folder.index_file.name,
                           "bytes": folder.index_file.stat().st_size}}
    atomic_write_json(info, folder.info_file)
    return info


def read_index_info(folder: IndexFolder) -> dict:
    if not folder.info_file.is_file() or not folder.index_file.is_file():
        raise IndexFolderError(f"{folder.path} has no index: run `pipeline build-index --index "
                               f"{folder.path}`")
    return json.loads(folder.info_file.read_text())


def load_index(folder: IndexFolder | str | Path) -> tuple[faiss.Index, dict]:
    """index.faiss with its tuned search parameters applied, and index.json.

    Refuses (IndexFolderError) an index built from other embeddings than the manifest's current
    ones, or one whose file does not match its index.json.
    """
    folder = folder if isinstance(folder, IndexFolder) else IndexFolder(folder)
    info = read_index_info(folder)
    rebuild = "run `pipeline build-index --force`"
    if info.get("format_version") != INDEX_FORMAT_VERSION:
        raise IndexFolderError(f"{folder.info_file} has format version "
                               f"{info.get('format_version')}: {rebuild}")
    if any(info.get(k) != v for k, v in source(folder).items()):
        raise IndexFolderError(f"{folder.path}: index is stale (the embeddings changed since it "
                               "was built): run `pipeline build-index`")
    if folder.index_file.stat().st_size != info["index_file"]["bytes"]:
        raise IndexFolderError(f"{folder.index_file} does not match {folder.info_file.name}: "
                               f"{rebuild}")
    index = faiss.read_index(str(folder.index_file))
    if (index.ntotal, index.d) != (info["n"], info["dim"]):
        raise IndexFolderError(f"{folder.index_file} holds {index.ntotal} x {index.d}, "
                               f"{folder.info_file.name} says {info['n']} x {info['dim']}: "
                               f"{rebuild}")
    apply_params(index, info["params"])
    return index, info


def range_search(index: faiss.Index, queries: np.ndarray,
                 threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All rows with inner product > threshold to each query, as FAISS returns them:
    (lims, scores, ids), query i's hits being scores/ids[lims[i]:lims[i + 1]], unordered.

    Flat is exact; IVF is approximate (only the nprobe nearest lists are scanned). HNSW has no
    range search in older FAISS and only a greedy approximation with no measured recall in newer
    ones, so for HNSW with float storage we scan that storage exactly instead (same vectors, O(N)
    per query).
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    target = faiss.downcast_index(index)
    if isinstance(target, faiss.IndexHNSW):
        storage = faiss.downcast_index(target.storage)
        if not isinstance(storage, faiss.IndexFlat):
            raise IndexKeyError("range search over HNSW needs float (Flat) storage")
        target = storage
    try:
        return target.range_search(queries, threshold)
    except RuntimeError as err:
        raise IndexKeyError(f"range search is not supported by this index: "
                         f"{faiss_reason(err)}") from None
