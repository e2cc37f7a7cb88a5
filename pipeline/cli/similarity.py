"""`pipeline similarity` and `similarity-matrix`: how alike sentences are."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pipeline.analysis import metrics as query
from pipeline.cli.app import (
    DeviceOption,
    ModelOption,
    PoolingOption,
    UsageError,
    app,
    check_pooling,
    console,
    err_console,
    read_lines,
    require_text,
    user_errors,
)


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
