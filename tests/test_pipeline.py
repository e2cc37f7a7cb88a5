"""The staged pipeline end to end on small corpora: tokenize -> embed -> build-index -> search,
as users run it (CLI, and real subprocesses where signals matter)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.embed.encoder import Encoder
from pipeline.folder import IndexFolder
from pipeline.search import merge_chunk_hits

runner = CliRunner()
TINY = ["--model", "random:gpt2-tiny", "--device", "cpu"]
TOPICS = {
    "cooking": "recipe for baking bread with flour yeast and butter in the oven",
    "space": "rocket launch to orbit the moon with astronauts and satellites",
    "music": "guitar and piano concert with a singer and a drum solo",
}


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


def ok(*args):
    result = cli(*args)
    assert result.exit_code == 0, result.output
    return result


def make_corpus(path, n=300, long_every=0):
    rng = np.random.default_rng(0)
    names = list(TOPICS)
    with open(path, "w") as fh:
        for i in range(n):
            topic = names[i % 3]
            words = TOPICS[topic].split()
            text = " ".join(rng.choice(words, size=rng.integers(4, 14)))
            if long_every and i % long_every == 0:
                text = " ".join([text] * 40)  # several hundred tokens: split into windows
            fh.write(json.dumps({"id": f"{topic}-{i}", "text": text}) + "\n")
            if i % 50 == 7:
                fh.write(json.dumps({"id": f"empty-{i}", "text": "   "}) + "\n")


def build(tmp_path, name="idx", n=300, long_every=0, **kw):
    corpus = tmp_path / "corpus.jsonl"
    make_corpus(corpus, n, long_every)
    index = tmp_path / name
    ok("tokenize", corpus, "--index", index, "--max-tokens", 64, "--overlap", 8,
       "--shard-rows", kw.get("shard_rows", 100))
    ok("embed", "--index", index, *TINY)
    ok("build-index", "--index", index)
    return corpus, index


def test_stages_write_what_the_manifest_says(tmp_path):
    corpus, index = build(tmp_path, long_every=25)
    manifest = IndexFolder(index).manifest
    tok = manifest["tokenize"]
    assert tok["stats"]["empty_skipped"] == 6
    assert tok["stats"]["split_documents"] == 12
    rows = sum(s["rows"] for s in tok["shards"])
    tables = [pq.read_table(index / "tokens" / s["name"]) for s in tok["shards"]]
    assert [t.num_rows for t in tables] == [s["rows"] for s in tok["shards"]]
    allrows = np.concatenate([t["row"].to_numpy() for t in tables])
    np.testing.assert_array_equal(allrows, np.arange(rows))
    # Windows of a long document: chunk numbers, spans with the asked overlap, <= max tokens.
    t0 = tables[0].to_pylist()
    long_doc = [r for r in t0 if r["doc_id"] == "cooking-0"]
    assert [r["chunk"] for r in long_doc] == list(range(len(long_doc))) and len(long_doc) > 1
    for a, b in zip(long_doc, long_doc[1:], strict=False):
        assert a["end"] - b["start"] == 8
    assert all(len(r["tokens"]) == r["end"] - r["start"] <= 64 for r in t0)
    # Embeddings: unit vectors, equal to embedding each row's tokens directly.
    emb = manifest["embed"]
    assert emb["identity"]["model"] == "random:gpt2-tiny:0" and emb["dtype"] == "float32"
    vectors = IndexFolder(index).load_vectors()
    assert vectors.shape == (rows, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    enc = Encoder.load("random:gpt2-tiny", device="cpu")
    direct = enc.embed_token_lists([r["tokens"] for r in t0[:20]])
    np.testing.assert_allclose(vectors[:20], direct, atol=1e-5)
    info = json.loads((index / "index.json").read_text())
    assert info["n"] == rows and info["dim"] == 32


def test_search_finds_the_topic_and_merges_windows(tmp_path):
    _, index = build(tmp_path, long_every=10)
    result = ok("search", "rocket launch to orbit the moon", "--index", index, "-k", 5,
                "--json", "--device", "cpu")
    hits = json.loads(result.stdout)["hits"]
    assert len(hits) == 5
    assert len({h["doc_id"] for h in hits}) == 5  # one hit per document
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    # Exact reference: the best document by brute force over all rows.
    vectors = IndexFolder(index).load_vectors()
    enc = Encoder.load("random:gpt2-tiny", device="cpu")
    q = enc.embed_texts(["rocket launch to orbit the moon"])[0]
    assert hits[0]["row"] == int(np.argmax(vectors @ q))
    assert hits[0]["score"] == pytest.approx(float(np.max(vectors @ q)), abs=1e-5)
    table = ok("search", "guitar concert", "--index", index, "--device", "cpu").stdout
    assert "rank" in table and "score" in table


def test_search_of_unsplit_documents_is_exact_top_k(tmp_path):
    """No document was cut into windows: the hits are the k best rows, in order."""
    _, index = build(tmp_path)
    assert IndexFolder(index).manifest["tokenize"]["stats"]["split_documents"] == 0
    result = ok("search", "rocket launch to orbit the moon", "--index", index, "-k", 7,
                "--json", "--device", "cpu")
    hits = json.loads(result.stdout)["hits"]
    vectors = IndexFolder(index).load_vectors()
    q = Encoder.load("random:gpt2-tiny", device="cpu").embed_texts(
        ["rocket launch to orbit the moon"])[0]
    exact = vectors @ q
    rows, scores = [h["row"] for h in hits], [h["score"] for h in hits]
    # Tie-robust (duplicate texts score alike, to the last bit or not): the scores are the 7
    # best, best first, and each is its row's own.
    assert len(set(rows)) == 7 and scores == sorted(scores, reverse=True)
    np.testing.assert_allclose(scores, np.sort(exact)[::-1][:7], atol=1e-5)
    np.testing.assert_allclose(scores, exact[rows], atol=1e-5)


def test_batch_queries_to_parquet(tmp_path):
    _, index = build(tmp_path)
    queries = tmp_path / "queries.txt"
    queries.write_text("bread in the oven\npiano concert\n")
    out = tmp_path / "results.parquet"
    ok("search", "--queries", queries, "--out", out, "--index", index, "-k", 3,
       "--device", "cpu")
    table = pq.read_table(out).to_pylist()
    assert [r["query_id"] for r in table] == [1, 1, 1, 2, 2, 2]
    assert [r["rank"] for r in table] == [1, 2, 3] * 2


def test_merge_chunk_hits():
    rows = [5, 6, 9, 2, -1]
    scores = [0.9, 0.8, 0.7, 0.6, -1]
    docs = ["a", "a", "b", "c", ""]
    assert merge_chunk_hits(rows, scores, docs, 10) == [(5, 0.9), (9, 0.7), (2, 0.6)]
    assert merge_chunk_hits(rows, scores, docs, 2) == [(5, 0.9), (9, 0.7)]


def test_stages_skip_when_current(tmp_path):
    corpus, index = build(tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in (index / "embeddings").iterdir()}
    assert "current" in ok("tokenize", corpus, "--index", index, "--max-tokens", 64,
                           "--overlap", 8, "--shard-rows", 100).stderr
    assert "current" in ok("embed", "--index", index, *TINY).stderr
    after = {p.name: p.stat().st_mtime_ns for p in (index / "embeddings").iterdir()}
    assert before == after


def test_float16_halves_the_vectors(tmp_path):
    corpus = tmp_path / "c.jsonl"
    make_corpus(corpus, 60)
    for dtype in ("float32", "float16"):
        ok("tokenize", corpus, "--index", tmp_path / dtype, "--max-tokens", 64)
        ok("embed", "--index", tmp_path / dtype, "--dtype", dtype, *TINY)
    v32, v16 = (IndexFolder(tmp_path / d).load_vectors() for d in ("float32", "float16"))
    np.testing.assert_allclose(v16, v32, atol=2e-3)
    t16 = pq.read_table(tmp_path / "float16" / "embeddings" / "part-00000.parquet")
    assert str(t16.schema.field("embedding").type.value_type) == "halffloat"


def test_search_refuses_another_model(tmp_path):
    _, index = build(tmp_path)
    result = cli("search", "bread", "--index", index, "--model", "random:gpt2-tiny:1")
    assert result.exit_code == 1 and "another model" in result.stderr
    result = cli("embed", "--index", index, "--model", "random:gpt2-tiny:1")
    assert result.exit_code == 1 and "--overwrite" in result.stderr


@pytest.mark.parametrize("setup,args,message", [
    (None, ["tokenize", "{tmp}/missing.txt", "--index", "{tmp}/i"], "no such file"),
    ("empty", ["tokenize", "{tmp}/empty.txt", "--index", "{tmp}/i"], "no documents"),
    ("junk", ["tokenize", "{tmp}/junk.txt", "--index", "{tmp}/i"], "does not look like text"),
    ("csv", ["tokenize", "{tmp}/t.csv", "--index", "{tmp}/i", "--text-column", "body"],
     "no column 'body'"),
    (None, ["embed", "--index", "{tmp}/nothing"], "run `pipeline tokenize` first"),
    (None, ["search", "x", "--index", "{tmp}/nothing"], "run `pipeline tokenize` first"),
])
def test_bad_input_leaves_nothing_behind(tmp_path, setup, args, message):
    if setup == "empty":
        (tmp_path / "empty.txt").write_text("\n  \n\n")
    elif setup == "junk":
        (tmp_path / "junk.txt").write_bytes(os.urandom(100_000))
    elif setup == "csv":
        (tmp_path / "t.csv").write_text("id,text\n1,hello\n")
    result = cli(*[a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    index = tmp_path / "i"
    assert not (index / "manifest.json").exists() and not (index / "tokens").exists()


def run_cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_embed_resumes_to_identical_result(tmp_path, sig):
    corpus = tmp_path / "corpus.jsonl"
    make_corpus(corpus, 1500)
    # fp32: slow enough (~0.2 s a shard) that the signal lands mid-run on any CPU
    model = ["--model", "random:gpt2-mini", "--device", "cpu", "--precision", "fp32"]
    for name in ("clean", "killed"):
        ok("tokenize", corpus, "--index", tmp_path / name, "--shard-rows", 100)
    ok("embed", "--index", tmp_path / "clean", *model)

    proc = run_cli("embed", "--index", tmp_path / "killed", *model)
    manifest = tmp_path / "killed" / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until some, not all, shards are done
        done = json.loads(manifest.read_text()).get("embed", {}).get("shards", {})
        if len(done) >= 2 or proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode != 0, "embed finished before it could be interrupted"
    done = json.loads(manifest.read_text())["embed"]["shards"]
    assert 0 < len(done) < 15

    ok("embed", "--index", tmp_path / "killed", *model)
    for name in ("clean", "killed"):
        ok("build-index", "--index", tmp_path / name)
    for shard in sorted((tmp_path / "clean" / "embeddings").glob("*.parquet")):
        a = pq.read_table(shard)
        b = pq.read_table(tmp_path / "killed" / "embeddings" / shard.name)
        assert a.equals(b), shard.name
    assert not list((tmp_path / "killed" / "embeddings").glob("*.tmp"))
    assert (tmp_path / "clean" / "index.faiss").read_bytes() == \
        (tmp_path / "killed" / "index.faiss").read_bytes()
    rows = IndexFolder(tmp_path / "killed").load_vectors().shape[0]
    assert rows == IndexFolder(tmp_path / "killed").manifest["tokenize"]["stats"]["rows"] == 1500


def test_read_rows_across_row_groups_and_shards(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"document number {i}\n" for i in range(12000)))
    ok("tokenize", corpus, "--index", tmp_path / "i", "--shard-rows", 7000)
    tables = [pq.read_table(p) for p in sorted((tmp_path / "i" / "tokens").glob("*.parquet"))]
    assert [pq.ParquetFile(p).num_row_groups for p in
            sorted((tmp_path / "i" / "tokens").glob("*.parquet"))] == [1, 2, 1]
    everything = [r for t in tables for r in t.select(["doc_id", "text"]).to_pylist()]
    # Shards of 4096 (the first), 7000 and 904 rows; row groups of 4096.
    rows = [11999, 0, 4095, 4096, 6999, 7000, 8191, 8192, 11095, 11096, 5, 4096]
    read = IndexFolder(tmp_path / "i").read_rows(rows, ("doc_id", "text"))
    assert read == [everything[r] for r in rows]


def test_arrays_built_without_pa_array_equal_pa_arrays():
    """Shards are built with numpy_to_arrow / strings_to_arrow (pa.array imports pandas on
    first use): they must give exactly pa.array's arrays."""
    import pyarrow as pa

    from pipeline.parquet import numpy_to_arrow, strings_to_arrow

    rng = np.random.default_rng(0)
    for values in (np.arange(10, dtype=np.int64), rng.integers(0, 50257, 99).astype(np.uint16),
                   rng.standard_normal(7).astype(np.float16), np.arange(20, dtype=np.int32)[::3],
                   np.zeros(0, dtype=np.float32)):
        got = numpy_to_arrow(values)
        assert got.equals(pa.array(values)) and got.type == pa.array(values).type
    texts = ["", "plain", "naïve café ☕", "日本語のテキスト", "line\nbreak", "x" * 1000]
    assert strings_to_arrow(texts).equals(pa.array(texts, pa.string()))
    assert strings_to_arrow([]).equals(pa.array([], pa.string()))
    with pytest.raises(TypeError):
        numpy_to_arrow(np.array([True, False]))  # Arrow packs bools into bits


def test_a_file_written_in_parts_is_renamed_only_when_whole(tmp_path):
    """Embedding shards are written block by block while the GPU works on the rest: the
    file holds every part in order, and a failure mid-way leaves the old file untouched."""
    import pyarrow as pa

    from pipeline.parquet import arrow_to_vectors, atomic_table_writer, vectors_to_arrow

    vectors = np.random.default_rng(0).standard_normal((1000, 8)).astype(np.float16)
    parts = [(0, 300), (300, 650), (650, 1000)]
    path = tmp_path / "part-00000.parquet"

    def table(a, b):
        return pa.table({"row": np.arange(a, b), "embedding": vectors_to_arrow(vectors[a:b])})

    with atomic_table_writer(path, compression="none", vector_column="embedding") as write:
        for a, b in parts:
            write(table(a, b))
            assert not path.exists()  # only the temp file, until the last part is in
    written = pq.read_table(path)
    assert written["row"].to_pylist() == list(range(1000))
    np.testing.assert_array_equal(arrow_to_vectors(written["embedding"]), vectors)
    assert pq.ParquetFile(path).num_row_groups == 3
    before = path.read_bytes()
    with (pytest.raises(RuntimeError, match="GPU gone"),
          atomic_table_writer(path, vector_column="embedding") as write):
        write(table(0, 300))
        raise RuntimeError("GPU gone")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left


def test_several_workers_give_the_same_shards(tmp_path):
    """--devices runs one thread per device; here two CPU encoders stand in for GPUs."""
    corpus = tmp_path / "c.jsonl"
    make_corpus(corpus, 600)
    for name in ("one", "two"):
        ok("tokenize", corpus, "--index", tmp_path / name, "--max-tokens", 64,
           "--shard-rows", 100)
    ok("embed", "--index", tmp_path / "one", *TINY)
    ok("embed", "--index", tmp_path / "two", "--devices", "cpu,cpu",
       "--model", "random:gpt2-tiny")
    manifest = IndexFolder(tmp_path / "two").manifest
    assert manifest["embed"]["device"] == "cpu,cpu"
    assert len(manifest["embed"]["shards"]) == 6
    for shard in sorted((tmp_path / "one" / "embeddings").glob("*.parquet")):
        assert pq.read_table(shard).equals(pq.read_table(tmp_path / "two" / "embeddings" /
                                                         shard.name))


def test_first_token_shards_start_small_and_double(tmp_path):
    """`tokenize --embed` starts the GPU on the first shard: it holds at most 4,096 rows,
    each next one twice the one before up to --shard-rows, rows numbered on across them."""
    from pipeline.text.stage import FIRST_SHARD_ROWS

    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"line {i} of a corpus\n" for i in range(45_000)))
    ok("tokenize", corpus, "--index", tmp_path / "idx", "--shard-rows", 12_000)
    shards = IndexFolder(tmp_path / "idx").manifest["tokenize"]["shards"]
    first = FIRST_SHARD_ROWS
    assert [s["rows"] for s in shards] == [first, 2 * first, 12_000, 12_000,
                                           45_000 - 3 * first - 24_000]
    rows = [pq.read_table(tmp_path / "idx" / "tokens" / s["name"])["row"].to_pylist()
            for s in shards]
    assert sum(rows, []) == list(range(45_000))


def test_tokenize_with_embed_equals_the_two_stages(tmp_path):
    """--embed overlaps the stages; the index folder must end exactly as after both."""
    corpus = tmp_path / "corpus.jsonl"
    make_corpus(corpus, 600, long_every=40)
    common = ["--max-tokens", 64, "--overlap", 8, "--shard-rows", 100]
    ok("tokenize", corpus, "--index", tmp_path / "staged", *common)
    ok("embed", "--index", tmp_path / "staged", "--dtype", "float16", *TINY)
    result = ok("tokenize", corpus, "--index", tmp_path / "both", *common, "--embed",
                "--dtype", "float16", *TINY)
    assert "embedded" in result.stderr
    staged, both = (IndexFolder(tmp_path / d).manifest for d in ("staged", "both"))
    assert both["tokenize"]["shards"] == staged["tokenize"]["shards"]
    assert len(both["embed"]["shards"]) == 7
    assert both["embed"]["shards"] == staged["embed"]["shards"]  # same bytes (sha256)
    for key in ("identity", "dtype", "precision"):
        assert both["embed"][key] == staged["embed"][key]
    assert not (tmp_path / "both" / "embeddings.tmp").exists()
    # The next stages take it as they take the staged one; a rerun finds everything current.
    hits = {}
    for name in ("staged", "both"):
        ok("build-index", "--index", tmp_path / name)
        hits[name] = json.loads(ok("search", "bread in the oven", "--index", tmp_path / name,
                                   "--json", *TINY).stdout)["hits"]
    assert hits["both"] == hits["staged"] and len(hits["both"]) == 10
    result = ok("tokenize", corpus, "--index", tmp_path / "both", *common, "--embed",
                "--dtype", "float16", *TINY)
    assert "current" in result.stderr
    assert IndexFolder(tmp_path / "both").manifest["embed"]["shards"] == both["embed"]["shards"]


def test_tokenize_with_embed_bad_input_leaves_nothing(tmp_path):
    (tmp_path / "junk.txt").write_bytes(os.urandom(100_000))
    for max_tokens, message in ((256, "--max-tokens 128"), (64, "does not look like text")):
        result = cli("tokenize", tmp_path / "junk.txt", "--index", tmp_path / "i", "--embed",
                     "--max-tokens", max_tokens, *TINY)
        assert result.exit_code == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.stderr
        assert not (tmp_path / "i").exists()
    result = cli("tokenize", tmp_path / "junk.txt", "--index", tmp_path / "i", *TINY)
    assert result.exit_code == 1 and "need --embed" in result.stderr


def tokenize_children(index_dir, parent=None):
    """Pids of live tokenizing processes (the child and its workers) working on index_dir;
    with `parent`, only that process's direct children."""
    pids = []
    for proc in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{proc}/cmdline").read_bytes().decode(errors="replace")
            stat = Path(f"/proc/{proc}/stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if "tokenize_child" in cmdline and str(index_dir) in cmdline and state != "Z" and \
                parent in (None, int(ppid)):
            pids.append(int(proc))
    return pids


def wait_until(condition, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline and not condition():
        time.sleep(0.05)
    return condition()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_tokenize_with_embed_reruns_cleanly(tmp_path, sig):
    """A killed or interrupted `tokenize --embed` leaves nothing a rerun would trust, and no
    tokenizer behind; the rerun starts over."""
    corpus = tmp_path / "corpus.jsonl"
    make_corpus(corpus, 3000)
    args = ["tokenize", corpus, "--index", tmp_path / "i", "--shard-rows", 100, "--embed",
            "--model", "random:gpt2-mini", "--device", "cpu", "--precision", "fp32"]
    proc = run_cli(*args)
    staging = tmp_path / "i" / "embeddings.tmp"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list(staging.glob("*.parquet"))) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "it finished before it could be killed"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:  # Ctrl-C: one message, no traceback from the process or its children
        assert proc.returncode == 130
        assert "interrupted" in stderr.decode() and "Traceback" not in stderr.decode()
    assert wait_until(lambda: not tokenize_children(tmp_path / "i"))
    # No vector is recorded as done (the tokens may be, if tokenizing had finished).
    manifest = tmp_path / "i" / "manifest.json"
    assert not manifest.exists() or "embed" not in json.loads(manifest.read_text())
    ok(*args)
    manifest = IndexFolder(tmp_path / "i").manifest
    assert len(manifest["embed"]["shards"]) == len(manifest["tokenize"]["shards"]) == 30
    assert not staging.exists() and not (tmp_path / "i" / "tokens.tmp").exists()
    assert len(IndexFolder(tmp_path / "i").load_vectors()) == manifest["tokenize"]["stats"]["rows"]


def test_tokenize_with_embed_reports_a_killed_tokenizer(tmp_path):
    """The tokenizing child killed alone: one line, exit 1, no hang, nothing left."""
    corpus = tmp_path / "corpus.jsonl"
    make_corpus(corpus, 3000)
    proc = run_cli("tokenize", corpus, "--index", tmp_path / "i", "--shard-rows", 100,
                   "--embed", "--model", "random:gpt2-mini", "--device", "cpu",
                   "--precision", "fp32")
    assert wait_until(lambda: list((tmp_path / "i" / "embeddings.tmp").glob("*.parquet")),
                      120)
    children = tokenize_children(tmp_path / "i", parent=proc.pid)
    assert len(children) == 1
    os.kill(children[0], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    lines = stderr.decode().strip().splitlines()
    assert proc.returncode == 1 and "ended unexpectedly" in lines[-1], stderr
    assert "Traceback" not in stderr.decode()
    assert not (tmp_path / "i").exists()


def test_tokenize_with_embed_stops_at_once_on_an_embedding_error(tmp_path, monkeypatch):
    """An error on the embedding side while the tokenizer has filled the pipe: the child
    stops (its report is dropped), the error comes out, nothing is left behind."""
    from pipeline.embed.engines.local import LocalEngine
    from pipeline.embed.overlap import run_tokenize_and_embed
    from pipeline.text.stage import TokenizeSettings

    def failing_embed(*args, **kwargs):
        time.sleep(3)  # the child fills the pipe meanwhile
        raise ValueError("disk full")

    monkeypatch.setattr(LocalEngine, "run", failing_embed)
    corpus = tmp_path / "corpus.jsonl"
    make_corpus(corpus, 3000)
    started = time.time()
    with pytest.raises(ValueError, match="disk full"):
        settings = TokenizeSettings(max_tokens=64, overlap=8, shard_rows=50)
        run_tokenize_and_embed(corpus, tmp_path / "i", settings,
                                     model="random:gpt2-tiny", device="cpu")
    assert time.time() - started < 20
    assert not (tmp_path / "i").exists() and not tokenize_children(tmp_path / "i")


def test_tokenize_with_embed_keeps_the_index_model(tmp_path):
    """Tokens current and no --model: the embedding resumes with the index's own model."""
    corpus = tmp_path / "corpus.jsonl"
    make_corpus(corpus, 200)
    args = ["tokenize", corpus, "--index", tmp_path / "i", "--embed", "--device", "cpu",
            "--max-tokens", 64]
    ok(*args, "--model", "random:gpt2-tiny:1")
    before = IndexFolder(tmp_path / "i").manifest["embed"]
    result = ok(*args)
    assert "current" in result.stderr
    after = IndexFolder(tmp_path / "i").manifest["embed"]
    assert after["identity"] == before["identity"] and after["shards"] == before["shards"]
