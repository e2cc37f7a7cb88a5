"""Out-of-core index builds: the vectors are read a shard at a time, never all at once.

Two passes over the shards:
1. a seeded sample (the training set, the codecs' calibration) and the held-out queries;
2. per shard (`shard_work`, a pure function of the shard, so it runs in a loop here or as a
   Ray task): its IVF part (its rows' list numbers and codes, ids = corpus rows), its rows of
   the rescore file, and the queries' exact top-k within it. IVF parts are merged into one
   file of FAISS's `OnDiskInvertedLists` (ondisk.py, by file I/O rather than mapping), which
   search maps instead of loading; other indexes (HNSW, Flat, SQ8, binary) take the shard in
   memory, in row order.
Then the search parameters (nprobe / efSearch, and the rescore factor) rise until held-out
recall@k against the exact top-k reaches the target, as for in-memory builds.

Memory: the index being built (for IVF only its quantizer, the lists go to disk), the sample
(capped at a quarter of the budget) and one shard.
"""

from __future__ import annotations

import contextlib
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import faiss
import numpy as np

from pipeline.errors import IndexKeyError
from pipeline.folder import sample_rows
from pipeline.index import ondisk
from pipeline.index import rescore as rs
from pipeline.index.choice import (
    MIN_TRAIN_ROWS,
    TRAIN_POINTS_PER_LIST,
    apply_params,
    faiss_reason,
    make_index,
    quiet_faiss,
    search_params_grid,
)
from pipeline.index.recall import RECALL_K, TIE_EPS, block_top_k, drop_self, merge_top_k

Progress = Callable[[str], None]

# Exact neighbours kept per query beyond k: a found row counts as right if it is among them
# with a score tied to the k-th (recall_from_truth), so duplicates are not misses.
TIE_EXTRA = 10
CALIBRATION_ROWS = 100_000
# Lists past which k-means runs in two levels (sqrt(nlist) clusters, then each split): one
# level compares every training vector with every centroid, hours for 2^16 lists on 2 cores.
TWO_LEVEL_LISTS = 16_384


class VectorSource(Protocol):
    """Row-ordered shards of unit vectors: an index folder's embeddings, or a benchmark's."""

    n: int
    dim: int

    def shards(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first_row, (rows, dim) float32) per shard, in row order."""
        ...


def take_rows(source: VectorSource, rows: np.ndarray) -> np.ndarray:
    """The vectors of sorted distinct `rows`, in one pass over the shards."""
    rows = np.asarray(rows, np.int64)
    out = np.empty((len(rows), source.dim), np.float32)
    for first, block in source.shards():
        lo, hi = np.searchsorted(rows, [first, first + len(block)])
        out[lo:hi] = block[rows[lo:hi] - first]
    return out


@dataclass
class Plan:
    """What every shard's work needs to know: the same for all shards of one build."""

    key: str
    dim: int
    queries: np.ndarray  # held-out query vectors (nq, dim)
    truth_k: int
    rescore: rs.Rescore | None = None
    calibration: dict | None = None
    trained: bytes | None = None  # the trained empty IVF index, serialised
    in_memory: bool = False       # a float index that is not IVF: the vectors themselves go in

    @property
    def base_key(self) -> str:
        return rs.split_key(self.key)[0]

    @property
    def binary(self) -> bool:
        return rs.is_binary_key(self.base_key)


@dataclass
class ShardResult:
    first_row: int
    rows: int
    part: ondisk.Part | None = None    # the IVF lists' entries (ids = corpus rows)
    codes: np.ndarray | None = None    # binary codes, for a binary index
    vectors: np.ndarray | None = None  # the vectors, for an in-memory float index
    rescore_rows: np.ndarray | None = None
    truth: tuple[np.ndarray, np.ndarray] = field(default=None)  # the queries' top-k here


def shard_work(plan: Plan, first_row: int, vectors: np.ndarray, trained=None) -> ShardResult:
    """Everything one shard contributes, from the shard alone. `trained`: plan.trained
    already deserialised (it is only read), to skip doing so per shard."""
    vectors = np.ascontiguousarray(vectors, np.float32)
    result = ShardResult(first_row, len(vectors),
                         truth=block_top_k(plan.queries, vectors, first_row, plan.truth_k))
    if plan.trained is not None:
        if trained is None:
            trained = faiss.deserialize_index(np.frombuffer(plan.trained, np.uint8))
        result.part = ondisk.encode_part(trained, vectors, first_row)
    elif plan.binary:
        result.codes = rs.binary_codes(vectors, plan.calibration)
    elif plan.in_memory:
        result.vectors = vectors
    if plan.rescore is not None:
        result.rescore_rows = rs.encode(vectors, plan.rescore, plan.calibration)
    return result


def is_ivf(index) -> bool:
    if isinstance(index, faiss.IndexBinary):
        return False
    return faiss.try_extract_index_ivf(index) is not None


def sample_size(index, n: int, dim: int, memory_budget: int, needs_calibration: bool) -> int:
    """Training rows for the index (IVF: TRAIN_POINTS_PER_LIST per list), at least the
    calibration's, at most a quarter of the memory budget's worth of float32 vectors."""
    wanted = CALIBRATION_ROWS if needs_calibration else 0
    if isinstance(index, faiss.IndexBinary):
        wanted = max(wanted, 0 if index.is_trained else MIN_TRAIN_ROWS)
    elif not index.is_trained:
        ivf = faiss.try_extract_index_ivf(index)
        nlist = ivf.nlist if ivf is not None else 0
        if nlist > n:
            raise IndexKeyError(f"IVF{nlist} needs at least {nlist} vectors to train, have {n}")
        wanted = max(wanted, TRAIN_POINTS_PER_LIST * nlist, MIN_TRAIN_ROWS)
    cap = max(memory_budget // 4 // (4 * dim), 1)
    return min(n, wanted, cap)


def train(index, key: str, sample: np.ndarray, calibration: dict | None, seed: int) -> None:
    """Train the empty index on the sample (binary indexes on its codes)."""
    if index.is_trained:
        return
    try:
        with quiet_faiss():  # k-means warns of few points per centroid on small samples
            train_quietly(index, sample, calibration, seed)
    except RuntimeError as err:
        raise IndexKeyError(f"cannot train {key!r} on {len(sample):,} vectors: "
                            f"{faiss_reason(err)}") from None


def train_quietly(index, sample: np.ndarray, calibration: dict | None, seed: int) -> None:
    if isinstance(index, faiss.IndexBinary):
        index.train(rs.binary_codes(sample, calibration))
        return
    ivf = faiss.try_extract_index_ivf(index)
    if isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQ):
        faiss.downcast_index(ivf).do_polysemous_training = False  # as build.train_index
    if ivf is not None and ivf.nlist >= TWO_LEVEL_LISTS:
        train_two_level(index, sample, seed)
    else:
        index.train(sample)


def train_two_level(index, sample: np.ndarray, seed: int) -> None:
    """IVF with many lists: centroids from two-level k-means (faiss.contrib.clustering), made
    unit length (the lists are searched by inner product), then the rest of the index (the
    pre-transform, PQ) trained as usual on the same sample."""
    from faiss.contrib.clustering import two_level_clustering

    top = faiss.downcast_index(index)
    x = sample
    if isinstance(top, faiss.IndexPreTransform):  # e.g. OPQ: train it, cluster what it outputs
        for i in range(top.chain.size()):
            transform = top.chain.at(i)
            transform.train(x)
            x = transform.apply(x)
    ivf = faiss.extract_index_ivf(index)
    nc1 = int(np.sqrt(ivf.nlist))
    centroids, _ = two_level_clustering(x, nc1, ivf.nlist, seed=seed, verbose=False)
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    ivf.quantizer.train(centroids)
    ivf.quantizer.add(np.ascontiguousarray(centroids, np.float32))
    faiss.downcast_index(ivf).train(x)
    if isinstance(top, faiss.IndexPreTransform):
        top.is_trained = True


def recall_from_truth(found: np.ndarray, truth_ids: np.ndarray, truth_scores: np.ndarray,
                      k: int) -> float:
    """Recall@k of found ids (nq, k) against the exact neighbours (nq, k + TIE_EXTRA, own row
    dropped): a found id is right if it is among them with a score >= the k-th - TIE_EPS."""
    kth = truth_scores[:, k - 1:k]
    good = (truth_ids[:, None, :] == found[:, :k, None]) & (truth_scores >= kth - TIE_EPS)[:, None]
    return float(good.any(axis=2).sum() / (len(found) * k))


@dataclass
class StreamedBuild:
    index: object                 # faiss.Index or faiss.IndexBinary
    info: dict
    ivfdata: Path | None          # the merged on-disk lists
    rescore_path: Path | None
    trained_path: Path | None = None  # IVF: the trained empty index, for updates


def build_streamed(source: VectorSource, key: str, out_dir: Path, *, memory_budget: int,
                   target_recall: float = 0.95, n_queries: int = 1000, seed: int = 0,
                   progress: Progress | None = None,
                   map_shards: Callable[[Plan, Iterable], Iterator[ShardResult]] | None = None
                   ) -> StreamedBuild:
    """Build and tune `key` over `source` shard by shard; files go to `out_dir` under names
    unique to this build (index.<id>.ivfdata, index.<id>.rescore), which the caller records.

    `map_shards(plan, shards)`: runs `shard_work` over the shards and yields the results in
    row order (default: here, one at a time; the Ray engine passes tasks)."""
    report = progress or (lambda message: None)
    n, dim = source.n, source.dim
    index = make_index(dim, key)
    if not isinstance(index, faiss.IndexBinary) and \
            isinstance(faiss.downcast_index(index), faiss.IndexRefine):
        # Refine holds every row's refinement code in RAM; Rescore keeps them on disk.
        raise IndexKeyError(f"index key {key!r}: a streamed build keeps no refinement codes in "
                            f"memory; write Rescore(fp16) (or int8/fp32) instead of Refine, "
                            f"e.g. 'OPQ64,IVF4096,PQ64,Rescore(fp16)'")
    _, rescore = rs.split_key(key)
    binary = isinstance(index, faiss.IndexBinary)
    seconds: dict[str, float] = {}
    build_id = uuid.uuid4().hex[:12]
    k = min(RECALL_K, n - 1)
    truth_k = min(n, k + 1 + TIE_EXTRA)

    start = time.perf_counter()
    count = sample_size(index, n, dim, memory_budget, binary or rescore is not None)
    query_rows = sample_rows(n, n_queries, seed) if k >= 1 else np.zeros(0, np.int64)
    train_rows = sample_rows(n, count, seed + 1)
    report(f"reading a sample of {len(train_rows):,} and {len(query_rows):,} query vectors")
    wanted = np.union1d(train_rows, query_rows)
    taken = take_rows(source, wanted)
    sample = taken[np.searchsorted(wanted, train_rows)]
    queries = taken[np.searchsorted(wanted, query_rows)]
    del taken
    calibration = rs.calibrate(sample) if (binary or rescore) else None
    report(f"training {key} on {len(sample):,} vectors")
    trained_rows = 0 if index.is_trained else len(sample)
    train(index, key, sample, calibration, seed)
    del sample
    seconds["train"] = round(time.perf_counter() - start, 3)

    ivf = is_ivf(index)
    plan = Plan(key, dim, queries, truth_k, rescore, calibration,
                faiss.serialize_index(index).tobytes() if ivf else None,
                in_memory=not (ivf or binary))
    built = add_and_tune(index, plan, source, query_rows, out_dir, build_id, target_recall,
                         report, map_shards, seconds)
    built.info.update({"seed": seed, "train_rows": trained_rows, "trained_on_rows": int(n),
                       "memory_budget": int(memory_budget)})
    if ivf:  # kept so that an update can add parts to the same trained index
        built.trained_path = out_dir / f"index.{build_id}.trained"
        built.trained_path.write_bytes(plan.trained)
    return built


def add_and_tune(index, plan: Plan, source: VectorSource, query_rows: np.ndarray,
                 out_dir: Path, build_id: str, target_recall: float, report: Progress,
                 map_shards, seconds: dict, start_row: int = 0, base=None,
                 old_truth: Iterable = ()) -> StreamedBuild:
    """The second pass (shard_work over the shards from `start_row` on), the merge, and the
    tuning; `base`: an update's previous index (its on-disk lists go first in the merge, its
    rescore file is copied and extended), `old_truth`: the queries' exact top-k over the rows
    before `start_row`."""
    start = time.perf_counter()
    n, key, rescore = source.n, plan.key, plan.rescore
    ivf = plan.trained is not None
    parts_dir = out_dir / f"index.{build_id}.parts"
    ivfdata = out_dir / f"index.{build_id}.ivfdata" if ivf else None
    rescore_path = out_dir / f"index.{build_id}.rescore" if rescore else None
    if base is not None and rescore_path is not None:
        shutil.copyfile(base.rescore_path, rescore_path)
    target = faiss.deserialize_index(np.frombuffer(plan.trained, np.uint8)) \
        if base is not None and ivf else index
    run = map_shards or (lambda p, shards: (shard_work(p, first, v, target if ivf else None)
                                            for first, v in shards))
    shards = ((first, v) for first, v in source.shards() if first >= start_row)
    try:
        truth_parts = list(old_truth) + add_shards(
            target, plan, run(plan, shards), n, parts_dir, ivfdata, rescore_path, report,
            start_row=start_row,
            base_lists=ondisk.OnDiskLists(base.ivfdata, faiss.extract_index_ivf(index).invlists)
            if base is not None and ivf else None)
    except BaseException:
        for path in (ivfdata, rescore_path):
            if path is not None:
                path.unlink(missing_ok=True)
        raise
    index = target
    seconds["add"] = round(time.perf_counter() - start, 3)

    start = time.perf_counter()
    k = min(RECALL_K, n - 1)
    queries = plan.queries
    truth_scores, truth_ids = without_own_row(
        *merge_top_k(truth_parts, len(queries), plan.truth_k), query_rows)
    searchable = SearchIndex(index, rescore_store(rescore_path, rescore, plan.calibration,
                                                  plan.dim), plan.calibration)
    params, recall, tuning = tune(searchable, key, queries, query_rows, truth_ids,
                                  truth_scores, k, target_recall, report)
    seconds["tune"] = round(time.perf_counter() - start, 3)
    searchable.close()
    target_met = None if recall is None else recall >= target_recall
    info = {
        "key": key, "params": params, "n": int(n), "dim": int(plan.dim),
        "metric": "inner_product", "recall_k": k,
        "recall": None if recall is None else round(recall, 4),
        "n_queries": len(query_rows), "queries": "held-out: sampled rows, own row excluded",
        "target_recall": target_recall, "target_met": target_met,
        "tuning": tuning, "seconds": seconds,
        "faiss_version": faiss.__version__, "build": "streamed",
    }
    if plan.calibration is not None:
        info["calibration"] = plan.calibration
    return StreamedBuild(index, info, ivfdata, rescore_path)


def update_streamed(source: VectorSource, previous: StreamedBuild, trained: bytes | None,
                    out_dir: Path, *, target_recall: float, progress: Progress | None = None,
                    map_shards=None) -> StreamedBuild:
    """Add the rows from previous.info["n"] on to a streamed build's trained index: new IVF
    parts merged after the old lists into a new on-disk file, binary codes or vectors added in
    memory, the rescore file copied and extended; then tuned again on all rows (one more pass
    over the old shards for the queries' exact top-k)."""
    report = progress or (lambda message: None)
    old = previous.info
    n, dim, old_n = source.n, source.dim, old["n"]
    key, seed = old["key"], old.get("seed", 0)
    _, rescore = rs.split_key(key)
    binary = isinstance(previous.index, faiss.IndexBinary)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    k = min(RECALL_K, n - 1)
    truth_k = min(n, k + 1 + TIE_EXTRA)
    query_rows = sample_rows(n, old.get("n_queries") or 1000, seed)
    report(f"reading {len(query_rows):,} query vectors")
    queries = take_rows(source, query_rows)
    report(f"exact neighbours of the queries among the {old_n:,} rows indexed")
    old_truth = [block_top_k(queries, v, first, truth_k) for first, v in source.shards()
                 if first < old_n]
    seconds["truth"] = round(time.perf_counter() - start, 3)
    plan = Plan(key, dim, queries, truth_k, rescore, old.get("calibration"), trained,
                in_memory=trained is None and not binary)
    built = add_and_tune(previous.index, plan, source, query_rows, out_dir,
                         uuid.uuid4().hex[:12], target_recall, report, map_shards, seconds,
                         start_row=old_n, base=previous, old_truth=old_truth)
    trained_on = old.get("trained_on_rows", old_n)
    built.info.update({"seed": seed, "train_rows": old.get("train_rows", 0),
                       "trained_on_rows": trained_on,
                       "memory_budget": old.get("memory_budget"),
                       "update": {"added_rows": int(n - old_n), "previous_rows": int(old_n),
                                  "retrain_due": bool(n > 2 * trained_on
                                                      and old.get("train_rows", 0) > 0)}})
    if trained is not None:
        built.trained_path = out_dir / f"index.{uuid.uuid4().hex[:12]}.trained"
        built.trained_path.write_bytes(trained)
    return built


def add_shards(index, plan: Plan, results: Iterable[ShardResult], n: int, parts_dir: Path,
               ivfdata: Path | None, rescore_path: Path | None, report: Progress,
               start_row: int = 0, base_lists=None) -> list:
    """Put the shards' results into the index (IVF: parts on disk, merged into `ivfdata` at the
    end) and the rescore file, in row order; returns the queries' exact top-k per shard."""
    part_files, truth_parts, done = [], [], start_row
    if ivfdata is not None:
        parts_dir.mkdir(parents=True, exist_ok=True)
    try:
        with contextlib.ExitStack() as stack:
            mode = "ab" if start_row else "wb"  # an update extends its copy of the old file
            rescore_out = stack.enter_context(open(rescore_path, mode)) if rescore_path else None
            for result in results:
                if result.first_row != done:
                    raise RuntimeError(f"shard results out of order: row {result.first_row}, "
                                       f"expected {done}")
                truth_parts.append(result.truth)
                if result.part is not None:
                    path = parts_dir / f"part-{len(part_files):05d}.lists"
                    result.part.write(path)
                    part_files.append(path)
                elif result.codes is not None:
                    index.add(result.codes)
                else:
                    index.add(result.vectors)
                if rescore_out is not None:
                    rescore_out.write(result.rescore_rows.tobytes())
                done += result.rows
                report(f"adding vectors to {plan.key}: {done:,}/{n:,}")
        if done != n:
            raise RuntimeError(f"the shards held {done} rows, the source says {n}")
        if ivfdata is not None:
            report(f"merging {len(part_files)} inverted-list parts into {ivfdata.name}")
            merge_parts(index, part_files, ivfdata, base_lists)
    finally:
        for path in part_files:
            Path(path).unlink(missing_ok=True)
        if parts_dir.exists():
            parts_dir.rmdir()
    return truth_parts


def without_own_row(scores: np.ndarray, ids: np.ndarray, self_rows: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) with each query's own row taken out (one column fewer), order kept; as
    recall.drop_self, for both arrays."""
    is_self = ids == np.asarray(self_rows)[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")[:, :ids.shape[1] - 1]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def merge_parts(index, part_files: list[Path], ivfdata: Path,
                base_lists: ondisk.OnDiskLists | None = None) -> None:
    """The parts' inverted lists (after `base_lists`, an update's old lists, if given) into
    one on-disk file installed in the empty trained `index` (ondisk.merge_parts)."""
    ivf = faiss.extract_index_ivf(index)
    parts = [ondisk.PartFile(path, ivf.nlist, ivf.code_size) for path in part_files]
    ondisk.merge_parts(index, ([base_lists] if base_lists is not None else []) + parts,
                       ivfdata)


def rescore_store(path, rescore, calibration, dim):
    return None if path is None else rs.RescoreFile(path, rescore, calibration, dim)


class SearchIndex:
    """An index as search uses it: a FAISS float index, or binary codes, with optional
    rescoring from the vectors on disk. `search(queries, k)` -> (scores, rows)."""

    def __init__(self, index, store: rs.RescoreFile | None = None,
                 calibration: dict | None = None, factor: int = rs.DEFAULT_FACTOR):
        self.index, self.store, self.calibration, self.factor = index, store, calibration, factor
        self.binary = isinstance(index, faiss.IndexBinary)

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    @property
    def d(self) -> int:
        return self.index.d

    def set_params(self, params: dict) -> None:
        params = dict(params)
        self.factor = int(params.pop("rescore_factor", self.factor))
        if params:
            apply_params(self.index, params)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, np.float32)
        if self.store is None:
            return self.index.search(queries, k)
        fetch = min(self.ntotal, k * self.factor)
        probe = rs.binary_codes(queries, self.calibration) if self.binary else queries
        _, candidates = self.index.search(probe, fetch)
        return rs.rescore_candidates(queries, candidates.astype(np.int64), self.store, k)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def index_grid(searchable: SearchIndex) -> list[dict]:
    """The index's own settings from cheap to accurate: nprobe / efSearch (none for Flat,
    binary Flat, PQ, SQ)."""
    if not searchable.binary:
        return search_params_grid(searchable.index)
    ivf = faiss.try_extract_index_binary_ivf(searchable.index) \
        if hasattr(faiss, "try_extract_index_binary_ivf") else None
    if ivf is None:
        return [{}]
    return [{"nprobe": p} for p in (1, 2, 4, 8, 16, 32, 64, 128, 256) if p <= ivf.nlist]


def tune(searchable: SearchIndex, key: str, queries: np.ndarray, query_rows: np.ndarray,
         truth_ids: np.ndarray, truth_scores: np.ndarray, k: int, target_recall: float,
         report: Progress) -> tuple[dict, float | None, list[dict]]:
    """Raise the search settings until held-out recall@k reaches the target: for each rescore
    factor (FACTORS, when there is a rescore file) the index's own parameter rises until the
    target, or until two steps in a row gain under 0.001 (then the next factor). Leaves the
    best setting applied. Returns (params, recall, tuning log)."""
    factors = rs.FACTORS if searchable.store is not None else (None,)
    grid = index_grid(searchable)
    with_factor = [{**g, **({} if f is None else {"rescore_factor": f})}
                   for f in factors for g in grid[:1]]
    if k < 1 or len(queries) == 0:
        return with_factor[0], None, []
    best, best_recall, tuning = with_factor[0], None, []
    for factor in factors:
        previous, stale = None, 0
        for setting in grid:
            candidate = {**setting, **({} if factor is None else {"rescore_factor": factor})}
            searchable.set_params(candidate)
            start = time.perf_counter()
            _, found = searchable.search(queries, k + 1)
            ms = 1000 * (time.perf_counter() - start) / len(queries)
            got = recall_from_truth(drop_self(found, query_rows, k), truth_ids, truth_scores, k)
            tuning.append({**candidate, "recall": round(got, 4), "ms_per_query": round(ms, 4)})
            report(f"tuning {key}: {candidate or 'no parameters'} -> recall@{k} {got:.3f}")
            if best_recall is None or got > best_recall:
                best, best_recall = candidate, got
            if got >= target_recall:
                searchable.set_params(best)
                return best, best_recall, tuning
            stale = stale + 1 if previous is not None and got < previous + 0.001 else 0
            previous = got
            if stale >= 2:
                break
    searchable.set_params(best)
    return best, best_recall, tuning
