"""Commands on one index folder at once, with real second processes: writers exclude each other
and readers, readers never see a mix of two generations, a killed run leaves no helper alive,
and folders that are not ours, or manifests that are damaged, are refused with one line."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers_cli import ROOT, TINY, build_index, cli, one_error_line, write_corpus

from pipeline.errors import IndexFolderError
from pipeline.folder import IndexFolder
from pipeline.search import Searcher


class Holder:
    """Another process holding the folder's lock (`writing` for a command, or `reading`)."""

    def __init__(self, folder: Path, command: str | None):
        take = (f"lock.writing(Path(sys.argv[1]), {command!r})" if command
                else "lock.reading(Path(sys.argv[1]))")
        code = ("import sys, time; from pathlib import Path; from pipeline import lock\n"
                f"with {take}:\n    print('held', flush=True); time.sleep(60)")
        self.process = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=ROOT,
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "held"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.process.kill()
        self.process.wait()


def test_a_writer_refuses_a_folder_another_process_writes(tmp_path):
    index = build_index(tmp_path)
    before = IndexFolder(index).manifest
    with Holder(index, "embed") as holder:
        for args in (["tokenize", tmp_path / "idx.jsonl", "--index", index, "--force"],
                     ["embed", "--index", index, "--overwrite", *TINY],
                     ["build-index", "--index", index, "--force"]):
            line = one_error_line(cli(*args))
            assert f"being written by PID {holder.process.pid} (`pipeline embed`)" in line
    assert IndexFolder(index).manifest == before  # nothing was touched


def test_a_reader_refuses_a_folder_being_written(tmp_path):
    index = build_index(tmp_path)
    with Holder(index, "tokenize") as holder:
        line = one_error_line(cli("search", "bread", "--index", index))
        assert f"being written by PID {holder.process.pid} (`pipeline tokenize`)" in line
        line = one_error_line(cli("cluster", "--index", index, "-k", "2"))
        assert "being written" in line


def test_a_writer_refuses_a_folder_being_read(tmp_path):
    index = build_index(tmp_path)
    with Holder(index, None):
        line = one_error_line(cli("tokenize", tmp_path / "idx.jsonl", "--index", index,
                                  "--force"))
        assert "being read by another command" in line
        assert cli("search", "bread", "--index", index).exit_code == 0  # readers share


def test_the_lock_goes_with_a_killed_holder(tmp_path):
    index = build_index(tmp_path)
    holder = Holder(index, "embed")
    holder.process.send_signal(signal.SIGKILL)
    holder.process.wait()
    assert cli("build-index", "--index", index, "--force").exit_code == 0


def test_a_loaded_searcher_refuses_a_rewritten_folder(tmp_path):
    """A server holding a Searcher must not pair its old vectors with the new text."""
    index = build_index(tmp_path)
    searcher = Searcher(index)
    assert searcher.search(["bread"], k=3)
    other = write_corpus(tmp_path / "other.jsonl", 150, word="rocket")
    for args in (["tokenize", other, "--index", index, "--max-tokens", 64],
                 ["embed", "--index", index, *TINY], ["build-index", "--index", index]):
        assert cli(*args).exit_code == 0
    with pytest.raises(IndexFolderError, match="rewritten since"):
        searcher.search(["bread"], k=3)
    assert {h.doc_id.split("-")[0] for h in Searcher(index).search(["bread"], k=3)[0]} == \
        {"rocket"}


def run_cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_tokenize_runs_at_once_leave_one_whole_index(tmp_path):
    """Both started together: one wins, the other says so (or runs after it); the folder ends
    as a single serial run leaves it."""
    corpus = write_corpus(tmp_path / "c.jsonl", 100_000)
    serial = tmp_path / "serial"
    assert cli("tokenize", corpus, "--index", serial, "--shard-rows", 5000).exit_code == 0
    index = tmp_path / "idx"
    runs = [run_cli("tokenize", corpus, "--index", index, "--shard-rows", 5000, "--force")
            for _ in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    assert 0 in [code for code, _ in results]
    for code, stderr in results:
        assert code == 0 or (code == 1 and "is being written by PID" in stderr), stderr
    shards = IndexFolder(index).manifest["tokenize"]["shards"]
    assert shards == IndexFolder(serial).manifest["tokenize"]["shards"]
    assert sorted(p.name for p in (index / "tokens").iterdir()) == [s["name"] for s in shards]


def children_of(pid: int) -> list[int]:
    try:
        found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(c) for c in found]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_tokenize_workers_die_with_a_killed_run(tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", 400_000)
    run = run_cli("tokenize", corpus, "--index", tmp_path / "idx")
    deadline = time.time() + 60
    while time.time() < deadline and not (workers := children_of(run.pid)):
        time.sleep(0.05)
    assert workers, "the tokenize run started no workers"
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(map(alive, workers)):
        time.sleep(0.05)
    assert not any(map(alive, workers))


def test_tokenize_refuses_a_folder_that_is_not_an_index(tmp_path):
    mine = tmp_path / "photos"
    (mine / "tokens").mkdir(parents=True)
    (mine / "tokens" / "holiday.jpg").write_bytes(b"jpeg")
    (mine / "index.json").write_text("{}")
    corpus = write_corpus(tmp_path / "c.jsonl", 10)
    line = one_error_line(cli("tokenize", corpus, "--index", mine))
    assert "is not an index folder" in line
    assert (mine / "tokens" / "holiday.jpg").read_bytes() == b"jpeg"
    assert (mine / "index.json").read_text() == "{}"


def test_a_damaged_token_shard_is_not_current(tmp_path):
    index = tmp_path / "idx"
    corpus = write_corpus(tmp_path / "c.jsonl", 100)
    assert cli("tokenize", corpus, "--index", index).exit_code == 0
    shard = next((index / "tokens").glob("*.parquet"))
    good = shard.read_bytes()
    damaged = bytearray(good)
    damaged[len(good) // 2] ^= 0xFF
    shard.write_bytes(bytes(damaged))
    result = cli("tokenize", corpus, "--index", index)
    assert result.exit_code == 0 and "are current" not in result.stderr
    assert shard.read_bytes() == good


@pytest.mark.parametrize("damage,says", [
    (lambda m: "{not json", "is not valid JSON"),
    (lambda m: json.dumps({**m, "tokenize": {**m["tokenize"], "shards": "all"}}),
     "tokenize.shards is not a list"),
    (lambda m: json.dumps({k: v for k, v in m.items() if k != "tokenize"}),
     "no tokenize section"),
    (lambda m: json.dumps({**m, "embed": {**m["embed"], "shards": {"part-00000.parquet": 3}}}),
     "embed.shards is not a map"),
])
def test_a_damaged_manifest_is_one_line_naming_it(tmp_path, damage, says):
    index = build_index(tmp_path)
    manifest = index / "manifest.json"
    manifest.write_text(damage(json.loads(manifest.read_text())))
    for args in (["search", "bread", "--index", index], ["embed", "--index", index, *TINY],
                 ["build-index", "--index", index, "--force"],
                 ["cluster", "--index", index, "-k", "2"]):
        line = one_error_line(cli(*args))
        assert str(manifest) in line and says in line, line


def test_search_names_an_unreadable_token_shard(tmp_path):
    index = build_index(tmp_path)
    shard = next((index / "tokens").glob("*.parquet"))
    shard.write_bytes(b"not parquet at all" * 10)
    line = one_error_line(cli("search", "bread", "--index", index))
    assert str(shard) in line and "pipeline tokenize CORPUS --force" in line


def try_writing(folder: Path) -> int:
    """Exit code of another process that tries to take the folder's write lock."""
    code = ("import sys; from pathlib import Path; from pipeline import lock\n"
            "with lock.writing(Path(sys.argv[1]), 'embed'):\n    pass")
    return subprocess.run([sys.executable, "-c", code, str(folder)], cwd=ROOT,
                          capture_output=True).returncode


def test_each_thread_holds_its_own_read_lock(tmp_path):
    """A server's threads read at once: the first to finish must not release the others'."""
    import threading

    from pipeline import lock

    folder = tmp_path / "idx"
    folder.mkdir()
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()

    def first():
        with lock.reading(folder):
            first_in.set()
            second_in.wait(10)
        first_out.set()

    thread = threading.Thread(target=first)
    thread.start()
    first_in.wait(10)
    with lock.reading(folder):
        second_in.set()
        first_out.wait(10)
        assert try_writing(folder) != 0  # this thread still reads
    thread.join()
    assert try_writing(folder) == 0
