"""`pipeline tokenize`, `embed` and `build-index`: the stages that make an index folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.app import (
    BUILD,
    DeviceOption,
    IndexOption,
    ModelOption,
    PoolingOption,
    UsageError,
    app,
    check_pooling,
    err_console,
    parse_devices,
    progress_bar,
    read_lines,
    require_text,
    user_errors,
)


@app.command(rich_help_panel=BUILD)
@user_errors
def embed(
    sentence: Annotated[str | None, typer.Option(help="Embed one sentence; print JSON.")] = None,
    file: Annotated[Path | None, typer.Option(help="Embed each line of a text file.")] = None,
    out: Annotated[Path | None, typer.Option(help="Parquet output for --file.")] = None,
    index: Annotated[Path | None, typer.Option(
        help="Index folder: embed its token shards (the pipeline's embed stage).")] = None,
    model: ModelOption = None,
    pooling: PoolingOption = None,
    device: DeviceOption = None,
    dtype: Annotated[str, typer.Option(help="Stored vector type for --index: float32 or float16.")]
    = "float32",
    batch_tokens: Annotated[int | None, typer.Option(
        help="Tokens per forward pass. Default: 65536 on a GPU, 16384 on a CPU.")] = None,
    overwrite: Annotated[bool, typer.Option(
        help="With --index: discard embeddings made with another model or dtype.")] = False,
    precision: Annotated[str, typer.Option(
        help="auto (bf16 on CUDA and on CPUs with bf16 units, else fp32), fp32, bf16, or fp8 "
        "(linear layers in FP8 on Hopper/Ada GPUs; elsewhere what auto picks, with a notice).")]
    = "auto",
    devices: Annotated[str | None, typer.Option(
        help="With --index: one worker per device, e.g. cuda:0,cuda:1, or 'all' GPUs.")]
    = None,
    ray: RayOption = None,
    ray_actors: RayActorsOption = None,
    ray_tokens: Annotated[str | None, typer.Option(
        help="With --ray: where the workers read INDEX/tokens/ (a path or URI such as "
        "s3://bucket/index/tokens). Default: the folder's own path.")] = None,
):
    """Embed a sentence (JSON, as the seed), a file of lines (Parquet), or an index's shards."""
    check_pooling(pooling)
    modes = [x is not None for x in (sentence, file, index)]
    if sum(modes) != 1:
        raise UsageError("give exactly one of --sentence, --file or --index")
    ray_options = parse_ray(ray, ray_actors, ray_tokens, index is not None)
    if index is not None:
        from pipeline.embed.stage import run_embed

        section = run_embed(index, model=model, device=device, pooling=pooling, dtype=dtype,
                            batch_tokens=batch_tokens, overwrite=overwrite,
                            precision=precision, console=err_console,
                            devices=parse_devices(devices), ray=ray_options)
        if section["stats"]["rows"] == 0:
            err_console.print(f"embeddings in {index} are current: skipped")
        else:
            print_embedded(section["stats"])
        return
    from pipeline.embed.encoder import Encoder

    if sentence is not None:
        require_text(sentence, "--sentence")
        print_sentence_json(Encoder.load(model, device, pooling, precision), sentence)
    elif out is None:
        raise UsageError("--file needs --out vectors.parquet")
    else:
        embed_lines(file, out, lambda: Encoder.load(model, device, pooling, precision),
                    batch_tokens)


RayOption = Annotated[str | None, typer.Option(
    help="Run the stage on a Ray cluster: auto, local, ray://HOST:PORT or HOST:PORT "
    "(needs the ray extra).")]
RayActorsOption = Annotated[int | None, typer.Option(
    help="With --ray: workers in the actor pool. Default: one per GPU of the cluster, else "
    "one per CPU.")]


def parse_ray(address: str | None, actors: int | None, tokens: str | None, for_index: bool):
    """--ray and its options as the stage takes them (None: this machine's engine)."""
    if address is None:
        if actors is not None or tokens is not None:
            raise UsageError("--ray-actors and --ray-tokens need --ray")
        return None
    if not for_index:
        raise UsageError("--ray is for the stage: give --index")
    if actors is not None and actors < 1:
        raise UsageError("--ray-actors must be at least 1")
    from pipeline.embed.stage import RayOptions

    return RayOptions(address, actors, tokens)


def print_embedded(stats: dict) -> None:
    err_console.print(f"embedded {stats['rows']:,} rows ({stats['tokens']:,} tokens) "
                      f"in {stats['seconds']:.1f} s: {stats['docs_per_s']:,.0f} docs/s, "
                      f"{stats['tokens_per_s']:,.0f} tokens/s", highlight=False)
    if stats.get("engine") == "ray":
        print_workers(stats)


def print_workers(stats: dict) -> None:
    """The Ray engine's summary: the cluster, when the first worker was ready, and what each
    worker did."""
    cluster, workers = stats["cluster"], stats["workers"]
    ready = stats.get("models_ready_at_s")
    err_console.print(
        f"ray: {len(workers)} worker(s) on a cluster of {cluster['nodes']} node(s), "
        f"{cluster['cpus']:g} CPUs, {cluster['gpus']:g} GPUs"
        + (f"; first worker ready after {ready:.1f} s" if ready is not None else ""),
        highlight=False)
    for w in workers:
        err_console.print(
            f"  {w['worker']} ({w['device']}, {w['precision']}): {w['rows']:,} rows in "
            f"{w['pieces']} piece(s) of {w['shards']} shard(s), {w['tokens']:,} tokens in "
            f"{w['seconds']:.1f} s ({w['tokens_per_s']:,.0f} tokens/s)", highlight=False)


def print_sentence_json(encoder, sentence: str) -> None:
    """The seed's `embed --sentence` output: one JSON object."""
    vector = encoder.embed_texts([sentence])[0]
    typer.echo(json.dumps({"sentence": sentence, "embedding": vector.tolist(),
                           "dimensions": int(vector.shape[0]), "model": encoder.spec,
                           "pooling": encoder.pooling}))


def embed_lines(file: Path, out: Path, load_encoder, batch_tokens: int | None) -> None:
    """`embed --file`: each non-empty line of `file` as a vector in the Parquet file `out`
    (the encoder is loaded only once the file is known to hold text)."""
    from tqdm import tqdm

    from pipeline.parquet import write_vectors_table

    lines = read_lines(file)
    rows = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    if not rows:
        raise UsageError(f"{file} has no non-empty lines")
    enc = load_encoder()
    with tqdm(total=len(rows), unit="text", desc="embed", file=sys.stderr, delay=1) as bar:
        vectors = enc.embed_token_lists(enc.tokenizer.encode_batch([t for _, t in rows]),
                                        batch_tokens, progress=bar)
    write_vectors_table(out, [i for i, _ in rows], [t for _, t in rows], vectors,
                        metadata=enc.identity())
    err_console.print(f"wrote {len(rows)} vectors of {enc.dim} dims to {out}"
                      + (f" (skipped {len(lines) - len(rows)} empty lines)"
                         if len(lines) > len(rows) else ""))


@app.command(rich_help_panel=BUILD)
@user_errors
def tokenize(
    corpus: Annotated[str, typer.Argument(
        help="A file (.txt/.jsonl/.csv/.tsv/.parquet, optionally .gz/.zst), a folder or a glob.")],
    index: IndexOption,
    text_field: Annotated[str, typer.Option(
        "--text-field", "--text-column", help="JSONL field / CSV, TSV or Parquet column.")]
    = "text",
    id_field: Annotated[str, typer.Option(
        "--id-field", "--id-column",
        help="Field holding document ids; where absent, ids are FILE:LINE.")] = "id",
    max_tokens: Annotated[int, typer.Option(
        help="Longer documents are split into overlapping windows of this many tokens.")] = 256,
    overlap: Annotated[int, typer.Option(help="Tokens shared by consecutive windows.")] = 32,
    shard_rows: Annotated[int, typer.Option(help="Rows per shard (bounds memory).")] = 50_000,
    force: Annotated[bool, typer.Option(help="Re-tokenize even if the tokens are current.")]
    = False,
    embed: Annotated[bool, typer.Option(
        "--embed", help="Also embed, each shard as soon as it is tokenized (stages overlap); "
        "the options below are `embed`'s.")] = False,
    model: ModelOption = None,
    pooling: PoolingOption = None,
    device: DeviceOption = None,
    dtype: Annotated[str, typer.Option(help="With --embed: float32 or float16.")] = "float32",
    batch_tokens: Annotated[int | None, typer.Option(
        help="With --embed: tokens per forward pass.")] = None,
    precision: Annotated[str, typer.Option(
        help="With --embed: auto, fp32, bf16 or fp8 (see embed).")] = "auto",
    devices: Annotated[str | None, typer.Option(
        help="With --embed: one thread per device, e.g. cuda:0,cuda:1, or 'all'.")] = None,
    ray: RayOption = None,
    ray_actors: RayActorsOption = None,
):
    """Stage 1: read a corpus and write GPT-2 token shards to INDEX/tokens/.

    With --embed, stage 2 runs at the same time, each shard embedded as soon as it is written
    (with --ray: after it, both on the cluster).
    """

    from pipeline.text.stage import TokenizeSettings, run_tokenize

    settings = TokenizeSettings(text_field, id_field, max_tokens, overlap, shard_rows)
    check_pooling(pooling)
    if not embed and any(x is not None for x in (model, pooling, device, batch_tokens, devices)):
        raise UsageError("--model, --pooling, --device, --batch-tokens and --devices need --embed")
    ray_options = parse_ray(ray, ray_actors, None, True)
    if ray_options is not None:
        with progress_bar(unit="doc", desc=f"tokenize {index.name}") as bar:
            result = run_tokenize(corpus, index, settings, progress=bar, force=force, ray=ray,
                                  ray_actors=ray_actors)
        print_tokenized(result, index)
        if embed:
            from pipeline.embed.stage import run_embed

            section = run_embed(index, model=model, device=device, pooling=pooling,
                                dtype=dtype, batch_tokens=batch_tokens, precision=precision,
                                devices=parse_devices(devices), ray=ray_options)
            print_embedded(section["stats"])
        return
    if embed:
        from pipeline.embed.overlap import run_tokenize_and_embed

        result, section = run_tokenize_and_embed(
            corpus, index, settings, model=model, device=device, pooling=pooling, dtype=dtype,
            batch_tokens=batch_tokens, precision=precision, devices=parse_devices(devices),
            force=force)
    else:
        # delay: a run that fails at once prints its one error line and no empty bar
        with progress_bar(unit="doc", desc=f"tokenize {index.name}") as bar:
            result = run_tokenize(corpus, index, settings, progress=bar, force=force)
    print_tokenized(result, index)
    if embed:
        print_embedded(section["stats"])


def print_tokenized(result: dict, index: Path) -> None:
    stats = result["stats"]
    if result.get("skipped"):
        err_console.print(f"tokens in {index} are current ({stats['rows']} rows): skipped")
        return
    err_console.print(
        f"tokenized {stats['documents']:,} documents from {stats['files']} file(s) into "
        f"{stats['rows']:,} rows ({stats['tokens']:,} tokens, {len(result['shards'])} "
        f"shards) at {stats['mb_per_s']} MB/s; skipped {stats['empty_skipped']} empty, "
        f"{stats.get('non_text_skipped', 0)} non-text, "
        f"replaced undecodable bytes in {stats['undecodable_replaced']}, split "
        f"{stats['split_documents']} long documents", highlight=False)
    if stats.get("engine") == "ray":
        cluster = stats["cluster"]
        err_console.print(f"ray: {len(stats['workers'])} worker(s) on {cluster['nodes']} "
                          f"node(s) read {stats['pieces']} piece(s)", highlight=False)
        for w in stats["workers"]:
            err_console.print(f"  {w['worker']}: {w['documents']:,} documents in "
                              f"{w['pieces']} piece(s), {w['tokens']:,} tokens in "
                              f"{w['seconds']:.1f} s", highlight=False)


@app.command("build-index", rich_help_panel=BUILD)
@user_errors
def build_index(
    index: IndexOption,
    index_key: Annotated[str | None, typer.Option(
        help="A FAISS factory string (e.g. Flat, HNSW32, IVF1024,Flat, "
             "IVF65536_HNSW32,PQ64x8), optionally with ',Rescore(int8|fp16|fp32)' "
             "(vectors on disk re-rank the candidates); binary codes: 'BFlat,Rescore(int8)'. "
             "Default: by size and --memory-budget.")] = None,
    target_recall: Annotated[float, typer.Option(
        help="Tune nprobe/efSearch until recall@10 against exact search reaches this.")] = 0.95,
    memory_budget: Annotated[str | None, typer.Option(
        help="RAM the build may use, e.g. 4GB, 512MB (the index takes at most half): picks "
             "the index key, and streams the vectors shard by shard when they don't fit. "
             "Default: half this machine's RAM.")] = None,
    ray: Annotated[str | None, typer.Option(
        help="Add the shards in Ray tasks: auto, local, ray://HOST:PORT or HOST:PORT "
             "(streams; IVF parts are merged on this machine).")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if the index is current.")] = False,
):
    """Stage 3: build a FAISS inner-product index over the embeddings, with measured recall."""
    from pipeline.index.build import run_build_index
    from pipeline.index.choice import parse_bytes

    if not 0 < target_recall <= 1:
        raise UsageError("--target-recall must be in (0, 1]")
    budget = parse_bytes(memory_budget) if memory_budget is not None else None
    run_build_index(index, index_key=index_key, target_recall=target_recall, force=force,
                    memory_budget=budget, ray=ray,
                    console=err_console)  # prints its own summary
