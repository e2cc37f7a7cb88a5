"""The `pipeline` command line: thin Typer commands that validate options and call the stages.

Errors a user can cause (bad input, unknown model, missing files) become one line on stderr and
exit code 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from pipeline.config import POOLINGS
from pipeline.errors import PipelineError, UsageError

# torch (via pipeline.embed and pipeline.model.gpt2) is imported by the commands that run the
# model, not here: `pipeline search` embeds its query without it (numpy_forward).

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Batch semantic search with a GPT-2 encoder: tokenize -> embed -> index -> search.",
)
# markup=False: messages carry paths, option names and document text, where rich would read
# `[report]` or `[1]` as markup and swallow it. Colour goes in as Text styles instead.
console = Console(markup=False)
err_console = Console(stderr=True, markup=False)

# Panels of `pipeline --help`, in reading order.
BUILD, QUERY, MODEL = "Build an index", "Query an index", "Models"


def print_error(message: str) -> None:
    err_console.print(Text.assemble(("error:", "red"), " ", message), highlight=False,
                      soft_wrap=True)


def user_errors(fn):
    """Turn the errors a user can cause (PipelineError, and a full disk wherever a write
    meets it) into `error: ...` and exit code 1, without traceback; any other exception is a
    bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PipelineError as err:
            print_error(str(err).splitlines()[0] if str(err) else type(err).__name__)
            raise typer.Exit(code=1) from None
        except (typer.Exit, typer.Abort):  # RuntimeErrors too: how a command ends on purpose
            raise
        except (OSError, RuntimeError) as err:
            # A full disk is no bug, wherever the write was (a FAISS index, an np.save, the
            # tokenizing child's report): one line naming the file. Imported only here:
            # pyarrow is slow to import.
            from pipeline.parquet import disk_full_error

            full = disk_full_error(err)
            if full is None:
                raise
            print_error(str(full))
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


IndexOption = Annotated[Path, typer.Option(
    "--index", "-i", help="Index folder, e.g. indexes/default.")]


@contextlib.contextmanager
def progress_bar(**options):
    """A tqdm bar on stderr that erases itself when the work fails, so that the error is
    the one line left (a Ray run takes seconds to start: long enough for a bar to show)."""
    from tqdm import tqdm

    with tqdm(file=sys.stderr, delay=1, **options) as bar:
        try:
            yield bar
        except BaseException:
            bar.leave = False
            raise
