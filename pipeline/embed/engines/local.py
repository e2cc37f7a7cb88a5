"""The embed stage on this process's devices: one thread per device, reader and writer threads
around them, and a layout-planning child process per device for the GPU's packed path.

One thread per device takes the next shard and queues its batches on the GPU without waiting
for them; reader threads fetch shards ahead and writer threads collect finished vectors and
write them, so the GPUs never wait for the disk or for each other.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import torch

from pipeline.embed.encoder import Encoder
from pipeline.embed.engines import END
from pipeline.embed.layout import Planner, plan_passes
from pipeline.embed.shards import DTYPES, shard_tokens, write_embedding_shard
from pipeline.folder import EMBEDDINGS_DIR, TOKENS_DIR, check_shard

# Rows per row group of an embedding shard as it is written while the GPU works: the
# vectors left to write once the GPU is done are at most about this many (and a forward
# pass's worth).
WRITE_ROWS = 8192
IN_FLIGHT = 3  # shards per device between "queued on the GPU" and "written": bounds memory
_DEVICE_DONE = object()  # the event of a device thread that has ended


class LocalEngine:
    """Embeds the shards of INDEX with `encoders`, one thread each, into `out_dir` (default
    INDEX/embeddings/); `run` as engines/__init__.py describes. One run at a time."""

    def __init__(self, index_dir: Path, encoders: list[Encoder], dtype: str, batch_tokens: int,
                 out_dir: Path | None = None):
        self.index_dir, self.encoders = index_dir, encoders
        self.dtype, self.batch_tokens = dtype, batch_tokens
        self.out_dir = out_dir or index_dir / EMBEDDINGS_DIR
        self.packs = encoders[0].packs

    def run(self, tasks: queue.Queue, commit, bar, timings: dict,
            stop: threading.Event | None = None) -> int:
        """Embed the shards that arrive on `tasks` until END; returns the tokens embedded."""
        self._tasks, self._bar, self._timings = tasks, bar, timings
        self._stop, self._lock = stop or threading.Event(), threading.Lock()
        self._events: queue.SimpleQueue = queue.SimpleQueue()  # written, _DEVICE_DONE, error
        self._submitted = 0  # shards handed to the writers
        self._readers = ThreadPoolExecutor(len(self.encoders), thread_name_prefix="read")
        self._planners: queue.SimpleQueue = queue.SimpleQueue()  # one per reader thread
        for _ in self.encoders if self.packs else ():
            self._planners.put(Planner())
        self._writers = ThreadPoolExecutor(len(self.encoders) + 1, thread_name_prefix="write")
        loops = [threading.Thread(target=self._device_loop, args=(e,), daemon=True)
                 for e in self.encoders]
        for loop in loops:
            loop.start()
        try:
            return self._commit_written(len(loops), commit)
        finally:
            self._shut_down(loops)

    def _commit_written(self, n_loops: int, commit) -> int:
        """Commit each shard as its writer reports it, until every device thread has ended
        and every shard it handed over is written; the first error is raised here."""
        n_tokens, exited, finished = 0, 0, 0
        # Every shard handed to a writer ends as one event: written, or an error.
        while exited < n_loops or finished < self._submitted:
            event = self._events.get()
            if event is _DEVICE_DONE:
                exited += 1
            elif isinstance(event, BaseException):
                raise event
            else:
                name, record, tokens = event
                commit(name, record)
                finished += 1
                n_tokens += tokens
        return n_tokens

    def _shut_down(self, loops: list[threading.Thread]) -> None:
        self._stop.set()  # device threads waiting for a task see it within 0.1 s
        for loop in loops:
            loop.join()
        self._readers.shutdown(cancel_futures=True)
        self._writers.shutdown(cancel_futures=True)
        while not self._planners.empty():
            self._planners.get().close()

    def _timed(self, key: str, started: float) -> None:
        with self._lock:
            self._timings[key] += time.perf_counter() - started

    def _device_loop(self, encoder: Encoder) -> None:
        """Queue one shard after another on `encoder`'s device, each handed to a writer."""
        slots = threading.Semaphore(IN_FLIGHT)
        try:
            if encoder.device.type == "cuda":
                torch.cuda.set_device(encoder.device)  # per thread: this thread's GPU
            ahead = self._readers.submit(self._fetch_and_read)
            while True:
                t = time.perf_counter()
                fetched = ahead.result()
                self._timed("read_wait_s", t)
                if fetched is END:
                    break
                task, (table, values, offsets, plan) = fetched
                with self._lock:
                    if self._timings["first_shard_at_s"] is None:
                        self._timings["first_shard_at_s"] = (time.perf_counter()
                                                             - self._timings["origin"])
                ahead = self._readers.submit(self._fetch_and_read)  # read while this one runs
                t = time.perf_counter()
                slots.acquire()
                self._timed("slot_wait_s", t)
                t = time.perf_counter()
                pending = encoder.start_embed_flat(values, offsets, self.batch_tokens, self._bar,
                                                   DTYPES[self.dtype], plan)
                self._timed("queue_s", t)
                with self._lock:
                    self._submitted += 1
                self._writers.submit(self._finish, task[0], table, pending, int(offsets[-1]),
                                     slots)
        except BaseException as err:
            self._events.put(err)
        self._events.put(_DEVICE_DONE)

    def _next_task(self):
        task = None
        while not self._stop.is_set():
            with contextlib.suppress(queue.Empty):
                task = self._tasks.get(timeout=0.1)
                break
        if task is END:
            with contextlib.suppress(queue.Full):
                self._tasks.put_nowait(END)  # for the other devices' threads
        return task

    def _fetch_and_read(self):
        """The next shard for a device, read: waits for one (or for END) in a reader thread,
        so that a device never waits for the shard after its current one to arrive."""
        task = self._next_task()
        return END if task is END else (task, self._read(task))

    def _read(self, task):
        shard, table = task
        t = time.perf_counter()
        if table is None:  # from disk; a table handed over by `tokenize --embed` is fresh
            path = self.index_dir / TOKENS_DIR / shard["name"]
            check_shard(path, shard, f"run `pipeline tokenize CORPUS --index {self.index_dir} "
                                     "--force`")
            table = pq.read_table(path)
        values, offsets = shard_tokens(table)
        plan = self._plan(values, offsets) if self.packs else None
        self._timed("read_s", t)
        return table, values, offsets, plan

    def _plan(self, values, offsets):
        """The packed GPU path's layouts, made ahead of the GPU."""
        args = (values, offsets, self.batch_tokens, self.encoders[0].window)
        planner = self._planners.get()
        try:  # in a planning process once one is up (layout.py says why)
            return planner.plan_passes(*args) if planner.started() else plan_passes(*args)
        finally:
            self._planners.put(planner)

    def _finish(self, shard, table, pending, n_tokens, slots) -> None:
        """Write a shard's vectors as they come back (in a writer thread), and report it."""
        waiting = [0.0]  # for this shard's vectors, within its write
        try:
            t = time.perf_counter()
            record = write_embedding_shard(self.out_dir / shard["name"], table,
                                           self._arriving(pending.parts(WRITE_ROWS), waiting))
            with self._lock:
                self._timings["wait_s"] += waiting[0]
                self._timings["write_s"] += time.perf_counter() - t - waiting[0]
                self._timings["gpu_s"] += pending.gpu_seconds
            self._events.put((shard["name"], record, n_tokens))
        except BaseException as err:  # reported to the main thread, which stops the run
            self._events.put(err)
        finally:
            slots.release()

    def _arriving(self, blocks, waiting: list[float]):
        """`blocks` as they come, the time spent waiting for them added to waiting[0]."""
        blocks = iter(blocks)
        while True:
            t = time.perf_counter()
            block = next(blocks, None)
            waiting[0] += time.perf_counter() - t
            if block is None:
                return
            with self._lock:
                self._timings["last_vectors_at_s"] = time.perf_counter() - self._timings["origin"]
            yield block
