"""Stage 2: tokens/part-NNNNN.parquet -> embeddings/part-NNNNN.parquet.

The shard is the unit of work and of resumption: each embedding shard is written to a temp
file, renamed, and only then recorded in the manifest, so after a crash or Ctrl-C a rerun
redoes exactly the shards that are not recorded. Within a shard, rows are embedded in
length-sorted, token-budget batches and written back in row order, so the result does not
depend on how the work was split.

Embedding shard columns: row, doc_id, chunk, embedding (FixedSizeList<float32|float16>[dim],
L2-normalised).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import queue
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.children import start_python
from pipeline.embed.encoder import Encoder, compile_ahead
from pipeline.embed.layout import Planner, plan_passes
from pipeline.errors import ChildFailed, UsageError
from pipeline.hashing import file_sha256
from pipeline.parquet import (
    EMBEDDINGS_DIR,
    MANIFEST,
    TOKENS_DIR,
    IndexFolderError,
    atomic_table_writer,
    read_manifest,
    token_shards,
    vectors_to_arrow,
    write_manifest,
)

log = logging.getLogger(__name__)
DTYPES = {"float32": np.float32, "float16": np.float16}


def check_model_matches(manifest: dict, encoder: Encoder, index_dir: Path) -> None:
    """Refuse to mix vectors of two models (or poolings) in one index."""
    old = manifest.get("embed", {}).get("identity")
    if not old or not manifest["embed"].get("shards"):
        return
    new = encoder.identity()
    for key in ("model_sha256", "pooling", "attention", "dim"):
        if old.get(key) != new.get(key):
            raise IndexFolderError(
                f"{index_dir} was embedded with {old.get('model')} ({key} {old.get(key)}), not "
                f"{new.get('model')} ({new.get(key)}): use --overwrite to re-embed, or a new "
                "--index")


def shard_tokens(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """A token shard's `tokens` column as (flat ids, offsets): Arrow's own layout, no copies."""
    tokens = table["tokens"].combine_chunks()
    offsets = tokens.offsets.to_numpy().astype(np.int64)
    values = tokens.values.to_numpy()[offsets[0]:offsets[-1]]
    return values, offsets - offsets[0]


def embedding_table(table: pa.Table, vectors: np.ndarray) -> pa.Table:
    """The embedding shard of a token shard: same rows, same order."""
    return pa.table({"row": table["row"], "doc_id": table["doc_id"], "chunk": table["chunk"],
                     "embedding": vectors_to_arrow(vectors)})


# Rows per row group of an embedding shard as it is written while the GPU works: the
# vectors left to write once the GPU is done are at most about this many (and a forward
# pass's worth).
WRITE_ROWS = 8192


def write_embedding_shard(path: Path, table: pa.Table, vector_blocks) -> dict:
    """Write the embedding shard of token shard `table` from `vector_blocks`, its vectors as
    (first row, vectors) blocks in row order (`PendingVectors.parts`), each as it comes."""
    # Vectors do not compress (zstd saved ~5% at 10x the write time).
    with atomic_table_writer(path, compression="none", vector_column="embedding") as write:
        for first, vectors in vector_blocks:
            write(embedding_table(table.slice(first, len(vectors)), vectors))
    return {"rows": table.num_rows, "sha256": file_sha256(path)}


IN_FLIGHT = 3  # shards per device between "queued on the GPU" and "written": bounds memory
END = None  # the task that ends a task queue


def embed_shards(index_dir: Path, tasks: queue.Queue, encoders: list[Encoder], dtype: str,
                 batch_tokens: int, commit, bar, timings: dict, out_dir: Path | None = None,
                 stop: threading.Event | None = None) -> int:
    """Embed the shards that arrive on `tasks` until END; returns the tokens embedded.

    A task is (shard record, its token table or None to read it from INDEX/tokens/).
    `commit(name, record)` is called in this thread for each shard once its file is written
    to `out_dir` (default INDEX/embeddings/). Setting `stop` ends the work early.

    One thread per device takes the next shard and queues its batches on the GPU without
    waiting for them; reader threads fetch shards ahead and writer threads collect finished
    vectors and write them, so the GPUs never wait for the disk or for each other.
    """
    out_dir = out_dir or index_dir / EMBEDDINGS_DIR
    events: queue.SimpleQueue = queue.SimpleQueue()  # (name, record, tokens), exit or error
    exit_event = object()  # a device thread is done
    stop, lock = stop or threading.Event(), threading.Lock()
    submitted = [0]  # shards handed to the writers
    readers = ThreadPoolExecutor(len(encoders), thread_name_prefix="read")
    planners: queue.SimpleQueue = queue.SimpleQueue()  # one per reader thread
    for _ in encoders if encoders[0].packs else ():
        planners.put(Planner())
    writers = ThreadPoolExecutor(len(encoders) + 1, thread_name_prefix="write")

    def timed(key, started):
        with lock:
            timings[key] += time.perf_counter() - started

    def read(task):
        shard, table = task
        t = time.perf_counter()
        if table is None:
            table = pq.read_table(index_dir / TOKENS_DIR / shard["name"])
        values, offsets = shard_tokens(table)
        plan = None
        if encoders[0].packs:  # the packed GPU path's layouts, made ahead of the GPU
            args = (values, offsets, batch_tokens, encoders[0].window)
            planner = planners.get()
            try:  # in a planning process once one is up (layout.py says why)
                plan = planner.plan_passes(*args) if planner.started() else plan_passes(*args)
            finally:
                planners.put(planner)
        timed("read_s", t)
        return table, values, offsets, plan

    def finish(shard, table, pending, n_tokens, slots):
        waiting = [0.0]  # for this shard's vectors, within its write

        def arriving(blocks):
            blocks = iter(blocks)
            while True:
                t = time.perf_counter()
                block = next(blocks, None)
                waiting[0] += time.perf_counter() - t
                if block is None:
                    return
                with lock:
                    timings["last_vectors_at_s"] = time.perf_counter() - timings["origin"]
                yield block

        try:
            t = time.perf_counter()
            record = write_embedding_shard(out_dir / shard["name"], table,
                                           arriving(pending.parts(WRITE_ROWS)))
            with lock:
                timings["wait_s"] += waiting[0]
                timings["write_s"] += time.perf_counter() - t - waiting[0]
                timings["gpu_s"] += pending.gpu_seconds
            events.put((shard["name"], record, n_tokens))
        except BaseException as err:  # reported to the main thread, which stops the run
            events.put(err)
        finally:
            slots.release()

    def next_task():
        task = None
        while not stop.is_set():
            with contextlib.suppress(queue.Empty):
                task = tasks.get(timeout=0.1)
                break
        if task is END:
            with contextlib.suppress(queue.Full):
                tasks.put_nowait(END)  # for the other devices' threads
        return task

    def fetch_and_read():
        """The next shard for a device, read: waits for one (or for END) in a reader thread,
        so that a device never waits for the shard after its current one to arrive."""
        task = next_task()
        return END if task is END else (task, read(task))

    def device_loop(encoder):
        slots = threading.Semaphore(IN_FLIGHT)
        try:
            if encoder.device.type == "cuda":
                torch.cuda.set_device(encoder.device)  # per thread: this thread's GPU
            ahead = readers.submit(fetch_and_read)
            while True:
                t = time.perf_counter()
                fetched = ahead.result()
                timed("read_wait_s", t)
                if fetched is END:
                    break
                task, (table, values, offsets, plan) = fetched
                with lock:
                    if timings["first_shard_at_s"] is None:
                        timings["first_shard_at_s"] = time.perf_counter() - timings["origin"]
                ahead = readers.submit(fetch_and_read)  # read while this one is embedded
                t = time.perf_counter()
                slots.acquire()
                timed("slot_wait_s", t)
                t = time.perf_counter()
                pending = encoder.start_embed_flat(values, offsets, batch_tokens, bar,
                                                   DTYPES[dtype], plan)
                timed("queue_s", t)
                with lock:
                    submitted[0] += 1
                writers.submit(finish, task[0], table, pending, int(offsets[-1]), slots)
        except BaseException as err:
            events.put(err)
        events.put(exit_event)

    loops = [threading.Thread(target=device_loop, args=(e,), daemon=True) for e in encoders]
    for loop in loops:
        loop.start()
    n_tokens, exited, finished = 0, 0, 0
    try:
        # Every shard handed to a writer ends as one event: written, or an error.
        while exited < len(loops) or finished < submitted[0]:
            event = events.get()
            if event is exit_event:
                exited += 1
            elif isinstance(event, BaseException):
                raise event
            else:
                name, record, tokens = event
                commit(name, record)
                finished += 1
                n_tokens += tokens
    finally:
        stop.set()  # device threads waiting for a task see it within 0.1 s
        for loop in loops:
            loop.join()
        readers.shutdown(cancel_futures=True)
        writers.shutdown(cancel_futures=True)
        while not planners.empty():
            planners.get().close()
    return n_tokens


def load_encoders(model: str | None, device: str | None, pooling: str | None, precision: str,
                  devices: list[str] | None) -> list[Encoder]:
    """One encoder per device (`devices`, loaded side by side), or one on `device`."""
    names = devices or [device]

    def load(name):
        compiling = compile_ahead(model, name, precision)
        encoder = Encoder.load(model, name, pooling, precision)
        encoder.warm_up(compiling)
        return encoder

    with ThreadPoolExecutor(len(names)) as pool:
        return list(pool.map(load, names))


def embed_section(encoders: list[Encoder], dtype: str, batch_tokens: int) -> dict:
    """The manifest's embed section, before any shard is done: what makes the vectors."""
    first = encoders[0]
    return {"identity": first.identity(), "dtype": dtype, "batch_tokens": batch_tokens,
            "device": ",".join(str(e.device) for e in encoders),
            "precision": first.precision, "shards": {}}


def embed_stats(rows: int, n_tokens: int, elapsed: float, timings: dict) -> dict:
    return {"rows": rows, "tokens": n_tokens, "seconds": round(elapsed, 3),
            "docs_per_s": round(rows / max(elapsed, 1e-9), 1),
            "tokens_per_s": round(n_tokens / max(elapsed, 1e-9), 1),
            **{k: round(v, 3) for k, v in timings.items() if k != "origin" and v is not None}}


def new_timings() -> dict:
    """Seconds spent in each part (summed over threads), and when (since `origin`) the
    models were loaded and warm, the first token shard was written (by `tokenize --embed`),
    the first shard was ready for a GPU and the last vectors were back from one."""
    return {**dict.fromkeys(("read_s", "queue_s", "wait_s", "gpu_s", "write_s",
                             "read_wait_s", "slot_wait_s"), 0.0),
            "models_ready_at_s": None, "first_tokens_at_s": None,
            "first_shard_at_s": None, "last_vectors_at_s": None,
            "origin": time.perf_counter()}


def check_max_tokens(max_tokens: int, encoder: Encoder) -> None:
    if max_tokens > encoder.max_tokens:
        raise IndexFolderError(f"tokens are cut to {max_tokens} but {encoder.spec} reads at "
                               f"most {encoder.max_tokens}: tokenize with --max-tokens "
                               f"{encoder.max_tokens}")


def run_embed(index_dir: str | Path, model: str | None = None, device: str | None = None,
              pooling: str | None = None, dtype: str = "float32",
              batch_tokens: int | None = None,
              overwrite: bool = False, precision: str = "auto", console=None,
              devices: list[str] | None = None, encoders: list[Encoder] | None = None) -> dict:
    """Embed every token shard not yet recorded as done; returns the manifest's embed section.

    `devices` (several) runs one thread per device, each with its own copy of the model,
    taking the next unfinished shard; only the calling thread records finished shards.
    `encoders`, if given, are the loaded models to use (the caller resolved `model`).
    """
    from tqdm import tqdm

    index_dir = Path(index_dir)
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}")
    manifest = read_manifest(index_dir)
    shards = token_shards(manifest)
    if not shards:
        raise IndexFolderError(f"{index_dir} has no token shards: run `pipeline tokenize` first")
    previous = manifest.get("embed", {})
    if not overwrite:
        model = resumed_model(manifest, model)
    encoders = encoders or load_encoders(model, device, pooling, precision, devices)
    check_max_tokens(manifest["tokenize"]["settings"]["max_tokens"], encoders[0])
    if overwrite:
        previous = {}
    else:
        check_model_matches(manifest, encoders[0], index_dir)
        if previous.get("shards") and previous.get("dtype") != dtype:
            raise IndexFolderError(f"{index_dir} holds {previous.get('dtype')} vectors: "
                                   "use --overwrite to change --dtype")
    done = dict(previous.get("shards", {}))
    # A shard counts as done only if its file is there with the recorded hash.
    for name, record in list(done.items()):
        path = index_dir / EMBEDDINGS_DIR / name
        if not path.is_file() or file_sha256(path) != record["sha256"]:
            del done[name]
    batch_tokens = batch_tokens or encoders[0].default_batch_tokens
    section = {**embed_section(encoders, dtype, batch_tokens), "shards": done}
    manifest["embed"] = section
    write_manifest(index_dir, manifest)

    todo = [s for s in shards if s["name"] not in done]
    tasks: queue.Queue = queue.Queue()
    for shard in todo:
        tasks.put((shard, None))
    tasks.put(END)
    total_rows = sum(s["rows"] for s in todo)
    started, written, timings = time.perf_counter(), [0], new_timings()

    def commit(name, record):
        done[name] = record  # `done` is inside `manifest`: record only finished files
        write_manifest(index_dir, manifest)
        written[0] += record["rows"]
        rate = written[0] / max(time.perf_counter() - started, 1e-9)
        bar.set_postfix(written=f"{rate:,.0f} doc/s")

    with tqdm(total=total_rows, unit="doc", desc=f"embed {index_dir.name}", smoothing=0.1,
              delay=1, disable=total_rows == 0) as bar:
        n_tokens = embed_shards(index_dir, tasks, encoders, dtype, batch_tokens, commit, bar,
                                timings)
    section["stats"] = {**embed_stats(total_rows, n_tokens, time.perf_counter() - started,
                                      timings), "skipped_shards": len(shards) - len(todo)}
    write_manifest(index_dir, manifest)
    return section


def start_tokenize_child(corpus, index_dir: Path, settings, force: bool):
    """Start `tokenize_corpus.tokenize_child` as a fresh Python process (children.py);
    returns the connection its shards arrive on, and the process. Ctrl-C reaches only this
    process, which stops the child (and the child's workers) itself.
    """
    from dataclasses import asdict
    from multiprocessing.connection import Connection

    read_fd, write_fd = os.pipe()
    job = json.dumps({"corpus": str(corpus), "index_dir": str(index_dir),
                      "settings": asdict(settings), "force": force, "fd": write_fd,
                      "parent": os.getpid()})
    child = start_python("import sys; from pipeline.text.stage import tokenize_child; "
                         "tokenize_child(sys.argv[1])", [job], pass_fds=[write_fd])
    os.close(write_fd)
    return Connection(read_fd, writable=False), child


def stop_tokenize_child(child: subprocess.Popen, asked_to_stop: bool) -> None:
    """Wait for the child to end (SIGTERM first if it must stop early: it removes its
    tokens.tmp on the way out), then kill whatever is left of its process group: the
    workers of a child that was killed would otherwise live on, holding the pipe open."""
    if asked_to_stop and child.poll() is None:
        child.terminate()
    try:
        child.wait(timeout=60)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    if child.returncode != 0:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)


def resumed_model(manifest: dict | None, model: str | None) -> str | None:
    """Without --model, an index already embedded keeps the model it was embedded with."""
    if model is not None or not manifest:
        return model
    return (manifest.get("embed", {}).get("identity") or {}).get("model")


def run_tokenize_and_embed(corpus: str | Path, index_dir: str | Path, settings,
                           model: str | None = None, device: str | None = None,
                           pooling: str | None = None, dtype: str = "float32",
                           batch_tokens: int | None = None, precision: str = "auto",
                           devices: list[str] | None = None,
                           force: bool = False) -> tuple[dict, dict]:
    """Both stages at once: each token shard is embedded as soon as it is written, so the
    GPU starts after the first shard instead of after the whole corpus. Returns the
    manifest's tokenize and embed sections.

    The vectors go to INDEX/embeddings.tmp/ and move to INDEX/embeddings/ once the token
    shards are in place, so the folder ends exactly as after `tokenize` then `embed`. An
    interrupted run leaves nothing half-written that a rerun would trust; the rerun starts
    over (the separate stages resume shard by shard instead). Tokens that are already current
    are not redone: then this is `run_embed`, which resumes.
    """
    from tqdm import tqdm

    index_dir = Path(index_dir)
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}")
    if (index_dir / MANIFEST).is_file():
        model = resumed_model(read_manifest(index_dir), model)
    staging = index_dir / (EMBEDDINGS_DIR + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    existed = index_dir.exists()
    # Bounded: when the GPU falls behind, the tokenizer waits instead of filling the memory.
    tasks: queue.Queue = queue.Queue(maxsize=2 * len(devices or [device]) + 2)
    stop = threading.Event()
    outcome: dict = {}

    def put(item) -> bool:
        while not stop.is_set():
            try:
                tasks.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    # Tokenizing runs in a child process started first: its first shard is on the way while
    # the model loads. A thread here hands its shards over to the embedding. (The child dies
    # with the thread that starts it, so call this from a thread that outlives the run.)
    receive, child = start_tokenize_child(corpus, index_dir, settings, force)

    def hand_over():
        handing = True  # after a stop, messages are read and dropped: a child blocked on a
        try:            # full pipe could not see its SIGTERM through
            while True:
                # Poll rather than wait for EOF: a killed child's workers may hold the pipe.
                if not receive.poll(0.1):
                    if child.poll() is None:
                        continue  # still working
                    if not receive.poll(0):
                        break  # ended, and nothing left to read
                kind, *payload = receive.recv()
                if kind == "shard":
                    if timings["first_tokens_at_s"] is None:
                        timings["first_tokens_at_s"] = time.perf_counter() - timings["origin"]
                    handing = handing and put(tuple(payload))
                else:
                    outcome["tokenize" if kind == "done" else "error"] = payload[0]
                    break
        except (EOFError, OSError, pickle.UnpicklingError):
            pass  # the child died mid-message
        except Exception as err:  # a report that does not unpickle here
            outcome["error"] = ChildFailed(f"the tokenizing process failed: {err}")
            child.terminate()  # nobody reads the pipe any more
        finally:
            if not outcome and not stop.is_set():
                outcome["error"] = ChildFailed(
                    f"the tokenizing process ended unexpectedly (exit code {child.poll()})")
            if "error" in outcome:
                stop.set()
            put(END)

    records: dict = {}
    started, timings = time.perf_counter(), new_timings()
    receiver = threading.Thread(target=hand_over, daemon=True)
    receiver.start()
    failure: BaseException | None = None
    try:
        encoders = load_encoders(model, device, pooling, precision, devices)
        timings["models_ready_at_s"] = time.perf_counter() - timings["origin"]
        check_max_tokens(settings.max_tokens, encoders[0])
        batch_tokens = batch_tokens or encoders[0].default_batch_tokens
        with tqdm(unit="doc", desc=f"embed {index_dir.name}", smoothing=0.1, delay=1,
                  position=1) as bar:
            # `stop` (set by a failed tokenize) ends the embedding; embed_shards sets it when
            # it ends.
            n_tokens = embed_shards(index_dir, tasks, encoders, dtype, batch_tokens,
                                    lambda name, record: records.update({name: record}), bar,
                                    timings, out_dir=staging, stop=stop)
    except BaseException as err:
        failure = err
    stop.set()
    try:
        # A child that reported (done, or its error) ends by itself.
        stop_tokenize_child(child, asked_to_stop=failure is not None or not outcome)
        receiver.join()
        receive.close()
    finally:  # even on a second Ctrl-C while waiting for the child
        if failure is not None or "error" in outcome:
            shutil.rmtree(staging, ignore_errors=True)
            if not existed and "tokenize" not in outcome:
                shutil.rmtree(index_dir, ignore_errors=True)
    if failure is not None or "error" in outcome:
        if isinstance(failure, KeyboardInterrupt) or "error" not in outcome:
            raise failure
        # The child's error explains the embedding's (which may only have lost its folder).
        raise outcome["error"] from None
    tok = outcome["tokenize"]
    if tok.get("skipped"):  # tokens were current: nothing was handed over
        shutil.rmtree(staging, ignore_errors=True)
        return tok, run_embed(index_dir, model, device, pooling, dtype, batch_tokens,
                              precision=precision, devices=devices, encoders=encoders)
    manifest = read_manifest(index_dir)
    shutil.rmtree(index_dir / EMBEDDINGS_DIR, ignore_errors=True)
    staging.rename(index_dir / EMBEDDINGS_DIR)
    section = embed_section(encoders, dtype, batch_tokens)
    section["shards"] = {s["name"]: records[s["name"]] for s in token_shards(manifest)}
    section["stats"] = {**embed_stats(tok["stats"]["rows"], n_tokens,
                                      time.perf_counter() - started, timings),
                        "overlapped_with_tokenize": True}
    manifest["embed"] = section
    write_manifest(index_dir, manifest)
    return tok, section
