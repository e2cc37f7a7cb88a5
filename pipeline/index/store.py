"""index.faiss and index.json in an index folder: written so that a failed build leaves the
previous pair in use, loaded only when they match the embeddings the manifest records now and
index.faiss has the sha256 index.json records."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from pipeline.errors import IndexFolderError, IndexKeyError
from pipeline.folder import INDEX_SIDE_PATTERNS, IndexFolder, check_shard
from pipeline.hashing import file_sha256
from pipeline.index.choice import apply_params, faiss_reason, quiet_faiss
from pipeline.index.rescore import is_binary_key, split_key
from pipeline.parquet import disk_full, is_disk_full

# 2: index.json records index.faiss's sha256 (version 1 only its size, and its builds did not
# check the embedding shards' hashes), so a version 1 index is rebuilt, not trusted.
INDEX_FORMAT_VERSION = 2


def rebuild_hint(folder: IndexFolder) -> str:
    return f"run `pipeline build-index --index {folder.path} --force`"


def source(folder: IndexFolder) -> dict:
    """What an index is built from: the embed identity and the embeddings' fingerprint."""
    return {"embed_identity": folder.identity,
            "embeddings": {"rows": folder.rows, "sha256": folder.embeddings_fingerprint()}}


def embedding_shards(folder: IndexFolder) -> list[list]:
    """[name, rows, sha256] of each embedding shard, in row order: what an update compares."""
    done = folder.embed.get("shards", {})
    return [[s["name"], done.get(s["name"], {}).get("rows"), done.get(s["name"], {}).get("sha256")]
            for s in folder.token_shards]


def current_info(folder: IndexFolder, settings: dict) -> dict | None:
    """index.json if the index there was built from the current embeddings with `settings`,
    and index.faiss is the file it records (a damaged one is rebuilt, not kept)."""
    if not (folder.info_file.is_file() and folder.index_file.is_file()):
        return None
    try:
        old = json.loads(folder.info_file.read_text())
    except ValueError:  # a damaged index.json: rebuild
        return None
    now = source(folder)
    if (old.get("format_version") != INDEX_FORMAT_VERSION or old.get("settings") != settings
            or any(old.get(k) != v for k, v in now.items())):
        return None
    recorded = old.get("index_file") or {}
    if file_sha256(folder.index_file) != recorded.get("sha256"):
        return None
    for record in old.get("side_files", {}).values():
        path = folder.path / record["name"]
        if not path.is_file() or file_sha256(path) != record["sha256"]:
            return None
    return old


def write_index(folder: IndexFolder, index, info: dict,
                side_files: dict[str, Path] | None = None) -> dict:
    """index.faiss and index.json (with what it was built from, and the sha256 and size of
    index.faiss and of each side file: `side_files`, e.g. {"ivfdata": path, "rescore": path},
    already written in the folder under names unique to this build); returns that info.

    Both are written in full as NAME.tmp beside the old pair before either is renamed over
    it, so a write that fails (a full disk) leaves the previous index in use, and no .tmp
    behind. A crash between the two renames leaves the new index.faiss beside the old
    index.json, whose sha256 refuses it (load_index) and has it rebuilt (current_info). Side
    files of older builds go once the new index.json is in place.
    """
    index_tmp, info_tmp = tmp_path(folder.index_file), tmp_path(folder.info_file)
    side_files = side_files or {}
    writer = faiss.write_index_binary if isinstance(index, faiss.IndexBinary) else \
        faiss.write_index
    try:
        write_synced(index_tmp, lambda path: writer(index, str(path)))
        for path in side_files.values():
            fsync_file(path)
        info = {"format_version": INDEX_FORMAT_VERSION, **info, **source(folder),
                "embedding_shards": embedding_shards(folder),
                "index_file": {"name": folder.index_file.name,
                               "bytes": index_tmp.stat().st_size,
                               "sha256": file_sha256(index_tmp)},
                "side_files": {role: {"name": path.name, "bytes": path.stat().st_size,
                                      "sha256": file_sha256(path)}
                               for role, path in side_files.items()}}
        info["memory"] = memory_record(info)
        write_synced(info_tmp, lambda path: path.write_text(json.dumps(info, indent=2) + "\n"))
        os.replace(index_tmp, folder.index_file)
        os.replace(info_tmp, folder.info_file)
    except BaseException:
        for path in side_files.values():
            path.unlink(missing_ok=True)
        raise
    finally:
        index_tmp.unlink(missing_ok=True)
        info_tmp.unlink(missing_ok=True)
    remove_stale_side_files(folder, keep={p.name for p in side_files.values()})
    return info


def memory_record(info: dict) -> dict:
    """What the index takes, written where users see it: the bytes search holds (index.faiss
    and its mapped lists), the rescore file it reads rows from, float32's size for the same
    vectors, and the build's peak RSS."""
    import resource

    side = info["side_files"]
    held = info["index_file"]["bytes"] + side.get("ivfdata", {}).get("bytes", 0)
    float32 = info["n"] * info["dim"] * 4
    return {"index_bytes": held, "rescore_bytes": side.get("rescore", {}).get("bytes", 0),
            "float32_bytes": float32, "compression": round(float32 / max(held, 1), 2),
            "build_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def side_file_paths(folder: IndexFolder) -> list[Path]:
    """Every index side file in the folder (index.<build>.ivfdata / .rescore / .parts)."""
    return sorted(p for pattern in INDEX_SIDE_PATTERNS for p in folder.path.glob(pattern))


def remove_stale_side_files(folder: IndexFolder, keep: set[str]) -> None:
    import shutil

    for path in side_file_paths(folder):
        if path.name not in keep:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def tmp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def write_synced(path: Path, write: Callable[[Path], object]) -> None:
    """write(path), then fsync it; a failure (a full disk) is one line naming the file."""
    try:
        write(path)
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    except (OSError, RuntimeError) as err:  # FAISS reports a failed fwrite as RuntimeError
        if is_disk_full(err):
            raise disk_full(path, err) from None
        reason = faiss_reason(err) if isinstance(err, RuntimeError) else err.strerror or err
        raise IndexFolderError(f"cannot write {path}: {reason}") from None


def read_index_info(folder: IndexFolder) -> dict:
    if not folder.info_file.is_file() or not folder.index_file.is_file():
        raise IndexFolderError(f"{folder.path} has no index: run `pipeline build-index --index "
                               f"{folder.path}`")
    try:
        return json.loads(folder.info_file.read_text())
    except ValueError:
        raise IndexFolderError(f"{folder.info_file} is not JSON: {rebuild_hint(folder)}") from None


def load_index(folder: IndexFolder | str | Path) -> tuple[faiss.Index, dict]:
    """index.faiss with its tuned search parameters applied, and index.json.

    Refuses (IndexFolderError) an index built from other embeddings than the manifest's current
    ones, or one whose file is not the one its index.json records (size, then sha256; side
    files by size: hashing gigabytes would make every search slow). IVF lists are mapped, not
    read: from index.faiss itself, or from the on-disk lists of a streamed build.
    """
    folder = folder if isinstance(folder, IndexFolder) else IndexFolder(folder)
    info = read_index_info(folder)
    rebuild = rebuild_hint(folder)
    if info.get("format_version") != INDEX_FORMAT_VERSION:
        raise IndexFolderError(f"{folder.info_file} has format version "
                               f"{info.get('format_version')}: {rebuild}")
    if any(info.get(k) != v for k, v in source(folder).items()):
        raise IndexFolderError(f"{folder.path}: index is stale (the embeddings changed since it "
                               f"was built): run `pipeline build-index --index {folder.path}`")
    if folder.index_file.stat().st_size != info["index_file"]["bytes"]:
        raise IndexFolderError(f"{folder.index_file} does not match {folder.info_file.name}: "
                               f"{rebuild}")
    check_shard(folder.index_file, info["index_file"], rebuild)
    for record in info.get("side_files", {}).values():
        path = folder.path / record["name"]
        if not path.is_file() or path.stat().st_size != record["bytes"]:
            raise IndexFolderError(f"{path} is missing or not the one {folder.info_file.name} "
                                   f"records: {rebuild}")
    try:
        index = read_index_file(folder.index_file, info)
    except RuntimeError as err:  # bytes FAISS cannot parse (another FAISS version's?)
        raise IndexFolderError(f"cannot read {folder.index_file}: {faiss_reason(err)}: "
                               f"{rebuild}") from None
    if (index.ntotal, index.d) != (info["n"], info["dim"]):
        raise IndexFolderError(f"{folder.index_file} holds {index.ntotal} x {index.d}, "
                               f"{folder.info_file.name} says {info['n']} x {info['dim']}: "
                               f"{rebuild}")
    apply_index_params(index, info["params"])
    return index, info


def read_index_file(path: Path, info: dict):
    """Binary indexes by FAISS's binary reader; on-disk lists (a streamed IVF build) found
    beside index.faiss whatever the folder is called now (IO_FLAG_ONDISK_SAME_DIR); other IVF
    lists mapped (IO_FLAG_MMAP), so pages come from the page cache as probes touch them."""
    if is_binary_key(split_key(info["key"])[0]):
        return faiss.read_index_binary(str(path))
    if "ivfdata" in info.get("side_files", {}):
        with quiet_faiss():  # FAISS prints the file name it maps
            return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR
                                    | faiss.IO_FLAG_READ_ONLY)  # mapped read-only
    if re.search(r"IVF\d", info["key"]):
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
    return faiss.read_index(str(path))


def apply_index_params(index, params: dict) -> None:
    """The index's own search parameters (not the rescore factor, which SearchIndex keeps)."""
    params = {k: v for k, v in params.items() if k != "rescore_factor"}
    if isinstance(index, faiss.IndexBinary):
        ivf = faiss.try_extract_index_binary_ivf(index) if hasattr(
            faiss, "try_extract_index_binary_ivf") else None
        if ivf is not None and "nprobe" in params:
            ivf.nprobe = params["nprobe"]
        return
    apply_params(index, params)


def load_search_index(folder: IndexFolder | str | Path):
    """(SearchIndex, info): the index as search uses it, with its rescore file when it has
    one (index.<build>.rescore, read by position)."""
    from pipeline.index.rescore import Rescore, RescoreFile
    from pipeline.index.streamed import SearchIndex

    folder = folder if isinstance(folder, IndexFolder) else IndexFolder(folder)
    index, info = load_index(folder)
    _, rescore = split_key(info["key"])
    store = None
    if rescore is not None:
        record = info["side_files"]["rescore"]
        store = RescoreFile(folder.path / record["name"], Rescore(rescore.kind),
                            info["calibration"], info["dim"])
    searchable = SearchIndex(index, store, info.get("calibration"))
    searchable.set_params({k: v for k, v in info["params"].items() if k == "rescore_factor"})
    return searchable, info


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
