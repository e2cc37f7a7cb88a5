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


def embed_shard(encoder: Encoder, table: pa.Table, dtype: str, batch_tokens: int,
                progress=None) -> tuple[pa.Table, int]:
    """One token shard -> its embedding table (same rows, same order) and its token count."""
    tokens = table["tokens"].combine_chunks()  # Arrow list: flat values + offsets, no copies
    offsets = tokens.offsets.to_numpy().astype(np.int64)
    values = tokens.values.to_numpy()[offsets[0]:offsets[-1]]
    offsets -= offsets[0]
    vectors = encoder.embed_flat(values, offsets, batch_tokens, progress=progress)
    out = pa.table({"row": table["row"], "doc_id": table["doc_id"], "chunk": table["chunk"],
                    "embedding": vectors_to_arrow(vectors.astype(DTYPES[dtype]))})
    return out, int(offsets[-1])


def write_embedding_shard(index_dir: Path, name: str, table: pa.Table) -> dict:
    # Vectors do not compress (zstd saved ~5% at 10x the write time).
    path = atomic_write_table(table, index_dir / EMBEDDINGS_DIR / name, compression="none")
    return {"rows": table.num_rows, "sha256": file_sha256(path)}


def embed_worker(index_dir: Path, spec: str, device: str, pooling: str, precision: str,
                 dtype: str, batch_tokens: int, tasks, results) -> None:
    """One device's worker process: embed shards named on `tasks` until a None arrives."""
    try:
        encoder = Encoder.load(spec, device, pooling, precision)
        while (name := tasks.get()) is not None:
            table = pq.read_table(index_dir / TOKENS_DIR / name)
            out, n_tokens = embed_shard(encoder, table, dtype, batch_tokens)
            results.put(("done", name, write_embedding_shard(index_dir, name, out), n_tokens))
    except BaseException as err:  # reported to the parent, which stops the run
        results.put(("error", device, f"{type(err).__name__}: {err}", 0))
    results.put(("exit", device, None, 0))


def embed_with_workers(index_dir: Path, todo: list[dict], devices: list[str], encoder: Encoder,
                       dtype: str, batch_tokens: int, commit, bar) -> int:
    """Spread shards over one worker process per device; returns the tokens embedded."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")  # CUDA cannot be used in forked children
    tasks, results = ctx.Queue(), ctx.Queue()
    for shard in todo:
        tasks.put(shard["name"])
    for _ in devices:
        tasks.put(None)
    workers = [ctx.Process(target=embed_worker, daemon=True, args=(
        index_dir, encoder.spec, d, encoder.pooling, encoder.precision, dtype, batch_tokens,
        tasks, results)) for d in devices]
    for w in workers:
        w.start()
    rows = {s["name"]: s["rows"] for s in todo}
    n_tokens, running = 0, len(workers)
    try:
        while running:
            kind, name, payload, tokens = results.get()
            if kind == "error":
                raise RuntimeError(f"embedding worker on {name} failed: {payload}")
            if kind == "exit":
                running -= 1
                continue
            commit(name, payload)
            n_tokens += tokens
            bar.update(rows[name])
    finally:
        for w in workers:
            if w.is_alive() and running:
                w.terminate()
            w.join()
    return n_tokens


def run_embed(index_dir: str | Path, model: str | None = None, device: str | None = None,
              pooling: str | None = None, dtype: str = "float32",
              batch_tokens: int | None = None,
              overwrite: bool = False, precision: str = "auto", console=None,
              devices: list[str] | None = None) -> dict:
    """Embed every token shard not yet recorded as done; returns the manifest's embed section.

    `devices` (several) runs one worker process per device, each taking the next unfinished
    shard; this process alone records finished shards in the manifest.
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
    started, n_tokens = time.perf_counter(), 0
    timings = {"read_s": 0.0, "embed_s": 0.0, "write_s": 0.0}

    def read(shard):
        t = time.perf_counter()
        table = pq.read_table(index_dir / TOKENS_DIR / shard["name"])
        timings["read_s"] += time.perf_counter() - t
        return table

    def write(shard, out):
        t = time.perf_counter()
        record = write_embedding_shard(index_dir, shard["name"], out)
        timings["write_s"] += time.perf_counter() - t
        return shard["name"], record

    def commit(name, record):
        done[name] = record  # `done` is inside `manifest`: record only finished files
        write_manifest(index_dir, manifest)

    with tqdm(total=total_rows, unit="doc", desc=f"embed {index_dir.name}", smoothing=0.1,
              delay=1, disable=total_rows == 0) as bar:
        if devices and len(devices) > 1:
            n_tokens = embed_with_workers(index_dir, todo, devices, encoder, dtype,
                                          batch_tokens, commit, bar)
        else:
            # Reading shard k+1 and writing shard k-1 overlap the model's work on shard k.
            with ThreadPoolExecutor(2) as io:
                next_table = io.submit(read, todo[0]) if todo else None
                pending_write = None
                for k, shard in enumerate(todo):
                    table = next_table.result()
                    if k + 1 < len(todo):
                        next_table = io.submit(read, todo[k + 1])
                    t = time.perf_counter()
                    out, shard_tokens = embed_shard(encoder, table, dtype, batch_tokens,
                                                    progress=bar)
                    timings["embed_s"] += time.perf_counter() - t
                    n_tokens += shard_tokens
                    if pending_write is not None:
                        commit(*pending_write.result())
                    pending_write = io.submit(write, shard, out)
                    rate = n_tokens / max(time.perf_counter() - started, 1e-9)
                    bar.set_postfix(tok_s=f"{rate:,.0f}")
                if pending_write is not None:
                    commit(*pending_write.result())
    elapsed = time.perf_counter() - started
    section["stats"] = {"rows": total_rows, "tokens": n_tokens, "seconds": round(elapsed, 3),
                        "docs_per_s": round(total_rows / max(elapsed, 1e-9), 1),
                        "tokens_per_s": round(n_tokens / max(elapsed, 1e-9), 1),
                        "skipped_shards": len(shards) - len(todo),
                        **{k: round(v, 3) for k, v in timings.items()}}
    write_manifest(index_dir, manifest)
    return section
