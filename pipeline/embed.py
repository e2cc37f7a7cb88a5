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

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .encoder import Encoder
from .shards import (
    EMBEDDINGS_DIR,
    TOKENS_DIR,
    IndexFolderError,
    atomic_write_table,
    file_sha256,
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


def write_embedding_shard(index_dir: Path, name: str, table: pa.Table) -> dict:
    # Vectors do not compress (zstd saved ~5% at 10x the write time).
    path = atomic_write_table(table, index_dir / EMBEDDINGS_DIR / name, compression="none",
                              vector_column="embedding")
    return {"rows": table.num_rows, "sha256": file_sha256(path)}


IN_FLIGHT = 3  # shards per device between "queued on the GPU" and "written": bounds memory


def embed_shards(index_dir: Path, todo: list[dict], encoders: list[Encoder], dtype: str,
                 batch_tokens: int, commit, bar, timings: dict) -> int:
    """Embed the `todo` shards; returns the tokens embedded. `commit(name, record)` is called
    in this thread for each shard once its file is written.

    One thread per device takes the next shard and queues its batches on the GPU without
    waiting for them; reader threads fetch shards ahead and writer threads collect finished
    vectors and write them, so the GPUs never wait for the disk or for each other.
    """
    tasks: queue.SimpleQueue = queue.SimpleQueue()
    for shard in todo:
        tasks.put(shard)
    events: queue.SimpleQueue = queue.SimpleQueue()  # (name, record, tokens) or an error
    stop, lock = threading.Event(), threading.Lock()
    readers = ThreadPoolExecutor(len(encoders), thread_name_prefix="read")
    writers = ThreadPoolExecutor(len(encoders) + 1, thread_name_prefix="write")

    def timed(key, started):
        with lock:
            timings[key] += time.perf_counter() - started

    def read(shard):
        t = time.perf_counter()
        table = pq.read_table(index_dir / TOKENS_DIR / shard["name"])
        values, offsets = shard_tokens(table)
        timed("read_s", t)
        return table, values, offsets

    def finish(shard, table, pending, n_tokens, slots):
        try:
            t = time.perf_counter()
            vectors = pending.result()
            timed("wait_s", t)
            t = time.perf_counter()
            record = write_embedding_shard(index_dir, shard["name"],
                                           embedding_table(table, vectors))
            timed("write_s", t)
            with lock:
                timings["gpu_s"] += pending.gpu_seconds
            events.put((shard["name"], record, n_tokens))
        except BaseException as err:  # reported to the main thread, which stops the run
            events.put(err)
        finally:
            slots.release()

    def next_task():
        try:
            return None if stop.is_set() else tasks.get_nowait()
        except queue.Empty:
            return None

    def device_loop(encoder):
        slots = threading.Semaphore(IN_FLIGHT)
        try:
            shard = next_task()
            ahead = readers.submit(read, shard) if shard else None
            while shard is not None:
                table, values, offsets = ahead.result()
                following = next_task()
                ahead = readers.submit(read, following) if following else None
                slots.acquire()
                t = time.perf_counter()
                pending = encoder.start_embed_flat(values, offsets, batch_tokens, bar,
                                                   DTYPES[dtype])
                timed("queue_s", t)
                writers.submit(finish, shard, table, pending, int(offsets[-1]), slots)
                shard = following
        except BaseException as err:
            events.put(err)

    loops = [threading.Thread(target=device_loop, args=(e,), daemon=True) for e in encoders]
    for loop in loops:
        loop.start()
    n_tokens = 0
    try:
        for _ in todo:  # every shard ends as one event: written, or an error that stops all
            event = events.get()
            if isinstance(event, BaseException):
                raise event
            name, record, tokens = event
            commit(name, record)
            n_tokens += tokens
    finally:
        stop.set()
        for loop in loops:
            loop.join()
        readers.shutdown(cancel_futures=True)
        writers.shutdown(cancel_futures=True)
    return n_tokens


def run_embed(index_dir: str | Path, model: str | None = None, device: str | None = None,
              pooling: str | None = None, dtype: str = "float32",
              batch_tokens: int | None = None,
              overwrite: bool = False, precision: str = "auto", console=None,
              devices: list[str] | None = None) -> dict:
    """Embed every token shard not yet recorded as done; returns the manifest's embed section.

    `devices` (several) runs one thread per device, each with its own copy of the model,
    taking the next unfinished shard; only the calling thread records finished shards.
    """
    from tqdm import tqdm

    index_dir = Path(index_dir)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}")
    manifest = read_manifest(index_dir)
    shards = token_shards(manifest)
    if not shards:
        raise IndexFolderError(f"{index_dir} has no token shards: run `pipeline tokenize` first")
    previous = manifest.get("embed", {})
    if model is None and previous.get("identity") and not overwrite:
        model = previous["identity"]["model"]  # resume with the model the index started with
    if devices and len(devices) > 1:
        device = devices[0]
    encoder = Encoder.load(model, device, pooling, precision)
    max_tokens = manifest["tokenize"]["settings"]["max_tokens"]
    if max_tokens > encoder.max_tokens:
        raise IndexFolderError(f"tokens were cut to {max_tokens} but {encoder.spec} reads at "
                               f"most {encoder.max_tokens}: re-tokenize with --max-tokens "
                               f"{encoder.max_tokens}")
    if overwrite:
        previous = {}
    else:
        check_model_matches(manifest, encoder, index_dir)
        if previous.get("shards") and previous.get("dtype") != dtype:
            raise IndexFolderError(f"{index_dir} holds {previous.get('dtype')} vectors: "
                                   "use --overwrite to change --dtype")
    done = dict(previous.get("shards", {}))
    # A shard counts as done only if its file is there with the recorded hash.
    for name, record in list(done.items()):
        path = index_dir / EMBEDDINGS_DIR / name
        if not path.is_file() or file_sha256(path) != record["sha256"]:
            del done[name]
    batch_tokens = batch_tokens or encoder.default_batch_tokens
    section = {"identity": encoder.identity(), "dtype": dtype, "batch_tokens": batch_tokens,
               "device": ",".join(devices) if devices and len(devices) > 1 else
               str(encoder.device), "precision": encoder.precision, "shards": done}
    manifest["embed"] = section
    write_manifest(index_dir, manifest)

    todo = [s for s in shards if s["name"] not in done]
    total_rows = sum(s["rows"] for s in todo)
    encoders = [encoder] + [Encoder.load(model, d, pooling, precision)
                            for d in (devices or [])[1:]]
    started, written = time.perf_counter(), [0]
    timings = dict.fromkeys(("read_s", "queue_s", "wait_s", "gpu_s", "write_s"), 0.0)

    def commit(name, record):
        done[name] = record  # `done` is inside `manifest`: record only finished files
        write_manifest(index_dir, manifest)
        written[0] += record["rows"]
        rate = written[0] / max(time.perf_counter() - started, 1e-9)
        bar.set_postfix(written=f"{rate:,.0f} doc/s")

    with tqdm(total=total_rows, unit="doc", desc=f"embed {index_dir.name}", smoothing=0.1,
              delay=1, disable=total_rows == 0) as bar:
        n_tokens = embed_shards(index_dir, todo, encoders, dtype, batch_tokens, commit, bar,
                                timings)
    elapsed = time.perf_counter() - started
    section["stats"] = {"rows": total_rows, "tokens": n_tokens, "seconds": round(elapsed, 3),
                        "docs_per_s": round(total_rows / max(elapsed, 1e-9), 1),
                        "tokens_per_s": round(n_tokens / max(elapsed, 1e-9), 1),
                        "skipped_shards": len(shards) - len(todo),
                        **{k: round(v, 3) for k, v in timings.items()}}
    write_manifest(index_dir, manifest)
    return section
