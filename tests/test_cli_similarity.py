"""`pipeline similarity-matrix` output: every score readable at any terminal width, text
printed as it is (no rich markup), and a missing report extra named with its brackets."""

from __future__ import annotations

import io
import re
import sys

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from pipeline.analysis import metrics
from pipeline.cli import app
from pipeline.cli.similarity import column_blocks, print_matrix
from pipeline.errors import pip_install

MODEL = ["--model", "random:gpt2-tiny", "--device", "cpu"]
NUMBER = r"-?\d+\.\d{3}"


def printed_matrix(output: str, n: int) -> np.ndarray:
    """The matrix read back from the printed blocks: a header line of column numbers, then
    lines of a row number and that row's scores (NaN where a score never appeared)."""
    got = np.full((n, n), np.nan)
    columns: list[int] = []
    for line in output.splitlines():
        if re.fullmatch(r"\s*\d+(\s+\d+)*\s*", line):
            columns = [int(c) - 1 for c in line.split()]
        elif re.fullmatch(rf"\s*\d+(\s+{NUMBER})+\s*", line):
            row, *values = line.split()
            assert len(values) == len(columns), line
            got[int(row) - 1, columns] = [float(v) for v in values]
    return got


def twelve_by_twelve(metric: str) -> np.ndarray:
    vectors = np.random.default_rng(3).normal(size=(12, 16))
    return metrics.similarity_matrix(vectors, metric)


@pytest.mark.parametrize("metric", ["pearson", "manhattan", "cosine"])
@pytest.mark.parametrize("width", [80, 40, 200])
def test_every_score_prints_in_full_at_any_width(metric, width):
    matrix = twelve_by_twelve(metric)  # pearson has negatives, manhattan two-digit numbers
    out = Console(width=width, file=io.StringIO(), markup=False)
    sentences = [f"sentence number {i} " + "and more words " * 10 for i in range(12)]
    print_matrix(sentences, matrix, metric, out)
    text = out.file.getvalue()
    assert max(len(line) for line in text.splitlines()) <= width
    np.testing.assert_allclose(printed_matrix(text, 12), matrix, atol=5e-4)
    assert not re.search(r"\d\.\d*…", text)  # no score cut short


def test_colour_is_styled_not_markup():
    out = Console(width=80, file=io.StringIO(), markup=False, force_terminal=True,
                  color_system="truecolor")
    print_matrix(["a", "b"], np.array([[1.0, 0.2], [0.2, 1.0]]), "cosine", out)
    text = out.file.getvalue()
    assert "[rgb(" not in text and "\x1b[38;2;" in text  # an ANSI colour, not literal markup


def test_column_blocks():
    assert column_blocks(12, 5, 2, 80) == [range(0, 12)]  # 2 + 12 * 6 = 74 columns
    assert column_blocks(12, 6, 2, 80) == [range(0, 11), range(11, 12)]
    assert column_blocks(3, 6, 1, 4) == [range(0, 1), range(1, 2), range(2, 3)]  # too narrow


def test_cli_at_80_columns_prints_every_score_and_text_as_is(tmp_path, tiny_encoder):
    sentences = [f"sentence {i} about topic {i % 3}" for i in range(11)]
    sentences.append("[bold]x[/bold] is not markup")
    src = tmp_path / "s.txt"
    src.write_text("\n".join(sentences) + "\n")
    result = CliRunner().invoke(app, ["similarity-matrix", str(src), "--metric", "pearson",
                                      *MODEL], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "12  [bold]x[/bold] is not markup" in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    expected = metrics.similarity_matrix(tiny_encoder.embed_texts(sentences), "pearson")
    np.testing.assert_allclose(printed_matrix(result.stdout, 12), expected, atol=5e-4)


def test_missing_report_extra_is_named_with_brackets(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m.split(".")[0] in ("scipy", "matplotlib")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    src = tmp_path / "s.txt"
    src.write_text("one\ntwo\nthree\n")
    result = CliRunner().invoke(app, ["similarity-matrix", str(src), "--report",
                                      str(tmp_path / "h.html"), *MODEL])
    assert result.exit_code == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error:") and pip_install("report") in line
    assert not (tmp_path / "h.html").exists()
