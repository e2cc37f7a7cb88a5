"""The embed stage on a Ray cluster (`pipeline embed --index DIR --ray ADDRESS`), on Ray Data.

The work is a dataset of *pieces*, one row each: a token shard's name, where a worker reads
it, and which part of it to embed. An actor pool (`map_batches` with `EmbedPieces`, a
callable class that loads the model once per actor) turns each piece into its rows' vectors.
A whole shard (every GPU piece) is written by its actor where the actor sees the driver's
folder (one machine, a shared filesystem: the run's marker file is there), exactly as the
local engine writes it, block by block as the GPU finishes them; elsewhere, and for a CPU
piece of a shard, the vectors go back to the driver, this process, which puts each shard
together and writes it the same way. Only the driver commits a shard to the manifest
(stage.py), once its file is written. So:

- the output is byte for byte the local engine's: a CPU piece is a run of the very
  batches the local engine forms for that shard (`plan_batches`, length-sorted within the
  token budget), and a batch's vectors do not depend on which process or how many threads
  computed them (tested); pieces of ~PIECE_ROWS rows keep every actor busy to the end even
  when a corpus has fewer shards than actors. A GPU piece is a whole shard (the packed path
  plans its passes over the shard), written in the local engine's blocks (`local_blocks`, or
  the local engine's own `parts(WRITE_ROWS)` in the actor);
- Ray Data's defaults (rows reordered, files named at random) never touch the output: rows
  go back by index into their shard, the driver names the file, and a piece that arrives twice
  (a task retried after its actor died) is taken once;
- a lost worker costs its pieces in flight: Ray restarts the actor and retries them
  (Ray Data's actor pools default to max_restarts=-1, max_task_retries=-1); a killed driver
  costs the shards not yet committed, which the rerun redoes, as with the local engine.

The workers load the model from the driver's checkpoint folder where they see it with the
same weights, else from the copy a task on the driver's node puts in the object store
(ray_cluster.ship_files_later); they get the ranks file through the object store
(ray_cluster.ship_files), and read token shards where they are (ray_cluster.read_bytes),
checking each one's sha256 against the manifest before using it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import queue
import threading
import time
import uuid
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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
# Calls a GPU actor runs at a time: one queueing its shard on the GPU, the next planned and
# waiting, the one before writing its last block (3: no GPU idle between shards, 2: 0.2 s
# of 9.7 on the H200 bench; docs/performance.md).
GPU_CALLS = 3
# Whether an actor that sees the driver's folder writes whole shards itself (tests turn it
# off to check the other way, the vectors through the object store).
WRITE_ON_WORKERS = True
# Whether an actor that sees the driver's checkpoint folder loads it from there (tests turn
# it off to check the shipped copy).
MODEL_FROM_PATH = True
MODEL_FILES = "model"  # prefixes of the workers' temp folders
IMPORTED_AT = time.time()  # in an actor's process: soon after it started (its startup times)
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
    width: int | None = None  # n_embd, to compile the fused kernel while the weights load
    model_path: str | None = None  # the driver's checkpoint folder: loaded from there if an
    # actor sees the same files (a shared filesystem, one machine), else shipped
    out_dir: str | None = None  # INDEX/embeddings/, where an actor that sees the driver's
    marker: str | None = None   # marker file (`out_dir`/`marker`) writes whole shards itself


def arriving(blocks, moments: dict):
    """`blocks` as they come, moments["vectors_at"] set as each arrives (before its write)."""
    for block in blocks:
        moments["vectors_at"] = time.time()
        yield block


def process_started_at() -> float | None:
    """When this process started, by the wall clock (Linux; else None)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


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
    """A Ray Data actor: loads the model once, then embeds one piece per call.

    A whole shard (every GPU piece; a CPU shard of at most PIECE_ROWS rows) is embedded and
    written exactly as the local engine does it (`start_embed_flat`, then
    `write_embedding_shard` over `parts(WRITE_ROWS)`, block by block as the GPU finishes
    them) when this actor sees the driver's folder (its marker file is there: one machine,
    or a shared filesystem); it returns the file's sha256 and the driver commits it. Where
    it does not, and for a CPU piece of a shard, the vectors go back to the driver.
    """

    def __init__(self, settings: WorkerSettings, model_files, ranks_files):
        began = time.perf_counter()
        import ray
        import torch

        from pipeline.ray_cluster import unpack_files, worker_name

        self.settings, self.name = settings, worker_name()
        startup = self.startup = {"process_started_at": process_started_at(),
                                  "module_imported_at": IMPORTED_AT,
                                  "constructor_began_at": time.time() - (time.perf_counter()
                                                                         - began)}
        if ranks_files is not None:
            os.environ[ENV_RANKS] = str(unpack_files(ray.get(ranks_files[0]), RANKS_FILES)
                                        / RANKS_FILENAME)
        if not settings.gpu:
            torch.set_num_threads(settings.threads)
        t = time.perf_counter()
        compiling = self._compile_ahead()  # while the weights load, as the local engine
        self.encoder, startup["model_from"] = self._load(model_files)
        if self.encoder.sha256 != settings.model_sha256:
            raise IndexFolderError(f"the model on {self.name} is not the driver's (sha256 "
                                   f"{self.encoder.sha256[:12]} != {settings.model_sha256[:12]})")
        startup["load_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        self.encoder.warm_up(compiling)
        startup["warm_up_s"] = round(time.perf_counter() - t, 3)
        self.out_dir = self._out_dir()
        startup["writes_shards"] = self.out_dir is not None
        # The GPU's clock: each shard's first and last kernel, relative to this event, show
        # where the GPU waited between shards (WorkerTally.gpu_busy).
        self._clock = None
        if self.encoder.device.type == "cuda":
            from pipeline.embed.gpu import recorded_event

            with torch.cuda.device(self.encoder.device):
                self._clock = recorded_event(timing=True)
                self._clock.synchronize()
        self.ready_at = startup["ready_at"] = time.time()  # wall clock: the driver's is on
        startup["constructor_s"] = round(time.perf_counter() - began, 3)  # another host's
        self._cached: tuple | None = None  # the last shard read: (name, table, values, offsets)
        self._reading = threading.Lock()
        self._queueing = threading.Lock()
        # The packed path's layouts planned in child processes, one per concurrent call, as
        # the local engine does (layout.py: in this process they would hold the GIL that
        # the other call needs to queue its passes).
        self._planners: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(settings.calls if self.encoder.packs else 0):
            self._planners.put(Planner())

    def _compile_ahead(self):
        """The packed path's fused kernel compiling in a thread (`gpu.compile_ahead`), from
        the driver's n_embd, so that it overlaps fetching and loading the weights."""
        s = self.settings
        if not (s.gpu and s.width):
            return None
        import torch

        from pipeline.embed.device import quiet, resolve_precision
        from pipeline.embed.gpu import start_compile

        device = torch.device("cuda", torch.cuda.current_device())
        precision = resolve_precision(s.precision, device, notice=quiet)
        if precision not in ("bf16", "fp8"):
            return None
        return start_compile(device, precision, s.width)

    def _load(self, model_files):
        """(encoder, where its weights came from): the driver's checkpoint folder where this
        actor sees it with the same weights (no copy through the object store and a temp
        folder), else the shipped files."""
        import ray

        from pipeline.embed.encoder import Encoder
        from pipeline.errors import PipelineError
        from pipeline.ray_cluster import unpack_files

        s = self.settings
        device = "cuda" if s.gpu else "cpu"
        if s.random_spec:
            return Encoder.load(s.random_spec, device, s.pooling, s.precision), "random"
        if s.model_path and Path(s.model_path).is_dir():
            try:
                encoder = Encoder.load(s.model_path, device, s.pooling, s.precision)
                if encoder.sha256 == s.model_sha256:
                    return encoder, "path"
            except (PipelineError, OSError):
                pass  # not the driver's files after all: use the shipped ones
        spec = str(unpack_files(ray.get(model_files[0]), MODEL_FILES))
        return Encoder.load(spec, device, s.pooling, s.precision), "object store"

    def _out_dir(self) -> Path | None:
        """INDEX/embeddings/ if this actor sees the driver's folder (the marker the driver
        wrote there for this run is there), else None."""
        s = self.settings
        if s.out_dir and s.marker:
            with contextlib.suppress(OSError):
                if (Path(s.out_dir) / s.marker).read_text() == s.marker:
                    return Path(s.out_dir)
        return None

    def __call__(self, batch: dict) -> dict:
        item = {key: column[0] for key, column in batch.items()}  # batch_size=1: one piece
        shard, piece, pieces = str(item["shard"]), int(item["piece"]), int(item["pieces"])
        started, began_at = time.perf_counter(), time.time()
        table, values, offsets = self._tokens(shard, str(item["location"]), str(item["sha256"]))
        # When its tokens were ready for the device, and its last vectors came back (as
        # the local engine's first_shard_at_s and last_vectors_at_s): wall clock.
        moments = {"ready_at": time.time()}
        record, span = None, None
        if pieces == 1:
            rows = np.arange(len(offsets) - 1)
            vectors, passes, record, span = self._embed_shard(shard, table, values, offsets,
                                                              moments)
        else:
            rows, vectors = self._embed_batches(values, offsets, piece, pieces)
            passes = []
        moments.setdefault("vectors_at", time.time())
        tokens = int((offsets[rows + 1] - offsets[rows]).sum())
        return {"shard": np.array([shard]), "piece": np.array([piece]),
                "written": np.array([record is not None]),
                "sha256": np.array([record["sha256"] if record else ""]),
                "rows": np.array([rows.astype(np.int64).tobytes()], dtype=object),
                "vectors": np.array([b"" if vectors is None
                                     else np.ascontiguousarray(vectors).tobytes()],
                                    dtype=object),
                "dtype": np.array([str(vectors.dtype) if vectors is not None else ""]),
                "passes": np.array([np.asarray(passes, np.int64).tobytes()], dtype=object),
                "tokens": np.array([tokens]),
                "worker": np.array([self.name]), "device": np.array([str(self.encoder.device)]),
                "precision": np.array([self.encoder.precision]),
                "seconds": np.array([time.perf_counter() - started]),
                "began_at": np.array([began_at]), "ended_at": np.array([time.time()]),
                "tokens_ready_at": np.array([moments["ready_at"]]),
                "vectors_at": np.array([moments["vectors_at"]]),
                "gpu_span": np.array([np.asarray(span or (), np.float64).tobytes()],
                                     dtype=object),
                "startup": np.array([json.dumps(self.startup)]),
                "ready_at": np.array([self.ready_at])}

    def _tokens(self, shard: str, location: str, sha256: str):
        """A token shard's (table, values, offsets), read where it is, checked against its
        hash."""
        from pipeline.ray_cluster import read_bytes

        with self._reading:  # read once: a GPU actor runs two calls at a time
            cached = self._cached
            if cached is None or cached[0] != shard:
                data = read_bytes(location)
                if hashlib.sha256(data).hexdigest() != sha256:
                    raise IndexFolderError(f"{location} on {self.name} is not the token shard "
                                           "the manifest records (its sha256 differs): is the "
                                           "workers' copy of the folder stale?")
                table = pq.read_table(pa.BufferReader(data))
                cached = self._cached = (shard, table, *shard_tokens(table))
        return cached[1], cached[2], cached[3]

    def _plan(self, values, offsets):
        planner = self._planners.get()
        try:  # in the child once it is up; until then here
            args = (values, offsets, self.settings.batch_tokens, self.encoder.window)
            return planner.plan_passes(*args) if planner.started() else plan_passes(*args)
        finally:
            self._planners.put(planner)

    def _embed_shard(self, shard: str, table, values, offsets, moments: dict):
        """(vectors or None, pass ends, record or None, GPU span) of a whole shard, computed
        as the local engine does: on a GPU, packed passes (each ending at a row), several
        calls at a time (GPU_CALLS): one plans while another queues its shard on the GPU and
        another writes, queueing one at a time, the rest not. Written here when this actor sees the
        folder (`record`: the file's rows and sha256), else the vectors in row order."""
        s = self.settings
        plan = self._plan(values, offsets) if self.encoder.packs else None
        moments["ready_at"] = time.time()
        with self._queueing:
            pending = self.encoder.start_embed_flat(values, offsets, s.batch_tokens, None,
                                                    DTYPES[s.dtype], plan)
        vectors, record = None, None
        if self.out_dir is not None:
            record = write_embedding_shard(self.out_dir / shard, table,
                                           arriving(pending.parts(WRITE_ROWS), moments))
        else:
            vectors = pending.result()
            moments["vectors_at"] = time.time()
        span = None
        if self._clock is not None and pending.started is not None:
            span = (self._clock.elapsed_time(pending.started),
                    self._clock.elapsed_time(pending.done[-1][1]))
        return vectors, [rows for rows, _ in pending.done], record, span

    def _embed_batches(self, values, offsets, piece: int, pieces: int):
        """(rows, vectors) of a piece of a shard: its run of the local engine's own padded
        batches (float32, as it computes them)."""
        s = self.settings
        lengths = np.diff(offsets)
        batches = self.encoder.plan_batches(lengths.tolist(), s.batch_tokens)
        mine = split_batches(batches, lengths, pieces)[piece]
        if not mine:
            return np.zeros(0, np.int64), np.zeros((0, self.encoder.dim), np.float32)
        vectors = [self.encoder.embed_batch([values[offsets[i]:offsets[i + 1]] for i in b])
                   for b in mine]
        return np.concatenate([np.asarray(b) for b in mine]), np.concatenate(vectors)


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

    def add(self, piece: int, result: dict) -> bool:
        """Put a piece's vectors in place (none where its worker wrote the shard); False if
        this piece was here already (a retry)."""
        if piece in self.arrived:
            return False
        self.arrived.add(piece)
        rows = np.frombuffer(result["rows"], np.int64)
        if result["written"] or not len(rows):
            return True
        vectors = np.frombuffer(result["vectors"], np.dtype(str(result["dtype"]))).reshape(
            len(rows), -1)
        self.passes = np.frombuffer(result["passes"], np.int64).tolist()
        if self.pieces == 1 and np.array_equal(rows, np.arange(self.rows)):
            self.vectors = vectors  # the whole shard in row order: no copy
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
    written: int = 0  # shards the worker wrote itself
    startup: dict = field(default_factory=dict)
    gpu_spans: list = field(default_factory=list)  # (first kernel, last) of each shard, ms

    def as_dict(self, name: str) -> dict:
        tally = {"worker": name, "device": self.device, "precision": self.precision,
                 "shards": len(self.shards), "pieces": self.pieces, "rows": self.rows,
                 "tokens": self.tokens, "seconds": round(self.seconds, 3),
                 "tokens_per_s": round(self.tokens / max(self.seconds, 1e-9), 1),
                 "shards_written": self.written, "startup": self.startup}
        if self.gpu_spans:
            tally.update(gpu_busy(self.gpu_spans))
        return tally


def gpu_busy(spans: list) -> dict:
    """From each shard's (first kernel, last kernel) on one GPU, in ms: the time from the
    first shard's start to the last one's end, and how much of it no shard was on the GPU."""
    spans = sorted(spans)
    idle, end = 0.0, spans[0][0]
    for a, b in spans:
        idle += max(a - end, 0.0)
        end = max(end, b)
    first_to_last = end - spans[0][0]
    return {"gpu_first_to_last_s": round(first_to_last / 1e3, 3),
            "gpu_idle_between_shards_s": round(idle / 1e3, 3)}


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
        self._wall_origin = time.time()
        self._moments: dict[str, list] = defaultdict(list)  # the pieces', since the origin

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
        # The stage's origin by the wall clock, for the workers' start-up times.
        self._wall_origin = time.time() - (time.perf_counter() - timings["origin"])
        assemblies = {s["name"]: ShardAssembly(
            s, 1 if self.gpu else math.ceil(s["rows"] / PIECE_ROWS)) for s in shards}
        marker = self._place_marker() if WRITE_ON_WORKERS else None
        try:
            t = time.perf_counter()
            dataset = self._results(shards, assemblies, marker)
            timings["ray_ship_s"] = time.perf_counter() - t
            results = iter(dataset.iter_rows())  # a generator
            try:
                n_tokens = self._collect(results, assemblies, commit, bar, timings, stop)
            finally:
                # The dataset's executor shut down now, not when garbage collected (a
                # traceback may keep it alive): its actors and the CPUs it reserved go back
                # at once.
                results.close()
        finally:
            if marker is not None:
                (self.out_dir / marker).unlink(missing_ok=True)
        # As the local engine counts them: from the first shard ready for a device to the
        # last vectors back from one (before their write); ray_done_at_s: every shard
        # committed.
        timings["ray_done_at_s"] = time.perf_counter() - timings["origin"]
        if self._moments:
            timings["first_shard_at_s"] = round(min(self._moments["ready"]), 3)
            timings["last_vectors_at_s"] = round(max(self._moments["vectors"]), 3)
        else:
            timings["last_vectors_at_s"] = timings["ray_done_at_s"]
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
        """Put a piece in its shard; hand the shard to a writer once whole (or take the
        record of a shard its worker wrote); returns its tokens (0 for a piece that was here
        already)."""
        assembly = assemblies.get(result["shard"])
        piece = int(result["piece"])
        if assembly is None or not assembly.add(piece, result):
            return 0  # a retried piece, here already
        if timings["models_ready_at_s"] is None:
            # When the first actor was ready (its clock: close enough on one cluster);
            # its first piece was ready for it then (the pieces are there from the start).
            now = time.perf_counter() - timings["origin"]
            ready = round(now - (time.time() - float(result["ready_at"])), 3)
            timings["models_ready_at_s"] = timings["first_shard_at_s"] = ready
        self._moments["ready"].append(float(result["tokens_ready_at"]) - self._wall_origin)
        self._moments["vectors"].append(float(result["vectors_at"]) - self._wall_origin)
        rows = assembly.rows if result["written"] else len(result["rows"]) // 8
        self._tally(result, rows)
        timings["gpu_s"] += float(result["seconds"])
        bar.update(rows)
        if assembly.whole:
            name = assembly.record["name"]
            if result["written"]:
                done: Future = Future()
                done.set_result({"rows": assembly.rows, "sha256": str(result["sha256"])})
                writing[name] = done
            else:
                writing[name] = writers.submit(self._write, assembly, timings)
            del assemblies[name]
        return int(result["tokens"])

    def _place_marker(self) -> str:
        """A file in INDEX/embeddings/ for this run, named and filled with a fresh random
        name: an actor that finds it there sees this folder and writes whole shards itself."""
        marker = f".ray-{uuid.uuid4().hex}"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.out_dir.glob(".ray-*"):  # a killed driver's (the folder is ours)
            stale.unlink(missing_ok=True)
        (self.out_dir / marker).write_text(marker)
        return marker

    def _results(self, shards: list[dict], assemblies: dict, marker: str | None):
        """The dataset of pieces, mapped by the actor pool (lazy: runs as it is iterated)."""
        import ray.data

        from pipeline.ray_cluster import ship_files, ship_files_later

        items = [{"shard": s["name"], "piece": k, "pieces": assemblies[s["name"]].pieces,
                  "location": f"{self.tokens_location}/{s['name']}", "sha256": s["sha256"]}
                 for s in shards for k in range(assemblies[s["name"]].pieces)]
        spec = self.encoder.spec
        random_spec = spec if spec.startswith("random:") else None
        # In a list: Ray Data would otherwise hand the actors the value, fetched on the
        # driver first; a reference inside a list travels as a reference.
        # Shipped by a task, in the background: an actor that sees the driver's folder
        # loads it from there and never waits for these (ray_cluster.ship_files_later).
        model_files = None if random_spec else [ship_files_later(
            {p.name: p for p in Path(spec).iterdir() if p.is_file()})]
        ranks = find_ranks_file()
        ranks_files = [ship_files({RANKS_FILENAME: ranks})] if ranks else None
        settings = WorkerSettings(self.encoder.sha256, random_spec, self.encoder.pooling,
                                  self.precision, self.dtype, self.batch_tokens, self.gpu,
                                  max(1, int(self.cpus_per_actor)),
                                  GPU_CALLS if self.gpu else 1,
                                  width=self.encoder.model.config.n_embd,
                                  model_path=(str(Path(spec).resolve())
                                              if MODEL_FROM_PATH and not random_spec else None),
                                  out_dir=str(self.out_dir.resolve()) if marker else None,
                                  marker=marker)
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
        tally.written += bool(result["written"])
        tally.startup = json.loads(str(result["startup"]))
        span = np.frombuffer(result["gpu_span"], np.float64)
        if len(span):
            tally.gpu_spans.append(tuple(span.tolist()))

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
        """What each worker did, busiest first; its start-up's moments (`*_at`, its wall
        clock) in seconds since the stage began (`*_at_s`, close enough on one cluster)."""
        workers = sorted((t.as_dict(name) for name, t in self.workers.items()),
                         key=lambda w: -w["rows"])
        for worker in workers:
            worker["startup"] = {
                (f"{k}_s" if k.endswith("_at") else k):
                    (round(v - self._wall_origin, 3) if k.endswith("_at") and v else v)
                for k, v in worker["startup"].items()}
        return workers
