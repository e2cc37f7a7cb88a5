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

from . import query
from .encoder import Encoder, ModelSpecError
from .model import POOLINGS
from .tokenizer import TokenizerError

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


USER_ERRORS = (UsageError, ModelSpecError, TokenizerError, FileNotFoundError,
               IsADirectoryError, PermissionError, UnicodeDecodeError, ValueError)


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
    batch_tokens: Annotated[int, typer.Option(help="Padded tokens per forward pass.")] = 16384,
):
    """Embed a sentence (JSON, as the seed), a file of lines (Parquet), or an index's shards."""
    check_pooling(pooling)
    modes = [x is not None for x in (sentence, file, index)]
    if sum(modes) != 1:
        raise UsageError("give exactly one of --sentence, --file or --index")
    if index is not None:
        from .embed import run_embed

        run_embed(index, model=model, device=device, pooling=pooling, dtype=dtype,
                  batch_tokens=batch_tokens, console=err_console)
        return
    if sentence is not None:
        require_text(sentence, "--sentence")
        enc = Encoder.load(model, device, pooling)
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
    enc = Encoder.load(model, device, pooling)
    from tqdm import tqdm

    from .shards import write_vectors_table

    with tqdm(total=len(rows), unit="text", desc="embed", file=sys.stderr) as bar:
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


def _register_optional_commands() -> None:
    """train / evaluate live in cli_train.py (issue 6) while that work is in progress."""
    try:
        from .cli_train import register
    except ImportError:
        return
    register(app)


_register_optional_commands()

if __name__ == "__main__":
    app()
