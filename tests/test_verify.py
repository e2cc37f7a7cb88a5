"""Damaged or swapped files are refused, never used: each is one line (exit code 1) naming the
file and the rerun that makes it again. Embedding shards (build-index), index.faiss (search),
token shards (embed) and checkpoint weights (search, embed); and a rebuild that fails leaves
the working index as it was.

Every test changes real bytes of a small index made by the stages, as users run them."""

import hashlib
import json
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from helpers_cli import TINY, cli, ok, one_error_line

from pipeline.errors import IndexFolderError
from pipeline.folder import IndexFolder
from pipeline.model.checkpoint import random_model, save_checkpoint
from pipeline.search import search

TOKENIZE = ["--max-tokens", 64, "--shard-rows", 100]
QUERY = "rocket launch to orbit the moon"
WORDS = ("recipe for baking bread with flour yeast and butter in the oven rocket launch to "
         "orbit the moon with astronauts guitar and piano concert with a singer").split()


def flip(path, offset=None) -> None:
    """Change one byte of a file in place, the middle one by default: its size stays."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0xFF
    path.write_bytes(bytes(data))


def write_corpus(path, n=300) -> None:
    rng = np.random.default_rng(0)
    with open(path, "w") as fh:
        for i in range(n):
            text = " ".join(rng.choice(WORDS, size=rng.integers(4, 14)))
            fh.write(json.dumps({"id": f"doc-{i}", "text": text}) + "\n")


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """(corpus, index folder) tokenized into 3 shards and embedded with the tiny model; no
    index yet. Tests damage copies of it (`index`), so this one keeps the good vectors."""
    root = tmp_path_factory.mktemp("embedded")
    corpus, index = root / "corpus.jsonl", root / "idx"
    write_corpus(corpus)
    ok("tokenize", corpus, "--index", index, *TOKENIZE)
    ok("embed", "--index", index, *TINY)
    return corpus, index


@pytest.fixture
def index(embedded, tmp_path):
    copy = tmp_path / "idx"
    shutil.copytree(embedded[1], copy)
    return copy


@pytest.fixture
def assert_search_is_right(embedded, tiny_encoder):
    """A check that search in an index folder finds the exact top rows of the good vectors."""
    good = IndexFolder(embedded[1]).load_vectors()
    scores = good @ tiny_encoder.embed_texts([QUERY])[0]
    top = np.argsort(-scores, kind="stable")[:3]

    def check(index):
        result = ok("search", QUERY, "--index", index, "-k", 3, "--json", "--device", "cpu")
        hits = json.loads(result.stdout)["hits"]
        assert [h["row"] for h in hits] == top.tolist()  # one row per document here
        np.testing.assert_allclose([h["score"] for h in hits], scores[top], atol=1e-5)

    return check


# --- embedding shards: build-index --------------------------------------------------------

def test_damaged_embedding_shard_is_refused_then_repaired(index, assert_search_is_right):
    shard = index / "embeddings" / "part-00001.parquet"
    flip(shard)  # a byte of one stored vector: Parquet reads the shard without complaint
    line = one_error_line(cli("build-index", "--index", index))
    assert str(shard) in line and f"run `pipeline embed --index {index}` to redo it" in line
    assert not (index / "index.faiss").exists() and not (index / "index.json").exists()

    repaired = ok("embed", "--index", index, "--device", "cpu")  # the rerun the line names
    assert "embedded 100 rows" in repaired.stderr  # only the damaged shard is redone
    built = ok("build-index", "--index", index)
    assert "current" not in built.stderr
    assert_search_is_right(index)


def test_damaged_embedding_shard_leaves_the_built_index_in_use(index, assert_search_is_right):
    ok("build-index", "--index", index)
    built = {name: (index / name).read_bytes() for name in ("index.faiss", "index.json")}
    shard = index / "embeddings" / "part-00002.parquet"
    flip(shard)
    line = one_error_line(cli("build-index", "--index", index, "--force"))
    assert str(shard) in line and "pipeline embed --index" in line
    assert {name: (index / name).read_bytes() for name in built} == built
    assert_search_is_right(index)  # the index was built from the good bytes

    ok("embed", "--index", index, "--device", "cpu")
    # The repaired shard has the bytes (and so the hash) the index was built from.
    assert "current" in ok("build-index", "--index", index).stderr
    assert_search_is_right(index)


# --- index.faiss: search ------------------------------------------------------------------

def test_flipped_index_bytes_are_refused(index, assert_search_is_right):
    ok("build-index", "--index", index)
    flip(index / "index.faiss")  # a byte of one stored vector: FAISS reads it without complaint
    line = one_error_line(cli("search", QUERY, "--index", index, "--device", "cpu"))
    assert str(index / "index.faiss") in line
    assert f"run `pipeline build-index --index {index} --force`" in line
    # A damaged index is not "current": build-index without --force rebuilds it too.
    assert "current" not in ok("build-index", "--index", index).stderr
    assert_search_is_right(index)


def test_damaged_index_header_is_one_line(index):
    ok("build-index", "--index", index)
    flip(index / "index.faiss", offset=0)  # FAISS's fourcc: read_index raises RuntimeError
    line = one_error_line(cli("search", QUERY, "--index", index, "--device", "cpu"))
    assert str(index / "index.faiss") in line and "--force" in line


def test_unreadable_index_with_its_recorded_hash_is_one_line(index):
    """A file whose bytes are the recorded ones that FAISS still cannot read (another FAISS
    version's, say): FAISS's RuntimeError becomes one line too."""
    ok("build-index", "--index", index)
    index_file, info_file = index / "index.faiss", index / "index.json"
    index_file.write_bytes(b"not a faiss index" * 100)
    info = json.loads(info_file.read_text())
    info["index_file"] = {**info["index_file"], "bytes": index_file.stat().st_size,
                          "sha256": hashlib.sha256(index_file.read_bytes()).hexdigest()}
    info_file.write_text(json.dumps(info))
    line = one_error_line(cli("search", QUERY, "--index", index, "--device", "cpu"))
    assert f"cannot read {index_file}" in line and "--force" in line


# --- a rebuild that fails -----------------------------------------------------------------

def run_with_file_size_limit(limit: int, *args) -> subprocess.CompletedProcess:
    """`python -m pipeline.cli ARGS` where no file may grow past `limit` bytes: writes past
    it fail with EFBIG, as they would with ENOSPC on a full disk."""
    def limit_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)],
                          capture_output=True, text=True, preexec_fn=limit_files, timeout=300)


@pytest.mark.parametrize("docs", [300, 3])
def test_failed_rebuild_keeps_the_working_index(tmp_path, docs):
    """300 rows: index.faiss (38 KB) is too big to write. 3 rows: index.faiss (429 bytes) is
    written, index.json (about 1.4 KB) is not."""
    corpus, index = tmp_path / "corpus.jsonl", tmp_path / "idx"
    write_corpus(corpus, docs)
    ok("tokenize", corpus, "--index", index, *TOKENIZE)
    ok("embed", "--index", index, *TINY)
    ok("build-index", "--index", index)
    built = {name: (index / name).read_bytes() for name in ("index.faiss", "index.json")}
    limit = 8192 if docs == 300 else len(built["index.faiss"]) + 100
    too_big = "index.faiss" if docs == 300 else "index.json"
    assert len(built[too_big]) > limit

    # New settings, so a rebuild that got through would change both files.
    failed = run_with_file_size_limit(limit, "build-index", "--index", index, "--force",
                                      "--target-recall", 0.9)
    assert failed.returncode == 1, failed.stderr
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot write {index}/"), lines
    assert {name: (index / name).read_bytes() for name in built} == built
    assert not list(index.glob("*.tmp"))
    hits = json.loads(ok("search", QUERY, "--index", index, "--json", "--device", "cpu").stdout)
    assert len(hits["hits"]) == min(docs, 10)


# --- token shards: embed ------------------------------------------------------------------

def test_damaged_token_shard_is_refused_by_embed(embedded, tmp_path):
    corpus, index = embedded[0], tmp_path / "idx"
    ok("tokenize", corpus, "--index", index, *TOKENIZE)
    shard = index / "tokens" / "part-00001.parquet"
    flip(shard)
    line = one_error_line(cli("embed", "--index", index, *TINY))
    assert str(shard) in line
    assert f"run `pipeline tokenize CORPUS --index {index} --force`" in line

    ok("tokenize", corpus, "--index", index, *TOKENIZE, "--force")
    ok("embed", "--index", index, *TINY)
    assert np.array_equal(IndexFolder(index).load_vectors(),
                          IndexFolder(embedded[1]).load_vectors())


# --- checkpoint weights: search and a resumed embed ---------------------------------------

@pytest.fixture
def swapped_weights(embedded, tmp_path):
    """An index embedded with a checkpoint folder whose weights were then replaced by other
    ones, its config.json (and the weights_sha256 it records) kept."""
    model, index = tmp_path / "model", tmp_path / "idx"
    save_checkpoint(random_model("gpt2-tiny", seed=0), model)
    config = (model / "config.json").read_text()
    ok("tokenize", embedded[0], "--index", index, *TOKENIZE)
    ok("embed", "--index", index, "--model", model, "--device", "cpu")
    ok("build-index", "--index", index)
    save_checkpoint(random_model("gpt2-tiny", seed=1), model)
    (model / "config.json").write_text(config)
    return index


def test_other_weights_are_another_model_for_embed(swapped_weights):
    line = one_error_line(cli("embed", "--index", swapped_weights, "--device", "cpu"))
    assert "another model" in line


def test_other_weights_are_another_model_for_torch_search(swapped_weights):
    with pytest.raises(IndexFolderError, match="another model"):
        search(swapped_weights, [QUERY], engine="torch")


def test_other_weights_are_another_model_for_search(swapped_weights):
    line = one_error_line(cli("search", QUERY, "--index", swapped_weights, "--device", "cpu"))
    assert "another model" in line
