"""Embedding shards -> FAISS inner-product index, tuned until its measured recall reaches a
target. Vectors are added in row order, so FAISS id i is corpus row i.

`build_index` takes an array; `run_build_index` does the index folder (index.faiss and
index.json beside manifest.json, written by `store`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from pipeline.errors import IndexFolderError, IndexKeyError, UsageError
from pipeline.folder import IndexFolder, check_shard, sample_rows
from pipeline.index import store, streamed
from pipeline.index.choice import (
    ADD_BLOCK_ROWS,
    MIN_TRAIN_ROWS,
    TRAIN_POINTS_PER_LIST,
    apply_params,
    choose_index_key,
    default_memory_budget,
    faiss_reason,
    index_bytes,
    make_index,
    search_params_grid,
    streamed_key,
)
from pipeline.index.recall import RECALL_K, held_out_truth, measure_recall
from pipeline.index.rescore import is_binary_key, split_key

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


def _check_vectors(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) == 0 or vectors.shape[1] == 0:
        raise ValueError(f"need a non-empty (N, dim) array of vectors, got shape {vectors.shape}")
    sample = vectors[:: max(1, len(vectors) // 10_000)]
    worst = float(np.abs(np.linalg.norm(sample, axis=1) - 1).max())
    if worst > 1e-2:
        log.warning("vectors are not L2-normalised (|norm - 1| up to %.3f): inner-product "
                    "scores will not be cosine similarities", worst)
    return vectors


def training_rows(index: faiss.Index, n: int) -> int:
    ivf = faiss.try_extract_index_ivf(index)
    nlist = ivf.nlist if ivf is not None else 0
    if nlist > n:
        raise IndexKeyError(f"IVF{nlist} needs at least {nlist} vectors to train, have {n}")
    return min(n, max(TRAIN_POINTS_PER_LIST * nlist, MIN_TRAIN_ROWS))


def build_index(vectors: np.ndarray, key: str | None = None, target_recall: float = 0.95,
                n_queries: int = 1000, seed: int = 0,
                progress: Progress | None = None) -> tuple[faiss.Index, dict]:
    """Build an inner-product index over `vectors` (row i -> FAISS id i) and tune it.

    key: a FAISS factory string, default `choose_index_key`. Trainable indexes train on a seeded
    sample. Then nprobe (IVF) / efSearch (HNSW) rise over `search_params_grid` until held-out
    recall@10 (see recall.py) reaches `target_recall`; if none does, the best setting is
    kept, a warning logged and `target_met` is false. Returns (index, info).
    """
    report = progress or (lambda message: None)
    vectors = _check_vectors(vectors)
    n, dim = vectors.shape
    key = key or choose_index_key(n, dim)
    index = make_index(dim, key)
    seconds: dict[str, float] = {}
    with timed("train", seconds):
        train_rows = train_index(index, key, vectors, seed, report)
    with timed("add", seconds):
        add_vectors(index, key, vectors, report)
    with timed("tune", seconds):
        k = min(RECALL_K, n - 1)
        params, recall, tuning, queries_used = tune(index, key, vectors, k, target_recall,
                                                    n_queries, seed, report)
    target_met = None if recall is None else recall >= target_recall
    if target_met is False:
        log.warning("%s reaches recall@%d %.3f at best (%s), below the target %.3f",
                    key, k, recall, params, target_recall)
    info = {
        "key": key, "params": params, "n": int(n), "dim": int(dim), "metric": "inner_product",
        "recall_k": k, "recall": None if recall is None else round(recall, 4),
        "n_queries": queries_used, "queries": "held-out: sampled rows, own row excluded",
        "target_recall": target_recall, "target_met": target_met, "seed": seed,
        "train_rows": train_rows, "tuning": tuning, "seconds": seconds,
        "faiss_version": faiss.__version__,
    }
    return index, info


@contextlib.contextmanager
def timed(step: str, seconds: dict[str, float]):
    start = time.perf_counter()
    yield
    seconds[step] = round(time.perf_counter() - start, 3)


def train_index(index: faiss.Index, key: str, vectors: np.ndarray, seed: int,
                report: Progress) -> int:
    """Train an untrained index on a seeded sample; returns the rows it trained on (0: none)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQ):
        # On by default for PQ..x8; it only serves polysemous search, which we never switch on,
        # and took 3/4 of the training time on 50k x 64 vectors.
        faiss.downcast_index(ivf).do_polysemous_training = False
    if index.is_trained:
        return 0
    rows = training_rows(index, len(vectors))
    report(f"training {key} on {rows:,} vectors")
    try:
        index.train(vectors[sample_rows(len(vectors), rows, seed + 1)])
    except RuntimeError as err:
        raise IndexKeyError(f"cannot train {key!r} on {rows:,} vectors: "
                            f"{faiss_reason(err)}") from None
    return rows


def add_vectors(index: faiss.Index, key: str, vectors: np.ndarray, report: Progress) -> None:
    n, before = len(vectors), index.ntotal
    for lo in range(0, n, ADD_BLOCK_ROWS):
        report(f"adding vectors to {key}: {lo:,}/{n:,}")
        index.add(vectors[lo:lo + ADD_BLOCK_ROWS])
    if index.ntotal != before + n:
        raise RuntimeError(f"index holds {index.ntotal} vectors after adding {n} to {before}")


def tune(index: faiss.Index, key: str, vectors: np.ndarray, k: int, target_recall: float,
         n_queries: int, seed: int, report: Progress
         ) -> tuple[dict, float | None, list[dict], int]:
    """Raise the search parameters over their grid until held-out recall@k reaches the target;
    leaves the best setting applied. Returns (params, recall, tuning log, queries used)."""
    grid = search_params_grid(index)
    if k < 1:
        return grid[0], None, [], 0
    query_rows = sample_rows(len(vectors), n_queries, seed)
    report(f"exact search for {len(query_rows):,} held-out queries")
    true_scores, true_ids = held_out_truth(vectors, query_rows, k)
    params, recall, tuning = grid[0], None, []
    for candidate in grid:
        apply_params(index, candidate)
        got, ms = measure_recall(index, vectors, query_rows, true_scores, true_ids, k)
        tuning.append({**candidate, "recall": round(got, 4), "ms_per_query": round(ms, 4)})
        report(f"tuning {key}: {candidate or 'no parameters'} -> recall@{k} {got:.3f}")
        if recall is None or got > recall:
            params, recall = candidate, got
        if got >= target_recall:
            break
    apply_params(index, params)
    return params, recall, tuning, len(query_rows)


def run_build_index(index_dir: str | Path, *, index_key: str | None = None,
                    target_recall: float = 0.95, force: bool = False,
                    memory_budget: int | None = None, ray: str | None = None,
                    console=None) -> dict:
    """The build-index stage: embedding shards -> index.faiss + index.json in `index_dir`,
    with the folder held (no other command reads or writes it meanwhile)."""
    folder = IndexFolder(index_dir)
    if not folder.exists():
        folder.require_embeddings()  # the one-line error, without making the folder
    with folder.writing("build-index"):
        return build_folder_index(index_dir, index_key=index_key, target_recall=target_recall,
                                  force=force, memory_budget=memory_budget, ray=ray,
                                  console=console)


def needs_streaming(n: int, dim: int, key: str, memory_budget: int) -> bool:
    """Whether the build must read the vectors shard by shard: when all of them as float32
    beside the index would pass the budget, and always for rescored or binary keys (their
    codes and rescore file are written as the shards go by)."""
    base, rescore = split_key(key)
    if rescore is not None or is_binary_key(base):
        return True
    return n * dim * 4 + index_bytes(n, dim, key) > memory_budget


def build_folder_index(index_dir: str | Path, *, index_key: str | None = None,
                       target_recall: float = 0.95, force: bool = False,
                       memory_budget: int | None = None, ray: str | None = None,
                       console=None) -> dict:
    """`run_build_index` once the folder is held.

    Skips (returns the existing info, with "skipped": True) when index.json was built from the
    current embeddings with the same settings, unless `force`. `console` (rich) shows progress.
    `memory_budget` (bytes; default half the RAM) picks the key (choice.choose_index_key) and
    whether the vectors are loaded at once or streamed (streamed.py); `ray` adds the shards
    in Ray tasks (index/ray_build.py).
    """
    if not 0 < target_recall <= 1:
        raise UsageError(f"target recall must be in (0, 1], got {target_recall}")
    folder = IndexFolder(index_dir)
    folder.require_embeddings()
    settings = {"index_key": index_key, "target_recall": target_recall}
    if memory_budget is not None:
        settings["memory_budget"] = int(memory_budget)
    current = store.current_info(folder, settings) if not force else None
    if current is not None:
        log.info("%s is current: skipping build-index", folder.info_file)
        if console is not None:
            console.print(f"index is current: {current['key']}, recall@{current['recall_k']} "
                          f"{current['recall']} ({folder.info_file})", highlight=False)
        return {**current, "skipped": True}

    status = console.status("loading vectors") if console is not None else contextlib.nullcontext()
    with status as shown:
        def progress(message: str) -> None:
            log.info(message)
            if shown is not None:
                shown.update(message)

        n, dim = folder.rows, folder.embedding_dim()
        budget = memory_budget or default_memory_budget()
        key = index_key or choose_index_key(n, dim, budget)
        if index_key is None and (ray is not None or needs_streaming(n, dim, key, budget)):
            key = streamed_key(key)
        make_index(dim, key)  # a bad key fails before the vectors are read
        check_embedding_shards(folder)
        store.remove_stale_side_files(folder, keep=kept_side_files(folder))
        previous = None if force else updatable(folder, settings, key)
        if previous is not None and previous["build"] == "in-memory" and \
                not needs_streaming(n, dim, key, budget):
            info = update_in_memory(folder, previous, key, target_recall, settings, progress)
        elif previous is not None and previous["build"] == "streamed":
            built = update_streamed_folder(folder, previous, target_recall, ray, progress)
            info = write_streamed(folder, built, settings)
        elif ray is not None or needs_streaming(n, dim, key, budget):
            built = build_streamed_folder(folder, key, budget, target_recall, ray, progress)
            info = write_streamed(folder, built, settings)
        else:
            vectors = folder.load_vectors()
            if len(vectors) != n:
                raise IndexFolderError(f"{folder.path}: embedding shards hold {len(vectors)} "
                                       f"rows, the manifest {n}: run `pipeline embed --index`")
            index, info = build_index(vectors, key, target_recall, progress=progress)
            del vectors
            info = store.write_index(folder, index, {**info, "build": "in-memory",
                                                     "memory_budget": int(budget),
                                                     "trained_on_rows": n,
                                                     "settings": settings})
    if console is not None:
        console.print(summary_line(info, folder.index_file), highlight=False)
    return info


def updatable(folder: IndexFolder, settings: dict, key: str) -> dict | None:
    """index.json, if its index can take the folder's new rows instead of being rebuilt: built
    in memory with these settings and key, by this embed identity, from embedding shards that
    are the first ones of today's, unchanged (rows were only appended: text/update.py), and
    index.faiss is the file it records."""
    try:
        old = store.read_index_info(folder)
    except IndexFolderError:
        return None
    shards = store.embedding_shards(folder)
    recorded = old.get("embedding_shards")
    if (old.get("format_version") != store.INDEX_FORMAT_VERSION or old.get("key") != key
            or old.get("settings") != settings
            or old.get("build") not in ("in-memory", "streamed")
            or old.get("embed_identity") != folder.identity or not recorded
            or len(recorded) >= len(shards) or shards[:len(recorded)] != recorded):
        return None
    record = old.get("index_file") or {}
    if store.file_sha256(folder.index_file) != record.get("sha256"):
        return None
    return old


def update_in_memory(folder: IndexFolder, previous: dict, key: str, target_recall: float,
                     settings: dict, progress: Progress) -> dict:
    """Add the rows appended since `previous` was built to its trained index (row r is still
    FAISS id r), tune again on all vectors and write it. Training is kept: past twice the rows
    it was trained on, the summary says a retrain is due (`build-index --force`)."""
    seconds: dict[str, float] = {}
    with timed("load", seconds):
        index = faiss.read_index(str(folder.index_file))  # not mapped: it grows
        vectors = folder.load_vectors()
    old_n, n = previous["n"], len(vectors)
    with timed("add", seconds):
        add_vectors(index, key, vectors[old_n:], progress)
    if index.ntotal != n:
        raise IndexFolderError(f"{folder.index_file} holds {index.ntotal} rows after the "
                               f"update, the embeddings {n}: {store.rebuild_hint(folder)}")
    with timed("tune", seconds):
        k = min(RECALL_K, n - 1)
        params, recall, tuning, queries = tune(index, key, vectors, k, target_recall,
                                               previous.get("n_queries") or 1000,
                                               previous.get("seed", 0), progress)
    trained_on = previous.get("trained_on_rows", old_n)
    info = {**{k_: v for k_, v in previous.items()
               if k_ not in ("format_version", "index_file", "side_files", "memory",
                             "embedding_shards", "embed_identity", "embeddings")},
            "params": params, "n": int(n), "recall_k": k,
            "recall": None if recall is None else round(recall, 4), "n_queries": queries,
            "target_met": None if recall is None else recall >= target_recall,
            "tuning": tuning, "seconds": seconds, "trained_on_rows": trained_on,
            "update": {"added_rows": int(n - old_n), "previous_rows": int(old_n),
                       "retrain_due": bool(n > 2 * trained_on and index.is_trained
                                           and previous.get("train_rows", 0) > 0)},
            "settings": settings}
    return store.write_index(folder, index, info)


def write_streamed(folder: IndexFolder, built: streamed.StreamedBuild, settings: dict) -> dict:
    side = {role: path for role, path in (("ivfdata", built.ivfdata),
                                          ("rescore", built.rescore_path),
                                          ("trained", built.trained_path)) if path}
    return store.write_index(folder, built.index, {**built.info, "settings": settings}, side)


def update_streamed_folder(folder: IndexFolder, previous: dict, target_recall: float,
                           ray: str | None, progress: Progress) -> streamed.StreamedBuild:
    """A streamed build's update (streamed.update_streamed) from the folder's files."""
    index = store.read_index_file(folder.index_file, previous)
    side = previous.get("side_files", {})
    trained = (folder.path / side["trained"]["name"]).read_bytes() if "trained" in side \
        else None
    if "ivfdata" in side and trained is None:
        raise IndexFolderError(f"{folder.info_file} records no trained index to add to: "
                               f"{store.rebuild_hint(folder)}")
    _, rescore = split_key(previous["key"])
    old = streamed.StreamedBuild(
        index, previous, folder.path / side["ivfdata"]["name"] if "ivfdata" in side else None,
        folder.path / side["rescore"]["name"] if rescore else None)
    map_shards = None
    if ray is not None:
        from pipeline.index.ray_build import ray_shard_mapper

        map_shards = ray_shard_mapper(folder, ray, progress)
    return streamed.update_streamed(FolderSource(folder), old, trained, folder.path,
                                    target_recall=target_recall, progress=progress,
                                    map_shards=map_shards)


def kept_side_files(folder: IndexFolder) -> set[str]:
    """The side files the folder's current index.json names (a build that fails keeps them)."""
    try:
        info = store.read_index_info(folder)
    except IndexFolderError:
        return set()
    return {record["name"] for record in info.get("side_files", {}).values()}


class FolderSource:
    """An index folder's embedding shards as a streamed.VectorSource."""

    def __init__(self, folder: IndexFolder):
        self.folder, self.n, self.dim = folder, folder.rows, folder.embedding_dim()

    def shards(self):
        yield from self.folder.vector_shards()


def build_streamed_folder(folder: IndexFolder, key: str, budget: int, target_recall: float,
                          ray: str | None, progress: Progress) -> streamed.StreamedBuild:
    source = FolderSource(folder)
    map_shards = None
    if ray is not None:
        from pipeline.index.ray_build import ray_shard_mapper

        map_shards = ray_shard_mapper(folder, ray, progress)
    return streamed.build_streamed(source, key, folder.path, memory_budget=budget,
                                   target_recall=target_recall, progress=progress,
                                   map_shards=map_shards)


def check_embedding_shards(folder: IndexFolder) -> None:
    """Refuse to build from an embedding shard whose bytes are not those embed recorded. Such
    an index would pass as current once embed repairs the shard: the repaired shard has the
    recorded hash again, and "current" compares recorded hashes (store.source)."""
    records = folder.embed["shards"]
    repair = f"run `pipeline embed --index {folder.path}` to redo it"
    for shard in folder.token_shards:
        check_shard(folder.embeddings_dir / shard["name"], records[shard["name"]], repair)


def summary_line(info: dict, index_path: Path) -> str:
    met = "" if info["target_met"] is not False else " (below target)"
    params = (", ".join(f"{k}={v}" for k, v in info["params"].items())
              or ("exact" if info["key"] == "Flat" else "no search parameters"))
    memory = info.get("memory", {})
    held = (f", {human_bytes(memory['index_bytes'])} to search "
            f"({memory['compression']:.1f}x under float32)") if memory else ""
    if memory.get("rescore_bytes"):
        held += f" + {human_bytes(memory['rescore_bytes'])} rescore file on disk"
    update = info.get("update")
    if update:
        held += f"; added {update['added_rows']:,} rows to the {update['previous_rows']:,} built"
        if update["retrain_due"]:
            held += (f" (retrain due: {info['n'] / info['trained_on_rows']:.1f}x the rows it "
                     f"was trained on; build-index --force)")
    return (f"index: {info['key']} over {info['n']:,} x {info['dim']}, {params}, "
            f"recall@{info['recall_k']} {info['recall']} (target "
            f"{info['settings']['target_recall']}){met}{held} in "
            f"{sum(info['seconds'].values()):.1f} s -> {index_path}")


def human_bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
