"""`pipeline search`: nearest documents to a query, from the shell."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.app import (
    QUERY,
    IndexOption,
    ModelOption,
    UsageError,
    app,
    console,
    err_console,
    read_lines,
    require_text,
    user_errors,
)


@app.command(rich_help_panel=QUERY)
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
