"""`pipeline similarity` and `similarity-matrix`: how alike sentences are."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.text import Text

from pipeline.analysis import metrics as query
from pipeline.cli.app import (
    QUERY,
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


@app.command(rich_help_panel=QUERY)
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


# The console shows the matrix of up to this many sentences: 50 make 2,500 scores, a few
# blocks of columns of a screen or two each. Past it the scores are a wall nobody reads (and
# 3,000 sentences took 114 s and 4.2 GB to print).
CONSOLE_LIMIT = 50
# --report draws the heatmap of up to this many: past it a row is under 3 pixels of the
# 1,600-pixel image, no label fits, and the clustering that orders the rows grows with the
# cube of their number (1,000: 2 s; 3,000: about a minute).
HEATMAP_LIMIT = 500
# --out writes the matrix of up to this many: 100 million scores, 0.8 GB of Parquet or 1 GB
# of CSV. Past it the file is of little use, and the Parquet writer's memory is no longer
# small: a column per sentence, whose metadata grows with the row groups times the columns
# (10,000 sentences: 0.6 GB).
OUT_LIMIT = 10_000
# --out computes and writes this many bytes of scores at a time: a block of rows against
# every column.
BLOCK_BYTES = 32 << 20


@app.command("similarity-matrix", rich_help_panel=QUERY)
@user_errors
def similarity_matrix(
    file: Annotated[Path | None, typer.Argument(help="Sentences, one per line.")] = None,
    index: Annotated[Path | None, typer.Option(
        "--index", "-i", help="Sample the sentences from this index instead.")] = None,
    sample: Annotated[int, typer.Option(help="Rows to sample with --index.")] = 12,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    metric: Annotated[str, typer.Option(help=f"One of {', '.join(query.METRICS)}.")]
    = "cosine",
    out: Annotated[Path | None, typer.Option(
        help=f"Write the matrix as .csv or .parquet (up to {OUT_LIMIT:,} sentences).")] = None,
    report: Annotated[Path | None, typer.Option(
        help="Also write an HTML heatmap (rows reordered by hierarchical clustering; up to "
        f"{HEATMAP_LIMIT} sentences).")] = None,
    model: ModelOption = None,
    device: DeviceOption = None,
):
    """All-pairs similarity of sentences, printed colour-scaled and optionally saved.

    The sentences are printed as a numbered legend, then the matrix by number alone, in as
    many blocks of columns as the terminal's width needs: every score is printed in full.

    Up to 50 sentences are printed. The matrix of more is written with --out only, a block of
    rows at a time, so that its memory stays bounded.
    """
    check_matrix_options(file, index, metric, out)
    if report is not None:
        from pipeline.analysis.report import require_report_extra

        require_report_extra(heatmap=True)  # before the model is loaded, not after

    def check_size(n: int) -> None:
        check_matrix_size(n, out, report)

    if file is not None:
        sentences, vectors = file_sentences(file, model, device, check_size)
    else:
        sentences, vectors = index_sentences(index, sample, seed, check_size)
    show_and_write(sentences, vectors, metric, out, report)


def show_and_write(sentences: list[str], vectors: np.ndarray, metric: str, out: Path | None,
                   report: Path | None) -> None:
    """The matrix printed (up to CONSOLE_LIMIT sentences), drawn (--report) and written
    (--out). It is held whole only to be printed or drawn; --out alone makes and writes it a
    block of rows at a time."""
    n, shown = len(sentences), len(sentences) <= CONSOLE_LIMIT
    matrix = query.similarity_matrix(vectors, metric) if shown or report is not None else None
    if shown:
        print_matrix(sentences, matrix, metric)
    if report is not None:
        from pipeline.analysis.report import run_similarity_report

        run_similarity_report(sentences, matrix, report, f"{metric} similarity",
                              higher_is_similar=query.higher_is_similar(metric))
        err_console.print(f"wrote heatmap to {report}")
    unshown = "" if shown else f" (not shown: the console shows up to {CONSOLE_LIMIT} sentences)"
    if out is not None:
        blocks = [matrix] if matrix is not None else query.similarity_blocks(
            vectors, metric, block_rows(n))
        write_matrix(out, sentences, blocks)
        # soft_wrap: one line, however narrow the terminal (it wraps the line, not rich).
        err_console.print(f"wrote {n}x{n} {metric} matrix to {out}{unshown}", soft_wrap=True)
    elif not shown:
        err_console.print(f"{n}x{n} {metric} matrix written to the heatmap only{unshown}",
                          soft_wrap=True)


def check_matrix_options(file: Path | None, index: Path | None, metric: str,
                         out: Path | None) -> None:
    query.check_metric(metric)
    if (file is None) == (index is None):
        raise UsageError("give a FILE of sentences or --index")
    if out is not None and out.suffix not in (".csv", ".parquet"):
        raise UsageError("--out must end in .csv or .parquet")
    if out is not None and not out.parent.is_dir():
        raise UsageError(f"--out {out}: no folder {out.parent}")


def check_matrix_size(n: int, out: Path | None, report: Path | None) -> None:
    """Refuse, before a vector is made, a matrix of n sentences that is too large for what was
    asked: the console, a heatmap, a file."""
    if report is not None and n > HEATMAP_LIMIT:
        raise UsageError(f"--report draws at most {HEATMAP_LIMIT} sentences, not {n:,}: a "
                         "heatmap of more is unreadable; sample fewer, or write the matrix "
                         "with --out")
    if out is not None and n > OUT_LIMIT:
        raise UsageError(f"--out writes the matrix of at most {OUT_LIMIT:,} sentences, not "
                         f"{n:,} ({n * n:,} scores)")
    if n > CONSOLE_LIMIT and out is None and report is None:
        raise UsageError(f"{n:,} sentences make a {n:,} x {n:,} matrix, too large to show (the "
                         f"console shows up to {CONSOLE_LIMIT}): write it with --out "
                         "matrix.parquet or --out matrix.csv")


def block_rows(n: int) -> int:
    """Rows of an n x n matrix of float64 that make BLOCK_BYTES (at least one)."""
    return max(1, BLOCK_BYTES // (8 * max(1, n)))


def file_sentences(file: Path, model: str | None, device: str | None,
                   check_size: Callable[[int], None]):
    """The non-empty lines of FILE and their vectors; `check_size` sees their number first."""
    sentences = [line for line in read_lines(file) if line.strip()]
    if len(sentences) < 2:
        raise UsageError(f"{file} needs at least two non-empty lines")
    check_size(len(sentences))  # before the model is loaded
    from pipeline.embed.encoder import Encoder

    return sentences, Encoder.load(model, device).embed_texts(sentences)


def index_sentences(index: Path, sample: int, seed: int, check_size: Callable[[int], None]):
    """The texts and vectors of `sample` rows of an index, drawn with `seed`; `check_size`
    sees their number first."""
    from pipeline.folder import IndexFolder

    if sample < 2:
        raise UsageError("--sample must be at least 2")
    folder = IndexFolder(index)
    folder.require_embeddings()
    # Only the sampled rows are read, not every vector of the index.
    rows = folder.sample_rows(sample, seed)
    check_size(len(rows))
    sentences = [r["text"] for r in folder.read_rows(rows, ("text",))]
    vectors = folder.vectors_at(rows)
    return sentences, vectors


def print_matrix(sentences: list[str], matrix, metric: str, out: Console | None = None) -> None:
    out = out or console
    for line in matrix_lines(sentences, matrix, metric, out.width):
        out.print(line)


def matrix_lines(sentences: list[str], matrix, metric: str, width: int) -> list[Text]:
    """The printed matrix: title, the numbered sentences (cut at the width), then per block of
    columns a header of column numbers and one line per sentence, scores colour-scaled."""
    n = len(sentences)
    label = len(str(n))
    cells = [[f"{value:.3f}" for value in row] for row in matrix]
    cell = max(len(c) for row in cells for c in row)
    styles = cell_styles(matrix, query.higher_is_similar(metric))
    lines = [Text(f"{metric} similarity", style="bold")]
    for i, sentence in enumerate(sentences):
        text = " ".join(str(sentence or "").split())
        line = Text(f"{i + 1:>{label}}  {text}")
        line.truncate(width, overflow="ellipsis")
        lines.append(line)
    for columns in column_blocks(n, cell, label, width):
        lines.append(Text())
        lines.append(Text(" " * label + "".join(f" {j + 1:>{cell}}" for j in columns),
                          style="bold"))
        for i in range(n):
            line = Text()
            line.append(f"{i + 1:>{label}}", style="bold")
            for j in columns:
                line.append(" ")
                line.append(cells[i][j].rjust(cell), style=styles[i][j])
            lines.append(line)
    return lines


def column_blocks(n: int, cell: int, label: int, width: int) -> list[range]:
    """Columns per block so that a line (label, then a space and a cell per column) fits in
    width; at least one column per block, however narrow the terminal."""
    per = max(1, (width - label) // (cell + 1))
    return [range(lo, min(n, lo + per)) for lo in range(0, n, per)]


def cell_styles(matrix, higher_is_similar: bool) -> list[list[str]]:
    """Per cell an rgb style from red (least similar in the matrix) to green (most)."""
    lo, hi = float(matrix.min()), float(matrix.max())
    styles = []
    for row in matrix:
        line = []
        for value in row:
            t = (value - lo) / (hi - lo) if hi > lo else 1.0
            t = t if higher_is_similar else 1 - t
            green, red = int(55 + 200 * t), int(55 + 200 * (1 - t))
            line.append(f"rgb({red},{green},80)")
        styles.append(line)
    return styles


def write_matrix(out: Path, sentences: list[str], blocks: Iterable[np.ndarray]) -> None:
    """The matrix as a sentence column then s1..sN, from `blocks` (its rows in order, each
    block against every column), written a block at a time to a temp file renamed at the end
    (removed on an error: a full disk leaves no half-written matrix)."""
    names = [f"s{j + 1}" for j in range(len(sentences))]
    if out.suffix == ".parquet":
        write_matrix_parquet(out, sentences, names, blocks)
    else:
        write_matrix_csv(out, sentences, names, blocks)


def write_matrix_parquet(out: Path, sentences: list[str], names: list[str],
                         blocks: Iterable[np.ndarray]) -> None:
    import pyarrow as pa

    from pipeline.parquet import atomic_table_writer, numpy_to_arrow, strings_to_arrow

    schema = pa.schema([("sentence", pa.string()), *((name, pa.float64()) for name in names)])
    first = 0
    with atomic_table_writer(out, plain_columns=names) as write:
        for block in blocks:
            columns = np.ascontiguousarray(block.T)  # each column's scores side by side
            arrays = [strings_to_arrow(sentences[first:first + len(block)]),
                      *map(numpy_to_arrow, columns)]
            write(pa.Table.from_arrays(arrays, schema=schema))  # a row group per block
            first += len(block)


def write_matrix_csv(out: Path, sentences: list[str], names: list[str],
                     blocks: Iterable[np.ndarray]) -> None:
    import csv

    from pipeline.parquet import atomic_open

    first = 0
    with atomic_open(out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["sentence", *names])
        for block in blocks:
            for sentence, row in zip(sentences[first:first + len(block)], block, strict=True):
                writer.writerow([sentence, *(f"{v:.6f}" for v in row.tolist())])
            first += len(block)
