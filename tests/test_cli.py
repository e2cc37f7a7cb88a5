"""The seed's commands, through Typer's CliRunner, as a user types them."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.parquet import arrow_to_vectors

MODEL = ["--model", "random:gpt2-tiny", "--device", "cpu"]
runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(args))


def test_embed_sentence_json(tiny_encoder):
    result = run("embed", "--sentence", "The cat is sleeping", *MODEL)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out) == {"sentence", "embedding", "dimensions", "model", "pooling"}
    assert out["dimensions"] == len(out["embedding"]) == 32
    assert out["model"] == "random:gpt2-tiny:0" and out["pooling"] == "mean"
    expected = tiny_encoder.embed_texts(["The cat is sleeping"])[0]
    np.testing.assert_allclose(out["embedding"], expected, atol=1e-6)
    assert np.linalg.norm(out["embedding"]) == pytest.approx(1.0, abs=1e-5)


def test_similarity_layouts(tiny_encoder):
    a, b = "The cat is sleeping", "A feline is resting"
    result = run("similarity", "--sentence1", a, "--sentence2", b, *MODEL)
    assert result.exit_code == 0
    va, vb = tiny_encoder.embed_texts([a, b])
    cos = float(va @ vb)
    assert result.stdout.splitlines() == [
        "Sentences:", f'  1: "{a}"', f'  2: "{b}"',
        f"Cosine Similarity: {cos:.4f} (0=different, 1=identical)"]
    full = run("similarity", "--sentence1", a, "--sentence2", b, "--all-metrics", *MODEL)
    lines = full.stdout.splitlines()
    assert lines[3] == "Results:"
    assert lines[4].startswith("  Cosine Similarity:") and f"{cos:.4f}" in lines[4]
    assert lines[5].startswith("  Euclidean Distance:")
    assert f"{np.linalg.norm(va - vb):.4f}" in lines[5]
    assert lines[6].startswith("  Manhattan Distance:")
    assert lines[7].startswith("  Dot Product Sim:")
    as_json = json.loads(run("similarity", "--sentence1", a, "--sentence2", b,
                             "--all-metrics", "--json", *MODEL).stdout)
    assert as_json["cosine"] == pytest.approx(cos, abs=1e-6)
    assert set(as_json) >= {"cosine", "euclidean", "manhattan", "dot", "pearson"}


def test_embed_file_to_parquet(tmp_path, tiny_encoder):
    lines = ["first line", "", "second line", "   ", "third"]
    src = tmp_path / "lines.txt"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "vectors.parquet"
    result = run("embed", "--file", str(src), "--out", str(out), *MODEL)
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.column_names == ["id", "text", "embedding"]
    assert table["text"].to_pylist() == ["first line", "second line", "third"]
    assert table["id"].to_pylist() == [1, 3, 5]  # line numbers
    np.testing.assert_allclose(arrow_to_vectors(table["embedding"]),
                               tiny_encoder.embed_texts(["first line", "second line", "third"]),
                               atol=1e-6)


@pytest.mark.parametrize("args,message", [
    (["embed", "--sentence", "   "], "empty"),
    (["embed", "--sentence", ""], "empty"),
    (["embed", "--sentence", "x", "--model", "no-such-model"], "unknown model"),
    (["embed", "--file", "/no/such/file.txt", "--out", "x.parquet"], "no such file"),
    (["embed", "--sentence", "x", "--pooling", "median"], "unknown pooling"),
    (["similarity", "--sentence1", "a", "--sentence2", " "], "empty"),
    (["similarity", "--sentence1", "a", "--sentence2", "b", "--model", "random:nope"],
     "unknown model"),
])
def test_bad_input_is_one_line_exit_1(args, message):
    result = run(*args)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_unreadable_file(tmp_path):
    binary = tmp_path / "junk.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 100)
    result = run("embed", "--file", str(binary), "--out", str(tmp_path / "o.parquet"), *MODEL)
    assert result.exit_code == 1 and "not UTF-8" in result.stderr
    assert not (tmp_path / "o.parquet").exists()


def test_similarity_matrix_file_to_csv_and_heatmap(tmp_path, tiny_encoder):
    pytest.importorskip("matplotlib")
    sentences = ["cats purr", "kittens meow", "stocks fell today", "markets dropped"]
    src = tmp_path / "s.txt"
    src.write_text("\n".join(sentences) + "\n\n")
    out, report = tmp_path / "m.csv", tmp_path / "m.html"
    result = run("similarity-matrix", str(src), "--out", str(out), "--report", str(report),
                 *MODEL)
    assert result.exit_code == 0, result.output
    import csv

    rows = list(csv.reader(out.open()))
    assert rows[0] == ["sentence", "s1", "s2", "s3", "s4"]
    assert [r[0] for r in rows[1:]] == sentences
    got = np.array([[float(x) for x in r[1:]] for r in rows[1:]])
    vectors = tiny_encoder.embed_texts(sentences)
    np.testing.assert_allclose(got, vectors @ vectors.T, atol=1e-5)
    assert report.read_text().lstrip().lower().startswith("<!doctype html")
    bad = run("similarity-matrix", str(src), "--metric", "hamming", *MODEL)
    assert bad.exit_code == 1 and "unknown metric" in bad.stderr
