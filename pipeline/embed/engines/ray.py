"""The embed stage on a Ray cluster (`pipeline embed --index DIR --ray ADDRESS`), on Ray Data.

The work is a dataset of *pieces*, one row each: a token shard's name, where a worker reads
it, and which part of it to embed. An actor pool (`map_batches` with `EmbedPieces`, a
callable class that loads the model once per actor) turns each piece into its rows' vectors,
and the driver, this process, puts each shard's vectors together, writes the shard exactly as
the local engine does and only then commits it to the manifest (stage.py). So:

- the output is byte for byte the local engine's: a CPU piece is a run of the very
  batches the local engine forms for that shard (`plan_batches`, length-sorted within the
  token budget), and a batch's vectors do not depend on which process or how many threads
  computed them (tested); pieces of ~PIECE_ROWS rows keep every actor busy to the end even
  when a corpus has fewer shards than actors. A GPU piece is a whole shard (the packed path
  plans its passes over the shard), written in the local engine's blocks (`local_blocks`);
- Ray Data's defaults (rows reordered, files named at random) never touch the output: rows
  go back by index into their shard, the driver names the file, and a piece that arrives twice
  (a task retried after its actor died) is taken once;
- a lost worker costs its pieces in flight: Ray restarts the actor and retries them
  (Ray Data's actor pools default to max_restarts=-1, max_task_retries=-1); a killed driver
  costs the shards not yet committed, which the rerun redoes, as with the local engine.

The workers get the model's files and the ranks file through the object store
(ray_cluster.ship_files), and read token shards where they are (ray_cluster.read_bytes),
checking each one's sha256 against the manifest before using it.
"""

from __future__ import annotations

import hashlib
import math
import os
import queue
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.embed.batching import plan_batches
from pipeline.embed.engines import END, show_rates
from pipeline.embed.engines.local import WRITE_ROWS
from pipeline.embed.gpu import PendingVectors
from pipeline.embed.layout import Planner, plan_passes
from pipeline.embed.shards import DTYPES, shard_tokens, write_embedding_shard
from pipeline.errors import IndexFolderError, UsageError
from pipeline.folder import EMBEDDINGS_DIR, TOKENS_DIR, check_shard
from pipeline.text.tokenizer import ENV_RANKS, RANKS_FILENAME, find_ranks_file

# Rows per CPU piece: ~50 pieces for the default corpus's 51k rows, ~8 s each on one core,
# so that the last pieces to finish end close together.
PIECE_ROWS = 1024
# Driver threads writing finished shards, so that the driver keeps taking pieces while a
# shard is written (Parquet and its sha256 take ~0.5 s for 50k x 768 vectors).
WRITERS = 2
GPU_CALLS = 2  # calls a GPU actor runs at a time: one on the GPU, the next being queued
MODEL_FILES = "model"  # prefixes of the workers' temp folders
RANKS_FILES = "ranks"


@dataclass(frozen=True)
class WorkerSettings:
    """What every actor is told: how to load the model and embed (the same as the driver's)."""

    model_sha256: str
    random_spec: str | None  # `random:PRESET:SEED`: made on the worker, nothing shipped
    pooling: str
    precision: str
    dtype: str
    batch_tokens: int
    gpu: bool
    threads: int  # torch threads per CPU actor
    calls: int = 1  # calls an actor runs at a time (GPU_CALLS on a GPU)


def split_batches(batches: list[list[int]], lengths: np.ndarray, pieces: int
                  ) -> list[list[list[int]]]:
    """`batches` (in plan order) cut into `pieces` consecutive runs of about equal padded
    cost (size x longest), so pieces take about equal time; a run may be empty. Pure: the
    driver counts on every worker cutting a shard the same way."""
    costs = np.array([len(b) * max(int(lengths[b].max()), 1) for b in batches], dtype=np.float64)
    middle = np.cumsum(costs) - costs / 2  # each batch goes to the run its midpoint is in
    run = np.minimum((middle / max(costs.sum(), 1.0) * pieces).astype(np.int64), pieces - 1)
    runs: list[list[list[int]]] = [[] for _ in range(pieces)]
    for batch, r in zip(batches, run.tolist(), strict=True):
        runs[r].append(batch)
    return runs


class EmbedPieces:
    """A Ray Data actor: loads the model once, then embeds one piece per call."""

    def __init__(self, settings: WorkerSettings, model_files, ranks_files):
        import ray
        import torch

        from pipeline.embed.encoder import Encoder
        from pipeline.ray_cluster import unpack_files, worker_name

        self.settings, self.name = settings, worker_name()
        if ranks_files is not None:
            os.environ[ENV_RANKS] = str(unpack_files(ray.get(ranks_files[0]), RANKS_FILES)
                                        / RANKS_FILENAME)
        if not settings.gpu:
            torch.set_num_threads(settings.threads)
        spec = settings.random_spec or str(unpack_files(ray.get(model_files[0]), MODEL_FILES))
        self.encoder = Encoder.load(spec, "cuda" if settings.gpu else "cpu", settings.pooling,
                                    settings.precision)
        if self.encoder.sha256 != settings.model_sha256:
            raise IndexFolderError(f"the model on {self.name} is not the driver's (sha256 "
                                   f"{self.encoder.sha256[:12]} != {settings.model_sha256[:12]})")
        self.encoder.warm_up()
        self.ready_at = time.time()  # wall clock: the driver's is on another host's clock
        self._cached: tuple[str, np.ndarray, np.ndarray] | None = None  # the last shard read
        self._queueing = threading.Lock()
        # The packed path's layouts planned in child processes, one per concurrent call, as
        # the local engine does (layout.py: in this process they would hold the GIL that
        # the other call needs to queue its passes).
        self._planners: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(settings.calls if self.encoder.packs else 0):
            self._planners.put(Planner())

    def __call__(self, batch: dict) -> dict:
        item = {key: column[0] for key, column in batch.items()}  # batch_size=1: one piece
        shard, piece = str(item["shard"]), int(item["piece"])
        started = time.perf_counter()
        values, offsets = self._tokens(shard, str(item["location"]), str(item["sha256"]))
        rows, vectors, passes = self._embed(values, offsets, piece, int(item["pieces"]))
        return {"shard": np.array([shard]), "piece": np.array([piece]),
                "rows": np.array([rows.astype(np.int64).tobytes()], dtype=object),
                "vectors": np.array([np.ascontiguousarray(vectors).tobytes()], dtype=object),
                "passes": np.array([np.asarray(passes, np.int64).tobytes()], dtype=object),
                "tokens": np.array([int((offsets[rows + 1] - offsets[rows]).sum())]),
                "worker": np.array([self.name]), "device": np.array([str(self.encoder.device)]),
                "precision": np.array([self.encoder.precision]),
                "seconds": np.array([time.perf_counter() - started]),
                "ready_at": np.array([self.ready_at])}

    def _tokens(self, shard: str, location: str, sha256: str):
        """A token shard's (values, offsets), read where it is, checked against its hash."""
        from pipeline.ray_cluster import read_bytes

        cached = self._cached  # read once: a GPU actor runs two calls at a time
        if cached is None or cached[0] != shard:
            data = read_bytes(location)
            if hashlib.sha256(data).hexdigest() != sha256:
                raise IndexFolderError(f"{location} on {self.name} is not the token shard the "
                                       "manifest records (its sha256 differs): is the "
                                       "workers' copy of the folder stale?")
            table = pq.read_table(pa.BufferReader(data), columns=["tokens"])
            cached = self._cached = (shard, *shard_tokens(table))
        return cached[1], cached[2]

    def _plan(self, values, offsets):
        planner = self._planners.get()
        try:  # in the child once it is up; until then here
            args = (values, offsets, self.settings.batch_tokens, self.encoder.window)
            return planner.plan_passes(*args) if planner.started() else plan_passes(*args)
        finally:
            self._planners.put(planner)

    def _embed(self, values, offsets, piece: int, pieces: int):
        """(rows, vectors, pass ends) of one piece: the whole shard on a GPU (packed passes,
        each ending at a row), else the piece's run of the local engine's own padded batches
        (float32, as it computes them; no passes)."""
        s = self.settings
        if s.gpu:
            # Two calls at a time (GPU_CALLS): one plans and queues its shard while the
            # other's is on the GPU, as the local engine's threads do; queueing is one at
            # a time, the waiting is not.
            plan = self._plan(values, offsets) if self.encoder.packs else None
            with self._queueing:
                pending = self.encoder.start_embed_flat(values, offsets, s.batch_tokens, None,
                                                        DTYPES[s.dtype], plan)
            vectors = pending.result()
            return np.arange(len(offsets) - 1), vectors, [rows for rows, _ in pending.done]
        lengths = np.diff(offsets)
        batches = plan_batches(lengths.tolist(), s.batch_tokens)
        mine = split_batches(batches, lengths, pieces)[piece]
        if not mine:
            return np.zeros(0, np.int64), np.zeros((0, self.encoder.dim), np.float32), []
        vectors = [self.encoder.embed_batch([values[offsets[i]:offsets[i + 1]] for i in b])
                   for b in mine]
        return np.concatenate([np.asarray(b) for b in mine]), np.concatenate(vectors), []


@dataclass
class ShardAssembly:
    """A shard's vectors as its pieces come back, in row order."""

    record: dict
    pieces: int
    vectors: np.ndarray | None = None  # made by the first piece
    arrived: set = field(default_factory=set)
    passes: list = field(default_factory=list)  # a GPU's: the row each packed pass ended at

    @property
    def rows(self) -> int:
        return self.record["rows"]

    def add(self, piece: int, rows: np.ndarray, vectors: np.ndarray) -> bool:
        """Put a piece's vectors in place; False if this piece was here already (a retry)."""
        if piece in self.arrived:
            return False
        self.arrived.add(piece)
        if self.pieces == 1 and np.array_equal(rows, np.arange(self.rows)):
            self.vectors = vectors  # the whole shard in row order (a GPU's): no copy
        else:
            if self.vectors is None:
                self.vectors = np.zeros((self.rows, vectors.shape[1]), np.float32)
            self.vectors[rows] = vectors
        return True

    @property
    def whole(self) -> bool:
        return len(self.arrived) == self.pieces


@dataclass
class WorkerTally:
    """What one worker did, for the summary."""

    device: str = ""
    precision: str = ""
    shards: set = field(default_factory=set)
    pieces: int = 0
    rows: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def as_dict(self, name: str) -> dict:
        return {"worker": name, "device": self.device, "precision": self.precision,
                "shards": len(self.shards), "pieces": self.pieces, "rows": self.rows,
                "tokens": self.tokens, "seconds": round(self.seconds, 3),
                "tokens_per_s": round(self.tokens / max(self.seconds, 1e-9), 1)}


def commit_written(writing: dict, commit, wait: bool) -> None:
    """Commit (in this, the calling thread) each shard whose write has finished, or, with
    `wait`, all of them as they finish; a failed write raises here."""
    for name in [n for n, f in writing.items() if wait or f.done()]:
        commit(name, writing.pop(name).result())


def local_blocks(vectors: np.ndarray, passes: list[int]):
    """The blocks (first row, vectors) the local engine writes a shard in, so the Parquet
    row groups, and so the bytes, are the same: `PendingVectors.parts(WRITE_ROWS)`, one block
    from a CPU; from a GPU, a block at each pass end at least WRITE_ROWS rows on."""
    if not passes:
        yield from PendingVectors(host=vectors).parts(WRITE_ROWS)
        return
    first = 0
    for rows in passes:
        if rows - first < WRITE_ROWS and rows < len(vectors):
            continue
        yield first, vectors[first:rows]
        first = rows


def actor_plan(cluster: dict, actors: int | None, gpu: bool) -> tuple[int, float]:
    """(actors, CPUs each): one per GPU on a GPU cluster; else one per CPU, each with an
    equal share of the cluster's CPUs (fractional where --ray-actors asks for more)."""
    if gpu:
        n = actors or int(cluster["gpus"])
        if n < 1:
            raise UsageError("--device cuda with --ray: the cluster has no GPU")
        return n, 1.0
    cpus = max(cluster["cpus"], 1.0)
    n = actors or max(int(cpus), 1)
    return n, cpus / n


class RayEngine:
    """Embeds the shards of INDEX on a Ray cluster; `run` as engines/__init__.py describes.

    `encoder` is the driver's copy of the model (the workers load the same weights and check
    their hash), `tokens_location` where the workers read INDEX/tokens/ (default: the
    folder's own path, for a shared filesystem or a one-machine cluster).
    """

    def __init__(self, index_dir: Path, encoder, dtype: str, batch_tokens: int, cluster: dict,
                 gpu: bool, precision: str, actors: int | None = None,
                 tokens_location: str | None = None):
        self.index_dir, self.dtype, self.batch_tokens = index_dir, dtype, batch_tokens
        self.out_dir = index_dir / EMBEDDINGS_DIR
        self.encoder, self.gpu, self.precision = encoder, gpu, precision
        self.actors, self.cpus_per_actor = actor_plan(cluster, actors, gpu)
        self.tokens_location = (tokens_location or str(index_dir.resolve() / TOKENS_DIR)
                                ).rstrip("/")
        self.workers: dict[str, WorkerTally] = defaultdict(WorkerTally)
        self._timings_lock = threading.Lock()

    def run(self, tasks: queue.Queue, commit, bar, timings: dict,
            stop: threading.Event | None = None) -> int:
        shards = []
        while (task := tasks.get()) is not END:
            shard, _ = task  # a table handed over in this process is on disk as well
            check_shard(self.index_dir / TOKENS_DIR / shard["name"], shard,
                        f"run `pipeline tokenize CORPUS --index {self.index_dir} --force`")
            shards.append(shard)
        if not shards:
            return 0
        assemblies = {s["name"]: ShardAssembly(
            s, 1 if self.gpu else math.ceil(s["rows"] / PIECE_ROWS)) for s in shards}
        results = iter(self._results(shards, assemblies).iter_rows())  # a generator
        try:
            n_tokens = self._collect(results, assemblies, commit, bar, timings, stop)
        finally:
            # The dataset's executor shut down now, not when garbage collected (a traceback
            # may keep it alive): its actors and the CPUs it reserved go back at once.
            results.close()
        timings["last_vectors_at_s"] = time.perf_counter() - timings["origin"]
        return n_tokens

    def _collect(self, results, assemblies: dict, commit, bar, timings: dict, stop) -> int:
        """Put each piece in its shard as it arrives; write and commit each shard whole;
        returns the tokens embedded."""
        n_tokens, writing = 0, {}  # shard name -> its write in a writer thread
        with ThreadPoolExecutor(WRITERS, thread_name_prefix="ray-write") as writers:
            for result in results:
                n_tokens += self._take(result, assemblies, writers, writing, bar, timings)
                # The cluster's rate since its first actor was ready.
                elapsed = time.perf_counter() - timings["origin"] - timings["models_ready_at_s"]
                show_rates(bar, cluster=f"{n_tokens / max(elapsed, 1e-3):,.0f} tok/s")
                commit_written(writing, commit, wait=False)
                if stop is not None and stop.is_set():
                    break
            commit_written(writing, commit, wait=True)
        return n_tokens

    def _take(self, result: dict, assemblies: dict, writers, writing: dict, bar,
              timings: dict) -> int:
        """Put a piece in its shard; hand the shard to a writer once whole; returns its
        tokens (0 for a piece that was here already)."""
        assembly = assemblies[result["shard"]]
        rows = np.frombuffer(result["rows"], np.int64)
        vectors = np.frombuffer(result["vectors"], self._piece_dtype()).reshape(
            len(rows), self.encoder.dim)
        if not assembly.add(int(result["piece"]), rows, vectors):
            return 0  # a retried piece, here already
        assembly.passes = np.frombuffer(result["passes"], np.int64).tolist()
        if timings["models_ready_at_s"] is None:
            # When the first actor was ready (its clock: close enough on one cluster);
            # its first piece was ready for it then (the pieces are there from the start).
            now = time.perf_counter() - timings["origin"]
            ready = round(now - (time.time() - float(result["ready_at"])), 3)
            timings["models_ready_at_s"] = timings["first_shard_at_s"] = ready
        self._tally(result, len(rows))
        timings["gpu_s"] += float(result["seconds"])
        bar.update(len(rows))
        if assembly.whole:
            name = assembly.record["name"]
            writing[name] = writers.submit(self._write, assembly, timings)
            del assemblies[name]
        return int(result["tokens"])

    def _piece_dtype(self):
        return DTYPES[self.dtype] if self.gpu else np.float32

    def _results(self, shards: list[dict], assemblies: dict):
        """The dataset of pieces, mapped by the actor pool (lazy: runs as it is iterated)."""
        import ray.data

        from pipeline.ray_cluster import ship_files

        items = [{"shard": s["name"], "piece": k, "pieces": assemblies[s["name"]].pieces,
                  "location": f"{self.tokens_location}/{s['name']}", "sha256": s["sha256"]}
                 for s in shards for k in range(assemblies[s["name"]].pieces)]
        spec = self.encoder.spec
        random_spec = spec if spec.startswith("random:") else None
        # In a list: Ray Data would otherwise hand the actors the value, fetched on the
        # driver first; a reference inside a list travels as a reference.
        model_files = None if random_spec else [ship_files(
            {p.name: p for p in Path(spec).iterdir() if p.is_file()})]
        ranks = find_ranks_file()
        ranks_files = [ship_files({RANKS_FILENAME: ranks})] if ranks else None
        settings = WorkerSettings(self.encoder.sha256, random_spec, self.encoder.pooling,
                                  self.precision, self.dtype, self.batch_tokens, self.gpu,
                                  max(1, int(self.cpus_per_actor)),
                                  GPU_CALLS if self.gpu else 1)
        if self.gpu:
            resources = {"num_gpus": 1}
            pool = ray.data.ActorPoolStrategy(size=self.actors, enable_true_multi_threading=True,
                                              max_concurrent_calls_per_actor=GPU_CALLS)
        else:
            resources = {"num_cpus": self.cpus_per_actor}
            pool = ray.data.ActorPoolStrategy(size=self.actors)
        return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            EmbedPieces, batch_size=1, batch_format="numpy",
            fn_constructor_args=(settings, model_files, ranks_files), compute=pool,
            **resources)

    def _tally(self, result: dict, rows: int) -> None:
        tally = self.workers[str(result["worker"])]
        tally.device, tally.precision = str(result["device"]), str(result["precision"])
        tally.shards.add(str(result["shard"]))
        tally.pieces += 1
        tally.rows += rows
        tally.tokens += int(result["tokens"])
        tally.seconds += float(result["seconds"])

    def _write(self, assembly: ShardAssembly, timings: dict) -> dict:
        """Write a whole shard as the local engine does: the same table, vectors cast to the
        stored dtype, the same blocks (`PendingVectors.parts`)."""
        t = time.perf_counter()
        name = assembly.record["name"]
        table = pq.read_table(self.index_dir / TOKENS_DIR / name,
                              columns=["row", "doc_id", "chunk"])
        vectors = assembly.vectors.astype(DTYPES[self.dtype], copy=False)
        record = write_embedding_shard(self.out_dir / name, table,
                                       local_blocks(vectors, assembly.passes))
        with self._timings_lock:
            timings["write_s"] += time.perf_counter() - t
        return record

    def summary(self) -> list[dict]:
        """What each worker did, busiest first."""
        return sorted((t.as_dict(name) for name, t in self.workers.items()),
                      key=lambda w: -w["rows"])
