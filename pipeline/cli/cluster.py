"""`pipeline cluster`: clusters of an index's documents (or rows), and their report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from pipeline.cli.app import (
    QUERY,
    IndexOption,
    app,
    err_console,
    user_errors,
)
from pipeline.errors import pip_install


@app.command(rich_help_panel=QUERY)
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
        help="Cosine at or above which two documents (rows with --rows) are near-duplicates "
        "(report only); 0 skips.")]
    = 0.95,
    sample: Annotated[int, typer.Option(
        help="Documents (rows with --rows) k-means trains on (random sample).")] = 100_000,
    projection: Annotated[str, typer.Option(
        help=f"2-D map: pca, or umap ({escape(pip_install('umap'))}).")] = "pca",
    rows: Annotated[bool, typer.Option(
        "--rows", help="Cluster rows (each window of a long document on its own), not "
        "documents.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
):
    """Cluster an index's documents (spherical k-means) and write a report.

    A document longer than --max-tokens was indexed as several rows (overlapping windows, one
    vector each); by default its rows are pooled into one vector (the mean of their unit
    vectors, re-normalised), so clusters.parquet, the sample, the near-duplicates and the
    report have one entry per document. --rows clusters the rows themselves.
    """
    from pipeline.analysis.cluster import run_cluster

    summary = run_cluster(index, k, report, seed, near_duplicate_threshold, sample,
                          console=err_console, projection=projection, by_rows=rows)
    if as_json:
        typer.echo(json.dumps(summary))
