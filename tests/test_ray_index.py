"""`build-index --ray`: the shards' work in Ray tasks on a local 2-CPU cluster (loopback),
against the same streamed build run in this process: the same bytes on disk."""

from __future__ import annotations

import shutil

import pytest
from helpers_cli import cli
from helpers_index import assert_same_search, clustered_unit_vectors, write_embedded_folder

from pipeline import ray_cluster
from pipeline.index import build, store

ray_cluster.prepare_environment(local=True)  # before Ray is imported (loopback only, ...)
ray = pytest.importorskip("ray", reason="the ray extra (make test installs it)")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    assert address.startswith("127.0.0.1:")
    yield address
    ray.shutdown()


def side_bytes(path, info, role):
    return (path / info["side_files"][role]["name"]).read_bytes()


@pytest.mark.parametrize(("key", "roles"), [("IVF16,Flat", ["ivfdata"]),
                                            ("IVF16,PQ8x8,Rescore(fp16)", ["ivfdata", "rescore"]),
                                            ("BFlat,Rescore(int8)", ["rescore"])])
def test_ray_build_writes_the_local_streamed_build_byte_for_byte(cluster, tmp_path, key, roles,
                                                                 monkeypatch):
    x = clustered_unit_vectors(5_000, 32, clusters=30, seed=21)
    local, remote = tmp_path / "local", tmp_path / "ray"
    write_embedded_folder(local, x, shard_rows=700)  # 8 shards: several tasks per CPU
    shutil.copytree(local, remote)
    monkeypatch.setattr(build, "needs_streaming", lambda *args: True)
    here = build.run_build_index(local, index_key=key)
    there = build.run_build_index(remote, index_key=key, ray=cluster)
    assert there["build"] == "streamed"
    for role in roles:
        assert side_bytes(local, here, role) == side_bytes(remote, there, role)
    for field in ("params", "recall", "train_rows", "calibration"):
        assert here.get(field) == there.get(field)
    untimed = [[{k: v for k, v in step.items() if k != "ms_per_query"} for step in info["tuning"]]
               for info in (here, there)]
    assert untimed[0] == untimed[1]
    assert_same_search(local, remote, x[::11])


def test_cli_build_index_on_ray(cluster, tmp_path):
    x = clustered_unit_vectors(3_000, 32, clusters=20, seed=22)
    write_embedded_folder(tmp_path, x, shard_rows=1_000)
    result = cli("build-index", "--index", tmp_path, "--index-key", "IVF8,Flat",
                 "--memory-budget", "100kB", "--ray", cluster)
    assert result.exit_code == 0, result.output
    searchable, info = store.load_search_index(tmp_path)
    assert info["build"] == "streamed" and searchable.ntotal == 3_000
