"""`pipeline similarity-matrix` output: every score readable at any terminal width, text
printed as it is (no rich markup), and a missing report extra named with its brackets."""

from __future__ import annotations

import csv
import io
import re
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from rich.console import Console
from typer.testing import CliRunner

from pipeline.analysis import metrics
from pipeline.cli import app, similarity
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


# ---------------------------------------------------------------------------------------------
# Many sentences: the console shows up to CONSOLE_LIMIT; --out writes more a block of rows at
# a time, in bounded memory; --report draws up to HEATMAP_LIMIT.

# Runs the CLI in this interpreter, then writes its peak resident memory (ru_maxrss, kB) to
# argv[1].
MEASURED = """
import resource, sys
from pipeline.cli import app
try:
    app(sys.argv[2:], prog_name="pipeline")
except SystemExit as exit:
    code = exit.code
with open(sys.argv[1], "w") as fh:
    fh.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
sys.exit(code)
"""


def many_sentences(n: int) -> list[str]:
    words = "recipe bread flour oven rocket orbit moon guitar piano singer drum".split()
    rng = np.random.default_rng(n)
    return [" ".join(rng.choice(words, size=rng.integers(3, 12))) + f" {i}" for i in range(n)]


def write_lines(path, sentences):
    path.write_text("\n".join(sentences) + "\n")
    return path


def measured_run(tmp_path, name: str, *args) -> tuple[subprocess.CompletedProcess, int]:
    """The CLI in a process of its own, and its peak resident memory in bytes."""
    peak = tmp_path / f"{name}.rss"
    result = subprocess.run([sys.executable, "-c", MEASURED, str(peak), *map(str, args)],
                            capture_output=True, text=True, timeout=600)
    return result, int(peak.read_text()) * 1024


def cosine_reference(encoder, sentences) -> np.ndarray:
    """numpy's cosine of the encoder's vectors: not the code under test."""
    v = np.asarray(encoder.embed_texts(sentences), np.float64)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v @ v.T


def read_matrix(path) -> tuple[list[str], np.ndarray]:
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        assert table.column_names[1:] == [f"s{j + 1}" for j in range(table.num_rows)]
        return (table["sentence"].to_pylist(),
                np.column_stack([c.to_numpy() for c in table.columns[1:]]))
    rows = list(csv.reader(path.open(newline="", encoding="utf-8")))
    assert rows[0] == ["sentence", *(f"s{j + 1}" for j in range(len(rows) - 1))]
    return [r[0] for r in rows[1:]], np.array([[float(x) for x in r[1:]] for r in rows[1:]])


def test_3000_sentences_are_written_in_bounded_memory_not_printed(tmp_path, tiny_encoder):
    src = write_lines(tmp_path / "s.txt", many_sentences(3000))
    out = tmp_path / "m.parquet"
    result, peak = measured_run(tmp_path, "big", "similarity-matrix", src, "--out", out, *MODEL)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # no legend, no borders, no scores
    assert result.stderr.splitlines() == [
        f"wrote 3000x3000 cosine matrix to {out} (not shown: the console shows up to 50 "
        "sentences)"]
    # The same command on 12 sentences: the interpreter, torch and the model.
    small = write_lines(tmp_path / "small.txt", many_sentences(12))
    baseline, base_peak = measured_run(tmp_path, "small", "similarity-matrix", small,
                                       "--out", tmp_path / "small.parquet", *MODEL)
    assert baseline.returncode == 0, baseline.stderr
    # The whole matrix is 72 MB of float64 (the printed one took 4.2 GB): a block of rows at
    # a time stays far under 1 GB more.
    assert peak - base_peak < 1 << 30, (peak, base_peak)
    sentences, got = read_matrix(out)
    assert sentences == many_sentences(3000)
    np.testing.assert_allclose(got, cosine_reference(tiny_encoder, sentences), atol=1e-5)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_matrix_written_in_blocks_equals_numpy(tmp_path, tiny_encoder, monkeypatch, suffix):
    # 120 sentences in blocks of 8 rows (8 x 120 float64), the last block short.
    monkeypatch.setattr(similarity, "BLOCK_BYTES", 8 * 120 * 8)
    sentences = many_sentences(120)
    sentences[5] = 'a "quoted", comma, line'  # CSV quoting
    src = write_lines(tmp_path / "s.txt", sentences)
    out = tmp_path / f"m{suffix}"
    result = CliRunner().invoke(app, ["similarity-matrix", str(src), "--out", str(out), *MODEL])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "(not shown:" in result.stderr
    written, got = read_matrix(out)
    assert written == sentences
    np.testing.assert_allclose(got, cosine_reference(tiny_encoder, sentences), atol=1e-5)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    if suffix == ".parquet":
        assert pq.ParquetFile(out).num_row_groups == 15  # a row group per block


@pytest.mark.parametrize("metric", metrics.METRICS)
def test_blocks_make_the_whole_matrix(metric):
    vectors = np.random.default_rng(5).normal(size=(37, 16)).astype(np.float32)
    whole = metrics.similarity_matrix(vectors, metric)
    for rows in (1, 5, 36, 37, 100):
        blocks = list(metrics.similarity_blocks(vectors, metric, rows))
        assert [len(b) for b in blocks][:-1] == [rows] * (len(blocks) - 1)
        np.testing.assert_allclose(np.concatenate(blocks), whole, rtol=1e-12, atol=1e-12)


def test_at_the_console_limit_the_matrix_is_printed(tmp_path, tiny_encoder):
    sentences = many_sentences(similarity.CONSOLE_LIMIT)
    src = write_lines(tmp_path / "s.txt", sentences)
    result = CliRunner().invoke(app, ["similarity-matrix", str(src), *MODEL],
                                env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(printed_matrix(result.stdout, len(sentences)),
                               cosine_reference(tiny_encoder, sentences), atol=5e-4)


@pytest.mark.parametrize(("n", "options", "says"), [
    (51, [], "51 sentences make a 51 x 51 matrix, too large to show (the console shows up to "
             "50): write it with --out matrix.parquet or --out matrix.csv"),
    (501, ["--report", "h.html"], "--report draws at most 500 sentences, not 501"),
    (10_001, ["--out", "m.csv"], "--out writes the matrix of at most 10,000 sentences, not "
                                 "10,001 (100,020,001 scores)"),
])
def test_too_many_sentences_are_one_line(tmp_path, monkeypatch, n, options, says):
    if "--report" in options:
        pytest.importorskip("matplotlib")  # else the missing extra is the error
    monkeypatch.chdir(tmp_path)
    # Refused before the model loads: a model that does not exist is never looked at.
    src = write_lines(tmp_path / "s.txt", many_sentences(n))
    result = CliRunner().invoke(app, ["similarity-matrix", str(src), *options,
                                      "--model", "random:no-such-preset"])
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {says}")
    assert not (tmp_path / "h.html").exists() and not (tmp_path / "m.csv").exists()
