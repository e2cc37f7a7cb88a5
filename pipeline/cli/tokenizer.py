"""`pipeline fetch-ranks`: put GPT-2's BPE ranks file where the tokenizer finds it offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.app import BUILD, app, user_errors


@app.command(name="fetch-ranks", rich_help_panel=BUILD)
@user_errors
def fetch_ranks(
    out: Annotated[Path | None, typer.Option(
        help="File to write. Default: gpt2.tiktoken in $PIPELINE_CACHE_DIR, else in .cache/ "
        "beside the package's checkout (the first cache folder the tokenizer searches).")]
    = None,
):
    """Fetch GPT-2's BPE ranks file (gpt2.tiktoken) with pip and check its sha256.

    The file comes from the openai-whisper sdist, which ships the same ranks as tiktoken's
    r50k_base; only this step needs the network (a package index). A file already there
    with the right sha256 is kept.
    """
    # Imported here, as the other commands do: `pipeline --help` stays quick.
    from pipeline.text.tokenizer import RANKS_FILENAME, cache_dirs, fetch_ranks_file

    path = fetch_ranks_file(out if out is not None else cache_dirs()[0] / RANKS_FILENAME)
    typer.echo(f"GPT-2 ranks file: {path} (sha256 ok)")
