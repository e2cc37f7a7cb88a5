"""The Ray engines against the local ones, on one local Ray cluster shared by these tests
(2 CPUs, loopback): the same token shards, embedding shards and index, byte for byte, after a
clean run, a worker killed mid-job, a driver killed and rerun, and a folder finished by the
other engine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers_cli import ROOT, cli, one_error_line

from pipeline import ray_cluster
from pipeline.embed.engines import ray as ray_engine
from pipeline.embed.stage import RayOptions, run_embed
from pipeline.index.build import run_build_index
from pipeline.text import ray_tokenize
from pipeline.text.stage import TokenizeSettings, run_tokenize

ray_cluster.prepare_environment(local=True)  # before Ray is imported (loopback only, ...)
ray = pytest.importorskip("ray", reason="the ray extra (make test installs it)")

DOCS = 3000
SHARD_ROWS = 500  # 6 token shards
PIECE_ROWS = 200  # 3 pieces per shard: both actors busy on every shard


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module, on loopback; yields its GCS address."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    assert address.startswith("127.0.0.1:")
    yield address
    ray.shutdown()


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch):
    monkeypatch.setattr(ray_engine, "PIECE_ROWS", PIECE_ROWS)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Debian descriptions (the default corpus's first DOCS) in a Parquet file."""
    path = tmp_path_factory.mktemp("corpus") / "debian.parquet"
    table = pq.read_table(ROOT / "data_sets" / "debian_packages.parquet",
                          columns=["id", "text"]).slice(0, DOCS)
    pq.write_table(table, path, row_group_size=700)  # 5 row groups
    return path


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, corpus) -> Path:
    index = tmp_path_factory.mktemp("tokenized") / "index"
    run_tokenize(corpus, index, TokenizeSettings(shard_rows=SHARD_ROWS))
    return index


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory, tokenized) -> Path:
    """The local engine's embeddings and index of `tokenized`, with the default model."""
    index = copy_folder(tokenized, tmp_path_factory.mktemp("local") / "index")
    run_embed(index)
    run_build_index(index)
    return index


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def assert_same_embeddings(made: Path, reference: Path) -> None:
    """The same embedding shards, byte for byte, and the same shard records."""
    ours, theirs = sorted((made / "embeddings").glob("*.parquet")), \
        sorted((reference / "embeddings").glob("*.parquet"))
    assert [p.name for p in ours] == [p.name for p in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name
    manifest = json.loads((made / "manifest.json").read_text())["embed"]
    expected = json.loads((reference / "manifest.json").read_text())["embed"]
    assert manifest["shards"] == expected["shards"]
    assert manifest["identity"] == expected["identity"]


def actor_pids(class_name: str) -> list[int]:
    """Processes of this machine running Ray actors of `class_name` (Ray titles them)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if command.startswith(b"ray::") and class_name.encode() in command:
                pids.append(int(entry.name))
    return pids


def recorded_shards(index: Path) -> int:
    try:
        manifest = json.loads((index / "manifest.json").read_text())
    except (OSError, ValueError):
        return 0
    return len(manifest.get("embed", {}).get("shards", {}))


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# The tokenize tests come first: after the embed tests' datasets (a killed worker, a killed
# driver, a failed run) a tokenize on the same cluster sometimes waited for good for its
# actors' first results (Ray 2.60; docs/performance.md, "Ray engine").
def test_ray_tokenize_equals_local_stage(cluster, tmp_path, corpus, monkeypatch):
    """Files and runs of Parquet row groups as pieces: the same shards and records."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    shutil.copy(corpus, folder / "a.parquet")
    lines = pq.read_table(corpus).slice(0, 400)["text"].to_pylist()
    (folder / "b.jsonl").write_text("".join(
        json.dumps({"id": f"jsonl-{i}", "text": "" if i % 40 == 0 else text}) + "\n"
        for i, text in enumerate(lines)))
    (folder / "c.txt").write_text("".join(t.replace("\n", " ") + "\n" for t in lines[:300]))
    monkeypatch.setattr(ray_tokenize, "PIECE_ROWS", 1000)  # a.parquet in 3 pieces
    settings = TokenizeSettings(shard_rows=450, max_tokens=64, overlap=8)  # windows too
    local = run_tokenize(folder, tmp_path / "local", settings)
    on_ray = run_tokenize(folder, tmp_path / "ray", settings, ray=cluster)
    assert on_ray["stats"]["pieces"] == 5
    assert on_ray["shards"] == local["shards"]
    for key in ("documents", "rows", "tokens", "split_documents", "empty_skipped", "files",
                "bytes"):
        assert on_ray["stats"][key] == local["stats"][key], key
    for shard in local["shards"]:
        assert (tmp_path / "ray" / "tokens" / shard["name"]).read_bytes() == \
            (tmp_path / "local" / "tokens" / shard["name"]).read_bytes()


def test_ray_tokenize_refuses_an_id_repeated_across_pieces(cluster, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps({"id": "x", "text": "one"}) + "\n")
    (folder / "b.jsonl").write_text(json.dumps({"id": "y", "text": "two"}) + "\n"
                                    + json.dumps({"id": "x", "text": "three"}) + "\n")
    result = cli("tokenize", folder, "--index", tmp_path / "index", "--ray", cluster)
    assert one_error_line(result) == ('error: corpus has the id "x" twice: a.jsonl:1 and '
                                      'b.jsonl:2: ids must be unique (give --id-field \'\' '
                                      'for FILE:LINE ids)')
    assert not (tmp_path / "index").exists()


def test_ray_embed_equals_local_engine_byte_for_byte(cluster, tmp_path, tokenized,
                                                     local_reference):
    index = copy_folder(tokenized, tmp_path / "index")
    section = run_embed(index, ray=RayOptions(cluster, actors=2))
    assert_same_embeddings(index, local_reference)
    stats = section["stats"]
    assert stats["engine"] == "ray" and len(stats["workers"]) == 2
    assert sum(w["rows"] for w in stats["workers"]) == stats["rows"] > DOCS  # windows too
    assert all(w["rows"] > 0 for w in stats["workers"])  # both actors did work
    run_build_index(index)
    assert (index / "index.faiss").read_bytes() == \
        (local_reference / "index.faiss").read_bytes()


@pytest.mark.parametrize("on_workers", [True, False], ids=["written-by-actors", "returned"])
def test_ray_embeds_whole_shards_as_the_local_engine(cluster, tmp_path, tokenized,
                                                     local_reference, monkeypatch, on_workers):
    """A shard in one piece (as on a GPU) is written by its actor where the actor sees the
    folder, else its vectors go back to the driver: the local engine's bytes either way.
    (Returned, the actors also load the model shipped through the object store instead of
    the driver's folder.)"""
    monkeypatch.setattr(ray_engine, "PIECE_ROWS", 10**6)
    monkeypatch.setattr(ray_engine, "WRITE_ON_WORKERS", on_workers)
    monkeypatch.setattr(ray_engine, "MODEL_FROM_PATH", on_workers)
    index = copy_folder(tokenized, tmp_path / "index")
    section = run_embed(index, ray=RayOptions(cluster, actors=2))
    assert_same_embeddings(index, local_reference)
    workers, n_shards = section["stats"]["workers"], len(section["shards"])
    assert sum(w["pieces"] for w in workers) == n_shards
    assert sum(w["shards_written"] for w in workers) == (n_shards if on_workers else 0)
    assert all(w["startup"]["model_from"] == ("path" if on_workers else "object store")
               for w in workers)
    assert not list((index / "embeddings").glob(".ray-*"))  # the run's marker is gone


def test_ray_embed_survives_a_killed_worker(cluster, tmp_path, tokenized, local_reference):
    index = copy_folder(tokenized, tmp_path / "index")
    outcome = {}

    def embed():
        try:
            outcome["section"] = run_embed(index, ray=RayOptions(cluster, actors=2))
        except BaseException as err:  # reported below
            outcome["error"] = err

    worker = threading.Thread(target=embed)
    worker.start()
    wait_for(lambda: recorded_shards(index) >= 1 and len(actor_pids("EmbedPieces")) == 2)
    os.kill(actor_pids("EmbedPieces")[0], signal.SIGKILL)
    worker.join()
    assert "error" not in outcome, outcome.get("error")
    # Ray replaced the killed actor: a third worker did some of the pieces.
    assert len(outcome["section"]["stats"]["workers"]) == 3
    assert_same_embeddings(index, local_reference)


def test_killed_driver_reruns_only_unfinished_shards(cluster, tmp_path, tokenized,
                                                     local_reference):
    index = copy_folder(tokenized, tmp_path / "index")
    n_shards = len(json.loads((index / "manifest.json").read_text())["tokenize"]["shards"])
    driver = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "embed", "--index", str(index), "--ray", cluster],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: recorded_shards(index) >= 1 or driver.poll() is not None)
        assert driver.poll() is None, driver.stderr.read().decode()
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.wait()
    done_before = recorded_shards(index)
    assert 1 <= done_before < n_shards
    section = run_embed(index, ray=RayOptions(cluster))
    assert section["stats"]["skipped_shards"] == done_before
    assert_same_embeddings(index, local_reference)


def test_one_folder_finished_by_the_other_engine(cluster, tmp_path, local_reference):
    """Shards the local engine made are kept; Ray makes the rest (and the other way round)."""
    for engine in (RayOptions(cluster), None):
        index = copy_folder(local_reference, tmp_path / f"index-{engine is None}")
        manifest = json.loads((index / "manifest.json").read_text())
        for name in sorted(manifest["embed"]["shards"])[::2]:
            del manifest["embed"]["shards"][name]
            (index / "embeddings" / name).unlink()
        (index / "manifest.json").write_text(json.dumps(manifest))
        section = run_embed(index, ray=engine)
        assert section["stats"]["skipped_shards"] == len(manifest["embed"]["shards"])
        assert_same_embeddings(index, local_reference)


def test_ray_refuses_a_stale_copy_of_the_token_shards(cluster, tmp_path, tokenized):
    """Workers read the tokens where --ray-tokens says; a copy that is not the manifest's
    shards is refused, naming the file, and nothing is committed."""
    index = copy_folder(tokenized, tmp_path / "index")
    stale = copy_folder(tokenized / "tokens", tmp_path / "elsewhere")
    first = sorted(stale.glob("*.parquet"))[0]
    table = pq.read_table(first)
    pq.write_table(table.slice(0, table.num_rows - 1), first)
    with pytest.raises(Exception, match="sha256 differs"):
        run_embed(index, ray=RayOptions(cluster, tokens_location=str(stale)))
    assert first.name not in json.loads((index / "manifest.json").read_text()
                                        ).get("embed", {}).get("shards", {})


@pytest.mark.parametrize("args, message", [
    (["--ray", "nowhere"], "--ray 'nowhere': expected auto"),
    (["--ray-actors", "2"], "--ray-actors and --ray-tokens need --ray"),
    (["--ray", "local", "--ray-actors", "0"], "--ray-actors must be at least 1"),
    (["--ray", "local", "--devices", "cpu,cpu"], "--devices is for this machine's GPUs"),
])
def test_ray_options_errors(cluster, tmp_path, tokenized, args, message):
    index = copy_folder(tokenized, tmp_path / "index")
    assert message in one_error_line(cli("embed", "--index", index, *args))
