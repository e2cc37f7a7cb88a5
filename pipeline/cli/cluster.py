"""`pipeline cluster`: clusters of an index's documents, and their report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.app import (
    IndexOption,
    app,
    err_console,
    user_errors,
)


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
