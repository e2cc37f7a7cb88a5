"""Streamed (out-of-core) index builds, on-disk IVF lists, compressed codes with rescoring, and
the memory budget, checked against exact search in float64 (helpers_index.brute_force) and
against the in-memory build."""

import json
import shutil

import faiss
import numpy as np
import pytest
from helpers_cli import cli, one_error_line
from helpers_index import (
    assert_same_search,
    brute_force,
    clustered_unit_vectors,
    write_embedded_folder,
)

from pipeline.errors import IndexFolderError
from pipeline.folder import IndexFolder, sample_rows
from pipeline.index import build, choice, rescore, store, streamed

TINY_BUDGET = 100_000  # bytes: far below 6,000 x 32 float32 vectors, so the build streams


def held_out_recall(searchable, x, k=10, seed=99):
    """Independent recall@k: rows the tuning never saw, own row removed, float64 truth,
    a found row right when its exact score ties the k-th true one."""
    rows = sample_rows(len(x), 300, seed=seed)
    _, found = searchable.search(x[rows], k + 1)
    found = np.array([[f for f in hits if f != row][:k] for hits, row in zip(found, rows,
                                                                               strict=True)])
    scores, order = brute_force(x, x[rows], k, exclude=rows)
    kth = np.take_along_axis(scores, order[:, k - 1:k], axis=1)
    got = np.take_along_axis(scores, np.where(found >= 0, found, 0), axis=1)
    return float(((found >= 0) & (got >= kth - 1e-5)).mean())


@pytest.fixture()
def folder_6k(tmp_path):
    x = clustered_unit_vectors(6_000, 32, clusters=40, seed=3)
    write_embedded_folder(tmp_path / "idx", x, shard_rows=1_000)
    return tmp_path / "idx", x


def test_streamed_ivf_lists_on_disk_probed_in_full_are_exact_search(folder_6k):
    path, x = folder_6k
    info = build.run_build_index(path, index_key="IVF16,Flat", memory_budget=TINY_BUDGET)
    assert info["build"] == "streamed" and info["memory_budget"] == TINY_BUDGET
    ivfdata = path / info["side_files"]["ivfdata"]["name"]
    assert ivfdata.is_file() and ivfdata.name.endswith(".ivfdata")
    assert not list(path.glob("index.*.parts"))  # the parts were merged and removed
    searchable, _ = store.load_search_index(path)
    assert isinstance(faiss.extract_index_ivf(searchable.index).invlists,
                      faiss.InvertedLists)
    searchable.set_params({"nprobe": 16})  # every list: exact
    scores, found = searchable.search(x[:200], 10)
    _, order = brute_force(x, x[:200], 10)
    np.testing.assert_array_equal(found, order)
    np.testing.assert_allclose(scores, np.sort(x[:200] @ x.T, axis=1)[:, ::-1][:, :10],
                               atol=1e-5)


def test_streamed_and_in_memory_builds_give_the_same_index(folder_6k, tmp_path, monkeypatch):
    path, x = folder_6k
    other = tmp_path / "in_memory"
    shutil.copytree(path, other)
    memory_info = build.run_build_index(other, index_key="IVF16,Flat")
    # Streamed with a budget that lets it train on the same sample as in memory
    monkeypatch.setattr(build, "needs_streaming", lambda *args: True)
    streamed_info = build.run_build_index(path, index_key="IVF16,Flat")
    assert memory_info["build"] == "in-memory" and streamed_info["build"] == "streamed"
    assert streamed_info["train_rows"] == memory_info["train_rows"] == 6_000
    a, _ = store.load_search_index(path)
    b, _ = store.load_search_index(other)
    for nprobe in (1, 3):
        a.set_params({"nprobe": nprobe})
        b.set_params({"nprobe": nprobe})
        sa, ia = a.search(x[::7], 10)
        sb, ib = b.search(x[::7], 10)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(sa, sb)
    # and each one's recorded recall is what an independent measure finds, within sampling
    assert held_out_recall(a, x) >= streamed_info["recall"] - 0.03


def test_an_on_disk_index_loads_after_its_folder_moves(folder_6k, tmp_path):
    path, x = folder_6k
    build.run_build_index(path, index_key="IVF16,Flat", memory_budget=TINY_BUDGET)
    moved = tmp_path / "moved"
    path.rename(moved)
    searchable, info = store.load_search_index(moved)
    _, found = searchable.search(x[:5], 1)
    np.testing.assert_array_equal(found[:, 0], np.arange(5))


def test_binary_codes_with_int8_rescoring(folder_6k):
    path, x = folder_6k
    info = build.run_build_index(path, index_key="BFlat,Rescore(int8)", target_recall=0.9)
    assert info["recall"] >= 0.9 and info["params"]["rescore_factor"] in rescore.FACTORS
    memory = info["memory"]
    assert memory["index_bytes"] < 6_000 * 32 / 8 + 4096  # one bit per dimension, in RAM
    assert memory["rescore_bytes"] == 6_000 * 32  # one byte per dimension, on disk
    assert memory["compression"] >= 8
    searchable, _ = store.load_search_index(path)
    assert searchable.binary and searchable.factor == info["params"]["rescore_factor"]
    assert held_out_recall(searchable, x) >= info["recall"] - 0.03
    # rescoring makes the scores real inner products (to int8's precision), best first
    scores, found = searchable.search(x[:50], 10)
    exact = np.einsum("qd,qkd->qk", x[:50], x[found])
    np.testing.assert_allclose(scores, exact, atol=0.02)
    assert (np.diff(scores, axis=1) <= 0).all()


def test_pq_with_fp16_rescoring_past_the_budget_reaches_its_target(folder_6k):
    path, x = folder_6k
    info = build.run_build_index(path, index_key="IVF16,PQ8x8,Rescore(fp16)",
                                 target_recall=0.95)
    assert info["build"] == "streamed" and info["target_met"]
    searchable, _ = store.load_search_index(path)
    assert held_out_recall(searchable, x) >= 0.95 - 0.03


def test_the_budget_alone_decides_to_stream(folder_6k):
    path, x = folder_6k
    info = build.run_build_index(path, memory_budget=TINY_BUDGET)
    assert info["key"] == "Flat" and info["build"] == "streamed" and info["recall"] == 1.0
    searchable, _ = store.load_search_index(path)
    _, found = searchable.search(x[:100], 10)
    np.testing.assert_array_equal(found, brute_force(x, x[:100], 10)[1])


def test_a_refined_pq_chosen_past_the_budget_rescores_from_disk(folder_6k, monkeypatch):
    """The size tier IVF,PQ,Refine(SQfp16) fits the budget but the vectors beside it do not:
    the build streams, and its float16 re-ranking codes go to the rescore file."""
    path, x = folder_6k
    monkeypatch.setattr(choice, "FLAT_MAX_FLOATS", 1_000)
    monkeypatch.setattr(choice, "HNSW_MAX_ROWS", 0)
    budget = 1_200_000  # the refined PQ tier fits half; float32 vectors beside it do not
    chosen = choice.choose_index_key(len(x), x.shape[1], budget)
    assert chosen.endswith(",Refine(SQfp16)")
    info = build.run_build_index(path, memory_budget=budget)
    assert info["build"] == "streamed"
    assert info["key"] == chosen.replace(",Refine(SQfp16)", ",Rescore(fp16)")
    assert held_out_recall(store.load_search_index(path)[0], x) >= 0.9


def test_a_refine_key_in_a_streamed_build_is_one_line(folder_6k):
    path, _ = folder_6k
    line = one_error_line(cli("build-index", "--index", path, "--index-key",
                              "IVF16,PQ8x4,Refine(Flat)", "--memory-budget", "100KB"))
    assert "Rescore(fp16)" in line
    assert not (path / "index.json").exists()


def test_damaged_side_files_are_refused_and_rebuilt(folder_6k):
    path, _ = folder_6k
    info = build.run_build_index(path, index_key="BFlat,Rescore(int8)")
    side = path / info["side_files"]["rescore"]["name"]
    with open(side, "ab") as fh:
        fh.write(b"x")
    with pytest.raises(IndexFolderError, match="missing or not the one index.json records"):
        store.load_index(path)
    data = bytearray(side.read_bytes()[:-1])
    data[len(data) // 2] ^= 0xFF  # same size: the build's check hashes it
    side.write_bytes(bytes(data))
    again = build.run_build_index(path, index_key="BFlat,Rescore(int8)")
    assert "skipped" not in again
    assert not side.exists()  # the old build's file went with it
    assert [p.name for p in path.glob("index.*.rescore")] == [again["side_files"]["rescore"]
                                                               ["name"]]


def test_a_failed_streamed_build_keeps_the_previous_index(folder_6k, monkeypatch):
    path, x = folder_6k
    first = build.run_build_index(path, index_key="IVF16,Flat", memory_budget=TINY_BUDGET)

    def broken(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(streamed, "merge_parts", broken)
    with pytest.raises(OSError):
        build.run_build_index(path, index_key="IVF32,Flat", memory_budget=TINY_BUDGET)
    names = sorted(p.name for p in path.iterdir() if p.name.startswith("index."))
    assert names == sorted(["index.faiss", "index.json",
                            *(r["name"] for r in first["side_files"].values())])
    searchable, info = store.load_search_index(path)
    assert info["key"] == "IVF16,Flat" and searchable.ntotal == len(x)


def test_tokenize_again_removes_the_side_files(folder_6k):
    from pipeline.text.stage import swap_in_tokens

    path, _ = folder_6k
    build.run_build_index(path, index_key="BFlat,Rescore(int8)")
    work = path / "tokens.tmp"
    work.mkdir()
    swap_in_tokens(IndexFolder(path), work)
    assert not [p for p in path.iterdir() if p.name.startswith("index.")]


def test_int8_and_binary_codecs():
    x = clustered_unit_vectors(5_000, 32, clusters=10, seed=5)
    calibration = rescore.calibrate(x)
    codes = rescore.binary_codes(x, calibration)
    assert codes.shape == (5_000, 4)
    ones = np.unpackbits(codes, axis=1).mean(axis=0)
    assert np.all(np.abs(ones - 0.5) < 0.01)  # the median threshold: half the rows per bit
    spec = rescore.Rescore("int8")
    rows = rescore.encode(x, spec, calibration)
    assert rows.shape == (5_000, 32) and rows.dtype == np.uint8
    back = rescore.decode(rows, spec, calibration, 32)
    step = (np.array(calibration["max"]) - np.array(calibration["min"])) / 255
    assert np.all(np.abs(back - x) <= step / 2 + 1e-6)
    half = rescore.decode(rescore.encode(x, rescore.Rescore("fp16"), calibration),
                          rescore.Rescore("fp16"), calibration, 32)
    np.testing.assert_allclose(half, x, atol=1e-3)


def test_rescore_file_reads_rows_in_any_order(tmp_path):
    x = clustered_unit_vectors(1_000, 16, clusters=5, seed=6)
    spec = rescore.Rescore("fp32")
    path = tmp_path / "r"
    path.write_bytes(rescore.encode(x, spec, {}).tobytes())
    store_file = rescore.RescoreFile(path, spec, {}, 16)
    rows = np.array([[999, 0, 0], [5, 17, 999]])
    np.testing.assert_array_equal(store_file.vectors(rows), x[rows])
    scores, found = rescore.rescore_candidates(x[:2], np.array([[3, -1, 0], [1, 2, -1]]),
                                               store_file, 2)
    assert found[0].tolist() == [0, 3] and found[1][0] in (1, 2)
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-6)


def test_cli_memory_budget_and_key_errors_are_one_line(folder_6k):
    path, _ = folder_6k
    line = one_error_line(cli("build-index", "--index", path, "--memory-budget", "lots"))
    assert "is not a size" in line
    line = one_error_line(cli("build-index", "--index", path, "--index-key", "BFlat"))
    assert "Rescore(int8)" in line
    assert not (path / "index.json").exists()


def test_index_json_records_memory_and_the_summary_shows_it(folder_6k):
    path, _ = folder_6k
    result = cli("build-index", "--index", path, "--index-key", "BFlat,Rescore(int8)")
    assert result.exit_code == 0, result.output
    info = json.loads((path / "index.json").read_text())
    assert "x under float32" in result.stderr and "rescore file on disk" in result.stderr
    assert info["memory"]["float32_bytes"] == 6_000 * 32 * 4
    assert info["memory"]["build_peak_rss_bytes"] > 0


@pytest.mark.parametrize("key", ["IVF16,Flat", "BFlat,Rescore(int8)",
                                 "IVF16,PQ8x8,Rescore(fp16)"])
def test_an_update_adds_new_shards_to_a_streamed_build(tmp_path, key, monkeypatch):
    """Rows appended (new shards after the same old ones): the trained index takes them, the
    old side files go, and search covers every row."""
    x = clustered_unit_vectors(6_000, 32, clusters=40, seed=3)
    path = tmp_path / "idx"
    monkeypatch.setattr(build, "needs_streaming", lambda *args: True)
    write_embedded_folder(path, x[:4_000], shard_rows=1_000)
    first = build.run_build_index(path, index_key=key, target_recall=0.9)
    old_names = {r["name"] for r in first["side_files"].values()}
    write_embedded_folder(path, x, shard_rows=1_000)  # the same 4 shards, and 2 more
    info = build.run_build_index(path, index_key=key, target_recall=0.9)
    assert info["update"] == {"added_rows": 2_000, "previous_rows": 4_000,
                              "retrain_due": False}
    assert info["n"] == 6_000 and info["train_rows"] == first["train_rows"]
    assert info.get("calibration") == first.get("calibration")  # codecs kept, not refit
    names = {p.name for p in path.iterdir() if p.name.startswith("index.")}
    assert not old_names & names
    searchable, _ = store.load_search_index(path)
    assert searchable.ntotal == 6_000
    assert held_out_recall(searchable, x) >= info["recall"] - 0.03
    if key == "IVF16,Flat":  # every list probed: exact over old and new rows alike
        searchable.set_params({"nprobe": 16})
        _, found = searchable.search(x[3_900:4_100], 10)
        np.testing.assert_array_equal(found, brute_force(x, x[3_900:4_100], 10)[1])
    write_embedded_folder(path, np.concatenate([x, x[:7_000]]), shard_rows=1_000)
    assert build.run_build_index(path, index_key=key, target_recall=0.9)["update"][
        "retrain_due"] == (key != "BFlat,Rescore(int8)")  # BFlat has no training


def test_an_update_of_an_in_memory_index_matches_a_rebuild(tmp_path):
    x = clustered_unit_vectors(6_000, 32, clusters=40, seed=3)
    path, fresh = tmp_path / "idx", tmp_path / "fresh"
    write_embedded_folder(path, x[:5_000], shard_rows=1_000)
    build.run_build_index(path)
    write_embedded_folder(path, x, shard_rows=1_000)
    info = build.run_build_index(path)
    assert info["update"]["added_rows"] == 1_000 and info["key"] == "Flat"
    write_embedded_folder(fresh, x, shard_rows=1_000)
    build.run_build_index(fresh)
    assert_same_search(path, fresh, x[::13])
