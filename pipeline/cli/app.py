"""The `pipeline` command line: thin Typer commands that validate options and call the stages.

Errors a user can cause (bad input, unknown model, missing files) become one line on stderr and
exit code 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from pipeline.analysis import metrics as query
from pipeline.model.numpy_forward import POOLINGS
from pipeline.text.tokenizer import TokenizerError

# torch (via .encoder and .model) is imported by the commands that run the model, not here:
# `pipeline search` embeds its query without it (query_encoder), and importing torch is ~1 s.

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Batch semantic search with a GPT-2 encoder: tokenize -> embed -> index -> search.",
)
console = Console()
err_console = Console(stderr=True)


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 1."""


# ValueError includes encoder.ModelSpecError (an unknown --model) and shards.IndexFolderError.
USER_ERRORS = (UsageError, TokenizerError, FileNotFoundError, IsADirectoryError,
               PermissionError, UnicodeDecodeError, ValueError, ChildProcessError)


def user_errors(fn):
    """Turn the errors a user can cause into `error: ...` and exit code 1, without traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            err_console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=1) from None
        except KeyboardInterrupt:
            # Finished shards are recorded; the rerun resumes after them.
            err_console.print("interrupted: run the command again; it redoes only what was "
                              "not recorded as finished")
            raise typer.Exit(code=130) from None

    return wrapper


ModelOption = Annotated[str | None, typer.Option(
    "--model", "-m", help="Checkpoint folder (ours or Hugging Face GPT-2) or random:PRESET[:SEED]."
    " Default: the trained model shipped with the package.")]
DeviceOption = Annotated[str | None, typer.Option(
    help="torch device (cpu, cuda, cuda:1). Default: cuda when present, else cpu.")]
PoolingOption = Annotated[str | None, typer.Option(
    help=f"Pooling over tokens: {', '.join(POOLINGS)}. Default: the model's own.")]


def require_text(text: str, what: str) -> str:
    if not text or not text.strip():
        raise UsageError(f"{what} is empty")
    return text


def check_pooling(pooling: str | None) -> None:
    if pooling is not None and pooling not in POOLINGS:
        raise UsageError(f"unknown pooling {pooling!r}; choose from {', '.join(POOLINGS)}")


def parse_devices(devices: str | None) -> list[str] | None:
    if devices is None:
        return None
    if devices == "all":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--devices all: no CUDA device here")
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    names = [d.strip() for d in devices.split(",") if d.strip()]
    if not names:
        raise UsageError("--devices is empty")
    return names


def read_lines(path: Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file (one text per line)."""
    if not path.is_file():
        raise UsageError(f"cannot read {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text") from None
    return lines


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log details.")] = False):
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


@app.command()
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
        help="auto (bf16 on CUDA and on CPUs with bf16 units, else fp32), fp32 or bf16.")]
    = "auto",
    devices: Annotated[str | None, typer.Option(
        help="With --index: one worker per device, e.g. cuda:0,cuda:1, or 'all' GPUs.")]
    = None,
):
    """Embed a sentence (JSON, as the seed), a file of lines (Parquet), or an index's shards."""
    check_pooling(pooling)
    modes = [x is not None for x in (sentence, file, index)]
    if sum(modes) != 1:
        raise UsageError("give exactly one of --sentence, --file or --index")
    if index is not None:
        from pipeline.embed.stage import run_embed

        section = run_embed(index, model=model, device=device, pooling=pooling, dtype=dtype,
                            batch_tokens=batch_tokens, overwrite=overwrite,
                            precision=precision, console=err_console,
                            devices=parse_devices(devices))
        stats = section["stats"]
        if stats["rows"] == 0:
            err_console.print(f"embeddings in {index} are current: skipped")
        else:
            err_console.print(f"embedded {stats['rows']:,} rows ({stats['tokens']:,} tokens) "
                              f"in {stats['seconds']:.1f} s: {stats['docs_per_s']:,.0f} docs/s, "
                              f"{stats['tokens_per_s']:,.0f} tokens/s", highlight=False)
        return
    from pipeline.embed.encoder import Encoder

    if sentence is not None:
        require_text(sentence, "--sentence")
        enc = Encoder.load(model, device, pooling, precision)
        vector = enc.embed_texts([sentence])[0]
        typer.echo(json.dumps({"sentence": sentence, "embedding": vector.tolist(),
                               "dimensions": int(vector.shape[0]), "model": enc.spec,
                               "pooling": enc.pooling}))
        return
    if out is None:
        raise UsageError("--file needs --out vectors.parquet")
    lines = read_lines(file)
    rows = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    if not rows:
        raise UsageError(f"{file} has no non-empty lines")
    enc = Encoder.load(model, device, pooling, precision)
    from tqdm import tqdm

    from pipeline.parquet import write_vectors_table

    with tqdm(total=len(rows), unit="text", desc="embed", file=sys.stderr, delay=1) as bar:
        vectors = enc.embed_token_lists(enc.tokenizer.encode_batch([t for _, t in rows]),
                                        batch_tokens, progress=bar)
    write_vectors_table(out, [i for i, _ in rows], [t for _, t in rows], vectors,
                        metadata=enc.identity())
    err_console.print(f"wrote {len(rows)} vectors of {enc.dim} dims to {out}"
                      + (f" (skipped {len(lines) - len(rows)} empty lines)"
                         if len(lines) > len(rows) else ""))


@app.command()
@user_errors
def similarity(
    sentence1: Annotated[str, typer.Option(help="First sentence.")],
    sentence2: Annotated[str, typer.Option(help="Second sentence.")],
    all_metrics: Annotated[bool, typer.Option(
        "--all-metrics", help="Cosine, Euclidean, Manhattan, dot product and Pearson.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    model: ModelOption = None,
    pooling: PoolingOption = None,
    device: DeviceOption = None,
):
    """Compare two sentences (cosine similarity; --all-metrics for every metric)."""
    check_pooling(pooling)
    require_text(sentence1, "--sentence1")
    require_text(sentence2, "--sentence2")
    from pipeline.embed.encoder import Encoder

    enc = Encoder.load(model, device, pooling)
    a, b = enc.embed_texts([sentence1, sentence2])
    metrics = query.all_metrics(a, b) if all_metrics else {"cosine": query.cosine(a, b)}
    if as_json:
        typer.echo(json.dumps({"sentence1": sentence1, "sentence2": sentence2, **metrics,
                               "model": enc.spec, "pooling": enc.pooling}))
        return
    typer.echo(f'Sentences:\n  1: "{sentence1}"\n  2: "{sentence2}"')
    if not all_metrics:
        typer.echo(f"Cosine Similarity: {metrics['cosine']:.4f} {query.METRIC_HINTS['cosine']}")
        return
    typer.echo("Results:")
    for name, value in metrics.items():
        label = query.METRIC_LABELS[name] + ":"
        typer.echo(f"  {label:<21} {value:.4f} {query.METRIC_HINTS[name]}")


IndexOption = Annotated[Path, typer.Option(
    "--index", "-i", help="Index folder, e.g. indexes/default.")]


@app.command()
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
    precision: Annotated[str, typer.Option(help="With --embed: auto, fp32 or bf16.")] = "auto",
    devices: Annotated[str | None, typer.Option(
        help="With --embed: one thread per device, e.g. cuda:0,cuda:1, or 'all'.")] = None,
):
    """Stage 1: read a corpus and write GPT-2 token shards to INDEX/tokens/ (--embed: and
    stage 2 at the same time)."""
    from tqdm import tqdm

    from pipeline.text.stage import TokenizeSettings, run_tokenize

    settings = TokenizeSettings(text_field, id_field, max_tokens, overlap, shard_rows)
    check_pooling(pooling)
    if not embed and any(x is not None for x in (model, pooling, device, batch_tokens, devices)):
        raise UsageError("--model, --pooling, --device, --batch-tokens and --devices need --embed")
    if embed:
        from pipeline.embed.stage import run_tokenize_and_embed

        result, section = run_tokenize_and_embed(
            corpus, index, settings, model=model, device=device, pooling=pooling, dtype=dtype,
            batch_tokens=batch_tokens, precision=precision, devices=parse_devices(devices),
            force=force)
    else:
        # delay: a run that fails at once prints its one error line and no empty bar
        with tqdm(unit="doc", desc=f"tokenize {index.name}", file=sys.stderr, delay=1) as bar:
            result = run_tokenize(corpus, index, settings, progress=bar, force=force)
    stats = result["stats"]
    if result.get("skipped"):
        err_console.print(f"tokens in {index} are current ({stats['rows']} rows): skipped")
    else:
        err_console.print(
            f"tokenized {stats['documents']:,} documents from {stats['files']} file(s) into "
            f"{stats['rows']:,} rows ({stats['tokens']:,} tokens, {len(result['shards'])} "
            f"shards) at {stats['mb_per_s']} MB/s; skipped {stats['empty_skipped']} empty, "
            f"replaced undecodable bytes in {stats['undecodable_replaced']}, split "
            f"{stats['split_documents']} long documents", highlight=False)
    if embed:
        e = section["stats"]
        err_console.print(f"embedded {e['rows']:,} rows ({e['tokens']:,} tokens) in "
                          f"{e['seconds']:.1f} s: {e['tokens_per_s']:,.0f} tokens/s",
                          highlight=False)


@app.command("build-index")
@user_errors
def build_index(
    index: IndexOption,
    index_key: Annotated[str | None, typer.Option(
        help="A FAISS factory string (e.g. Flat, HNSW32, IVF1024,Flat). Default: by size.")]
    = None,
    target_recall: Annotated[float, typer.Option(
        help="Tune nprobe/efSearch until recall@10 against exact search reaches this.")] = 0.95,
    force: Annotated[bool, typer.Option(help="Rebuild even if the index is current.")] = False,
):
    """Stage 3: build a FAISS inner-product index over the embeddings, with measured recall."""
    from pipeline.index.build import run_build_index

    if not 0 < target_recall <= 1:
        raise UsageError("--target-recall must be in (0, 1]")
    run_build_index(index, index_key=index_key, target_recall=target_recall, force=force,
                    console=err_console)  # prints its own summary


@app.command()
@user_errors
def search(
    query_text: Annotated[str | None, typer.Argument(metavar="QUERY", help="Text to look for.")]
    = None,
    index: IndexOption = Path("indexes/default"),
    k: Annotated[int, typer.Option("-k", help="Number of documents.")] = 10,
    queries: Annotated[Path | None, typer.Option(help="File of queries, one per line.")] = None,
    out: Annotated[Path | None, typer.Option(help="Parquet output for --queries.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    model: ModelOption = None,
    device: Annotated[str | None, typer.Option(
        help="Where queries are embedded. Default: the CPU, in numpy (no torch import); cuda "
        "or cuda:N: torch on that GPU.")] = None,
):
    """Stage 4: nearest documents to a query (or to each line of --queries)."""
    from pipeline.search import search as run_search

    if (query_text is None) == (queries is None):
        raise UsageError("give a QUERY or --queries FILE")
    texts = [query_text] if query_text is not None else [
        line for line in read_lines(queries) if line.strip()]
    for text in texts:
        require_text(text, "the query")
    if not texts:
        raise UsageError(f"{queries} has no queries")
    if queries is not None and out is None and not as_json:
        raise UsageError("--queries needs --out results.parquet or --json")
    results = run_search(index, texts, k, model, device)
    if out is not None:
        import pyarrow as pa

        from pipeline.parquet import atomic_write_table

        records = [{"query_id": q + 1, "query": texts[q], "rank": h.rank, "score": h.score,
                    "doc_id": h.doc_id, "chunk": h.chunk, "row": h.row, "text": h.text}
                   for q, hits in enumerate(results) for h in hits]
        atomic_write_table(pa.Table.from_pylist(records), out)
        err_console.print(f"wrote {len(records)} hits for {len(texts)} queries to {out}")
        return
    if as_json:
        payload = [{"query": t, "hits": [h.__dict__ for h in hits]}
                   for t, hits in zip(texts, results, strict=True)]
        typer.echo(json.dumps(payload[0] if query_text is not None else payload))
        return
    from rich.table import Table

    table = Table(title=f"{query_text!r} in {index}", title_justify="left")
    for column, justify in (("rank", "right"), ("score", "right"), ("id", "left"),
                            ("text", "left")):
        table.add_column(column, justify=justify, overflow="fold" if column == "id" else None)
    for h in results[0]:
        snippet = " ".join(h.text.split())
        snippet = snippet[:160] + ("…" if len(snippet) > 160 else "")
        table.add_row(str(h.rank), f"{h.score:.3f}", h.doc_id, snippet)
    console.print(table)


@app.command("similarity-matrix")
@user_errors
def similarity_matrix(
    file: Annotated[Path | None, typer.Argument(help="Sentences, one per line.")] = None,
    index: Annotated[Path | None, typer.Option(
        "--index", "-i", help="Sample the sentences from this index instead.")] = None,
    sample: Annotated[int, typer.Option(help="Rows to sample with --index.")] = 12,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    metric: Annotated[str, typer.Option(help=f"One of {', '.join(query.METRICS)}.")]
    = "cosine",
    out: Annotated[Path | None, typer.Option(help="Write the matrix as .csv or .parquet.")]
    = None,
    report: Annotated[Path | None, typer.Option(
        help="Also write an HTML heatmap (rows reordered by hierarchical clustering).")] = None,
    model: ModelOption = None,
    device: DeviceOption = None,
):
    """All-pairs similarity of sentences, printed colour-scaled and optionally saved."""
    import numpy as np

    if metric not in query.METRICS:
        raise UsageError(f"unknown metric {metric!r}; choose from {', '.join(query.METRICS)}")
    if (file is None) == (index is None):
        raise UsageError("give a FILE of sentences or --index")
    if out is not None and out.suffix not in (".csv", ".parquet"):
        raise UsageError("--out must end in .csv or .parquet")
    if file is not None:
        sentences = [line for line in read_lines(file) if line.strip()]
        if len(sentences) < 2:
            raise UsageError(f"{file} needs at least two non-empty lines")
        from pipeline.embed.encoder import Encoder

        vectors = Encoder.load(model, device).embed_texts(sentences)
    else:
        from pipeline.parquet import load_vectors, read_rows

        all_vectors = load_vectors(index)
        if sample < 2:
            raise UsageError("--sample must be at least 2")
        rng = np.random.default_rng(seed)
        rows = sorted(rng.choice(len(all_vectors), min(sample, len(all_vectors)),
                                 replace=False).tolist())
        sentences = [r["text"] for r in read_rows(index, rows, ("text",))]
        vectors = all_vectors[rows]
    matrix = query.similarity_matrix(vectors, metric)
    print_matrix(sentences, matrix, metric)
    if report is not None:
        from pipeline.analysis.report import run_similarity_report

        run_similarity_report(sentences, matrix, report, f"{metric} similarity",
                              higher_is_similar=metric not in ("euclidean", "manhattan"))
        err_console.print(f"wrote heatmap to {report}")
    if out is not None:
        write_matrix(out, sentences, matrix)
        err_console.print(f"wrote {len(sentences)}x{len(sentences)} {metric} matrix to {out}")


@app.command()
@user_errors
def cluster(
    index: IndexOption,
    k: Annotated[str, typer.Option(
        "-k", help="Number of clusters, or 'auto': best mean silhouette over 2..100 on a sample.")]
    = "50",
    report: Annotated[Path | None, typer.Option(
        help="Folder for report.html, report.md, PNGs and the cluster files. Without it: "
        "INDEX/clusters/, no report.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the sample and k-means.")] = 0,
    near_duplicate_threshold: Annotated[float, typer.Option(
        help="Cosine at or above which two rows are near-duplicates (report only); 0 skips.")]
    = 0.95,
    sample: Annotated[int, typer.Option(help="Vectors k-means trains on (random sample).")]
    = 100_000,
    projection: Annotated[str, typer.Option(
        help="2-D map: pca, or umap (pip install 'pipeline[umap]').")] = "pca",
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
):
    """Cluster an index's documents (spherical k-means) and write a report."""
    from pipeline.analysis.cluster import run_cluster

    summary = run_cluster(index, k, report, seed, near_duplicate_threshold, sample,
                          console=err_console, projection=projection)
    if as_json:
        typer.echo(json.dumps(summary))


def print_matrix(sentences: list[str], matrix, metric: str) -> None:
    from rich.table import Table

    lo, hi = float(matrix.min()), float(matrix.max())
    higher_is_closer = metric not in ("euclidean", "manhattan")
    table = Table(title=f"{metric} similarity", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("sentence", max_width=40, no_wrap=True)
    for j in range(len(sentences)):
        table.add_column(str(j + 1), justify="right")
    for i, sentence in enumerate(sentences):
        cells = []
        for value in matrix[i]:
            t = (value - lo) / (hi - lo) if hi > lo else 1.0
            t = t if higher_is_closer else 1 - t
            green, red = int(55 + 200 * t), int(55 + 200 * (1 - t))
            cells.append(f"[rgb({red},{green},80)]{value:.3f}[/]")
        table.add_row(str(i + 1), sentence, *cells)
    console.print(table)


def write_matrix(out: Path, sentences: list[str], matrix) -> None:
    import pyarrow as pa

    from pipeline.parquet import atomic_write_table

    columns = {"sentence": sentences}
    columns.update({f"s{j + 1}": matrix[:, j].tolist() for j in range(len(sentences))})
    if out.suffix == ".parquet":
        atomic_write_table(pa.table(columns), out)
        return
    import csv

    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["sentence", *[f"s{j + 1}" for j in range(len(sentences))]])
        for i, sentence in enumerate(sentences):
            writer.writerow([sentence, *[f"{v:.6f}" for v in matrix[i]]])
    tmp.replace(out)
