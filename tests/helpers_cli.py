"""The CLI as the tests drive it: run a command, read its one-line error, and build a small
index with the tiny random model through the real stages."""

import json
from pathlib import Path

from typer.testing import CliRunner

from pipeline.cli import app

TINY = ["--model", "random:gpt2-tiny", "--device", "cpu"]
ROOT = Path(__file__).resolve().parents[1]


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(*args):
    result = cli(*args)
    assert result.exit_code == 0, result.output
    return result


def one_error_line(result) -> str:
    """The message of a command that failed as a user error: exit 1, one `error:` line, no
    traceback."""
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    lines = terminal_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def terminal_lines(text: str) -> list[str]:
    """The non-blank lines a terminal shows for `text`: what a carriage return goes back
    over (a progress bar erased) is overwritten."""
    shown = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
    return [line for line in shown if line.strip()]


def write_corpus(path: Path, n: int, word: str = "bread") -> Path:
    """n JSONL documents with ids WORD-0 .. WORD-(n-1), all about WORD."""
    path.write_text("".join(json.dumps({"id": f"{word}-{i}", "text": f"{word} number {i} is "
                                        f"baked in the oven {i % 7} for {i % 5} hours"}) + "\n"
                            for i in range(n)))
    return path


def stage_commands(corpus: Path, index: Path) -> list[list]:
    """tokenize, embed, build-index of `corpus` into `index`, with the tiny model."""
    return [["tokenize", corpus, "--index", index, "--max-tokens", 64],
            ["embed", "--index", index, *TINY], ["build-index", "--index", index]]


def build_index(root: Path, name: str = "idx", n: int = 200, word: str = "bread") -> Path:
    """ROOT/NAME, indexed from ROOT/NAME.jsonl (write_corpus) through the three stages."""
    index = root / name
    for args in stage_commands(write_corpus(root / f"{name}.jsonl", n, word), index):
        ok(*args)
    return index
