"""Stage 2: tokens/part-NNNNN.parquet -> embeddings/part-NNNNN.parquet (shards.py).

The shard is the unit of work and of resumption: each embedding shard is written to a temp
file, renamed, and only then recorded in the manifest, so after a crash or Ctrl-C a rerun
redoes exactly the shards that are not recorded. Within a shard, rows are embedded in
length-sorted, token-budget batches and written back in row order, so the result does not
depend on how the work was split. Which threads (or machines) do the work is an engine's
business (engines/); this module decides what to embed and records what was.
"""

from __future__ import annotations

import queue
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pipeline.embed.encoder import Encoder, compile_ahead
from pipeline.embed.engines import END, show_rates
from pipeline.embed.engines.local import LocalEngine
from pipeline.embed.engines.ray import RayEngine
from pipeline.embed.shards import check_dtype
from pipeline.errors import IndexFolderError, UsageError
from pipeline.folder import IndexFolder
from pipeline.hashing import file_sha256
from pipeline.ray_cluster import connect

GPU_BATCH_TOKENS = 65536  # Encoder.default_batch_tokens on a GPU, for GPU actors


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


def resumed_model(manifest: dict | None, model: str | None) -> str | None:
    """Without --model, an index already embedded keeps the model it was embedded with."""
    if model is not None or not manifest:
        return model
    return (manifest.get("embed", {}).get("identity") or {}).get("model")


def check_resumable(folder: IndexFolder, encoder: Encoder, dtype: str) -> None:
    """Refuse to add vectors of another model, pooling or dtype to the ones already there."""
    if not folder.embed.get("shards"):
        return
    folder.check_identity(encoder.identity(), "use --overwrite to re-embed, or a new --index")
    if folder.embed.get("dtype") != dtype:
        raise IndexFolderError(f"{folder.path} holds {folder.embed.get('dtype')} vectors: "
                               "use --overwrite to change --dtype")


def intact_shards(folder: IndexFolder, recorded: dict) -> dict:
    """The recorded embedding shards whose file is there with the recorded hash."""
    return {name: record for name, record in recorded.items()
            if (path := folder.embeddings_dir / name).is_file()
            and file_sha256(path) == record["sha256"]}


def shard_queue(shards: list[dict]) -> queue.Queue:
    """A task queue (engines/__init__.py) of token shards read from INDEX/tokens/."""
    tasks: queue.Queue = queue.Queue()
    for shard in shards:
        tasks.put((shard, None))
    tasks.put(END)
    return tasks


def run_embed(index_dir: str | Path, model: str | None = None, device: str | None = None,
              pooling: str | None = None, dtype: str = "float32",
              batch_tokens: int | None = None,
              overwrite: bool = False, precision: str = "auto", console=None,
              devices: list[str] | None = None, encoders: list[Encoder] | None = None,
              ray: RayOptions | None = None) -> dict:
    """Embed every token shard not yet recorded as done; returns the manifest's embed section.

    `devices` (several) runs one thread per device, each with its own copy of the model,
    taking the next unfinished shard; only the calling thread records finished shards.
    `encoders`, if given, are the loaded models to use (the caller resolved `model`).
    `ray` runs the work on a Ray cluster instead (engines/ray.py).
    """
    check_dtype(dtype)
    folder = IndexFolder(index_dir)
    if not folder.exists():
        raise IndexFolderError(f"{folder.path} has no token shards: run `pipeline tokenize` "
                               "first")
    with folder.writing("embed"):
        return embed_folder(folder, model, device, pooling, dtype, batch_tokens, overwrite,
                            precision, devices, encoders, ray)


@dataclass(frozen=True)
class RayOptions:
    """`--ray ADDRESS` and its options: how many actors, and where workers read the tokens."""

    address: str
    actors: int | None = None
    tokens_location: str | None = None


def embed_folder(folder: IndexFolder, model, device, pooling, dtype, batch_tokens, overwrite,
                 precision, devices, encoders, ray: RayOptions | None = None) -> dict:
    """`run_embed` once the folder is held."""
    shards = folder.token_shards
    if not shards:
        raise IndexFolderError(f"{folder.path} has no token shards: run `pipeline tokenize` "
                               "first")
    if not overwrite:
        model = resumed_model(folder.manifest, model)
    if ray is not None:
        if devices:
            raise UsageError("--devices is for this machine's GPUs: with --ray, the cluster's "
                             "GPUs are used, one actor each (--ray-actors)")
        cluster = connect(ray.address)
        # The driver's copy only names the model (identity, spec) for the workers to load.
        encoders = encoders or load_encoders(model, "cpu", pooling, "fp32", None)
    encoders = encoders or load_encoders(model, device, pooling, precision, devices)
    check_max_tokens(folder.manifest["tokenize"]["settings"]["max_tokens"], encoders[0])
    if not overwrite:
        check_resumable(folder, encoders[0], dtype)
    done = {} if overwrite else intact_shards(folder, folder.embed.get("shards", {}))
    gpu = ray is not None and ray_uses_gpus(cluster, device)
    batch_tokens = batch_tokens or (GPU_BATCH_TOKENS if gpu else encoders[0].default_batch_tokens)
    section = {**embed_section(encoders, dtype, batch_tokens), "shards": done}
    if ray is not None:
        engine = RayEngine(folder.path, encoders[0], dtype, batch_tokens, cluster, gpu,
                           precision, ray.actors, ray.tokens_location)
        section.update(device=f"ray: {engine.actors} x {'cuda' if gpu else 'cpu'}",
                       precision=precision)
    else:
        engine = LocalEngine(folder.path, encoders, dtype, batch_tokens)
    folder.manifest["embed"] = section
    folder.write_manifest()

    todo = [s for s in shards if s["name"] not in done]
    total_rows = sum(s["rows"] for s in todo)
    started, timings = time.perf_counter(), new_timings()
    n_tokens = embed_with_progress(folder, engine, shard_queue(todo), total_rows, timings)
    section["stats"] = {**embed_stats(total_rows, n_tokens, time.perf_counter() - started,
                                      timings), "skipped_shards": len(shards) - len(todo)}
    if ray is not None:
        workers = engine.summary()
        section["precision"] = ",".join(sorted({w["precision"] for w in workers})) or precision
        section["stats"].update(engine="ray", cluster=cluster, workers=workers)
    folder.write_manifest()
    return section


def ray_uses_gpus(cluster: dict, device: str | None) -> bool:
    """GPU actors where the cluster has GPUs, unless --device cpu; --device cuda insists."""
    if device is not None and device != "cpu" and not device.startswith("cuda"):
        raise UsageError(f"--device {device} with --ray: give cpu or cuda")
    if device is not None and device.startswith("cuda"):
        if not cluster["gpus"]:
            raise UsageError("--device cuda with --ray: the cluster has no GPU")
        return True
    return device is None and cluster["gpus"] > 0


def embed_with_progress(folder: IndexFolder, engine: LocalEngine | RayEngine, tasks: queue.Queue,
                        total_rows: int, timings: dict) -> int:
    """Run `engine` over `tasks` under a progress bar, recording each finished shard in the
    manifest as it is written; returns the tokens embedded."""
    from tqdm import tqdm

    done = folder.embed["shards"]  # inside the manifest: record only finished files
    started, written = time.perf_counter(), [0]

    def commit(name, record):
        done[name] = record
        folder.write_manifest()
        written[0] += record["rows"]
        rate = written[0] / max(time.perf_counter() - started, 1e-9)
        show_rates(bar, written=f"{rate:,.0f} doc/s")

    with tqdm(total=total_rows, unit="doc", desc=f"embed {folder.path.name}", smoothing=0.1,
              delay=1, disable=total_rows == 0) as bar:
        try:
            return engine.run(tasks, commit, bar, timings)
        except BaseException:
            bar.leave = False  # erased: the error is the one line left
            raise
