"""A full disk, for real: each stage runs on a small tmpfs that is nearly full, and must stop
with one line `error: no space left on device writing FILE ...` and exit code 1 (no
traceback), leave no NAME.tmp behind, and leave what the folder held before readable.

The tmpfs is mounted in a mount namespace of the test's own (`unshare -m`, or `unshare -rm` as
a user without root), so a failed test leaves no mount behind; the script run there copies the
folder back out for the asserts.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.cli.app import user_errors
from pipeline.errors import DiskFull
from pipeline.folder import IndexFolder

TINY = ["--model", "random:gpt2-tiny", "--device", "cpu"]
TOKENIZE = ["--max-tokens", "128", "--shard-rows", "200"]
WORDS = ("recipe for baking bread with flour yeast and butter in the oven rocket launch to "
         "orbit the moon guitar and piano concert with a singer").split()

# A tqdm progress bar ("embed idx:  17%|█▋   | 200/1200 [00:00<00:02, ...]", "300doc [00:00,
# ...]"): what the embed stage shows on stderr while it works, not part of the error. The
# embed stage's bar can end without its newline (its set_postfix draws it before tqdm counts
# it as shown), so the error may follow it on the same line.
PROGRESS = re.compile(r"[^\r\n]*?(\d+%\|[^\r\n]*?\| \d+/\d+|\d+doc) \[[^\]\r\n]*\]")

# Mounts a tmpfs at $DISK with the folder $SEED copied in as $DISK/idx, fills it but for
# $FREE_KB, runs the command, then records what is left: its exit code and output, the *.tmp
# files and folders, and a copy of $DISK/idx.
SCRIPT = r"""
set -e
mount -t tmpfs -o size="$SIZE_KB"k tmpfs "$DISK"
if [ -n "$SEED" ]; then cp -a "$SEED" "$DISK/idx"; fi
fill=$(( $(df -k --output=avail "$DISK" | tail -1) - FREE_KB ))
if [ "$fill" -gt 0 ]; then fallocate -l "$fill"k "$DISK/filler"; fi
set +e
"$@" > "$OUT/stdout" 2> "$OUT/stderr"
echo $? > "$OUT/rc"
find "$DISK" -name '*.tmp' > "$OUT/leftover"
if [ -e "$DISK/idx" ]; then cp -a "$DISK/idx" "$OUT/after"; fi
"""


@pytest.fixture(scope="module")
def namespace(tmp_path_factory) -> list[str]:
    """The prefix that runs a command in a mount namespace of its own, where it may mount."""
    where = tmp_path_factory.mktemp("probe")
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
        if shutil.which(prefix[0]) is None:
            break
        probe = subprocess.run([*prefix, "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {where}"
                                f" && fallocate -l 4k {where}/x && df -k --output=avail {where}"],
                               capture_output=True, text=True)
        if probe.returncode == 0:
            return prefix
    pytest.skip("cannot fill a tmpfs here: `unshare -m` and `unshare -rm` cannot mount one (or "
                "fallocate, df --output are missing)")


class Outcome:
    """What a command left on the full disk."""

    def __init__(self, out: Path, disk: Path):
        self.rc = int((out / "rc").read_text())
        self.stderr = (out / "stderr").read_text()
        self.leftover = (out / "leftover").read_text().split()
        self.after = out / "after"  # the folder $DISK/idx, as the command left it
        self.disk = disk

    def error_line(self) -> str:
        """The one line on stderr; the asserts every full disk must pass."""
        assert self.rc == 1, self.stderr
        assert "Traceback" not in self.stderr, self.stderr
        lines = [line for line in re.split(r"[\r\n]+", PROGRESS.sub("\n", self.stderr))
                 if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), self.stderr
        assert self.leftover == [], self.leftover
        return lines[0]


def on_full_disk(namespace, tmp_path: Path, seed: Path | None, free_kb: int, *argv) -> Outcome:
    """Run argv (`{disk}` in it: the tmpfs) with `free_kb` left on a tmpfs that holds `seed`."""
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    out.mkdir()
    seed_kb = sum(p.stat().st_size for p in seed.rglob("*")) // 1024 if seed else 0
    env = {**os.environ, "DISK": str(disk), "SEED": str(seed or ""), "OUT": str(out),
           "SIZE_KB": str(seed_kb + 2048), "FREE_KB": str(free_kb),
           "TQDM_DISABLE": "1"}  # the bars that let it: progress is not what is tested
    argv = [str(a).replace("{disk}", str(disk)) for a in argv]
    subprocess.run([*namespace, "sh", "-c", SCRIPT, "sh", *argv], env=env, check=True,
                   cwd=Path(__file__).parent.parent, timeout=300)
    return Outcome(out, disk)


def cli(*argv) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *map(str, argv)]


def ok(*args) -> None:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """1,200 documents of 20-60 words: six token shards of ~20 kB, embeddings of ~30 kB."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    rng = np.random.default_rng(0)
    with open(path, "w") as fh:
        for i in range(1200):
            text = " ".join(rng.choice(WORDS, size=rng.integers(20, 60)))
            fh.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, corpus) -> Path:
    index = tmp_path_factory.mktemp("tokenized") / "idx"
    ok("tokenize", corpus, "--index", index, *TOKENIZE)
    return index


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenized) -> Path:
    """A whole index (embeddings, index.faiss) and a cluster report in idx/report."""
    index = tmp_path_factory.mktemp("built") / "idx"
    shutil.copytree(tokenized, index)
    ok("embed", "--index", index, *TINY)
    ok("build-index", "--index", index)
    ok("cluster", "--index", index, "--report", index / "report", "-k", "5")
    return index


def same_files(a: Path, b: Path, names) -> bool:
    return all((a / name).read_bytes() == (b / name).read_bytes() for name in names)


def test_tokenize_over_an_index(namespace, tmp_path, corpus, built):
    # Room for about one new token shard: the second fills the disk.
    got = on_full_disk(namespace, tmp_path, built, 30,
                       *cli("tokenize", corpus, "--index", "{disk}/idx", *TOKENIZE, "--force"))
    line = got.error_line()
    assert line.startswith(f"error: no space left on device writing {got.disk}/idx/tokens")
    assert ".parquet (" in line and "free there)" in line
    # The previous generation: manifest, token shards and vectors as they were.
    assert IndexFolder(got.after).manifest == IndexFolder(built).manifest
    assert same_files(got.after, built, ["manifest.json", "tokens/part-00000.parquet",
                                         "embeddings/part-00005.parquet", "index.faiss"])


def test_tokenize_embed_in_a_new_folder(namespace, tmp_path, corpus):
    # The tokenizing child process finds the disk full: its report crosses the pipe.
    got = on_full_disk(namespace, tmp_path, None, 30,
                       *cli("tokenize", corpus, "--index", "{disk}/idx", *TOKENIZE, "--embed",
                            *TINY))
    line = got.error_line()
    assert line.startswith(f"error: no space left on device writing {got.disk}/idx/")
    assert ".parquet (" in line


def test_embed(namespace, tmp_path, tokenized):
    # Room for one embedding shard (~30 kB): the second's vectors (25.6 kB) do not fit.
    got = on_full_disk(namespace, tmp_path, tokenized, 45,
                       *cli("embed", "--index", "{disk}/idx", *TINY))
    line = got.error_line()
    assert line.startswith(f"error: no space left on device writing {got.disk}/idx/embeddings/"
                           "part-00001.parquet (")
    assert IndexFolder(got.after).manifest["tokenize"] == IndexFolder(tokenized).manifest[
        "tokenize"]
    assert not (got.after / "embeddings" / "part-00001.parquet").exists()


def test_embed_refuses_vectors_that_cannot_fit(namespace, tmp_path, tokenized):
    # 200 rows x 32 float32: 25.6 kB of vectors, refused before they are written.
    got = on_full_disk(namespace, tmp_path, tokenized, 12,
                       *cli("embed", "--index", "{disk}/idx", *TINY))
    line = got.error_line()
    assert f"writing {got.disk}/idx/embeddings/part-00000.parquet (25.6 kB needed, " in line


def test_build_index(namespace, tmp_path, built):
    got = on_full_disk(namespace, tmp_path, built, 20,
                       *cli("build-index", "--index", "{disk}/idx", "--force"))
    line = got.error_line()
    assert f"{got.disk}/idx/index.faiss" in line and "no space left on device" in line.lower()
    assert IndexFolder(got.after).manifest == IndexFolder(built).manifest
    assert same_files(got.after, built, ["index.faiss", "index.json"])


def test_cluster_report_over_a_previous_one(namespace, tmp_path, built):
    # Too little room for the new clusters.parquet (13 kB) beside the old one.
    got = on_full_disk(namespace, tmp_path, built, 8,
                       *cli("cluster", "--index", "{disk}/idx", "--report", "{disk}/idx/report",
                            "-k", "5"))
    line = got.error_line()
    assert line.startswith(f"error: no space left on device writing {got.disk}/idx/report/")
    assert same_files(got.after, built, ["report/clusters.parquet", "report/clusters.json"])
    json.loads((got.after / "report" / "clusters.json").read_text())


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_similarity_matrix_out_over_a_previous_one(namespace, tmp_path, suffix):
    # 300 sentences: a 300 x 300 matrix of ~0.7 MB (Parquet) to ~0.9 MB (CSV), written a
    # block of rows at a time over the matrix.EXT written before, with 100 kB free.
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / f"matrix{suffix}").write_text("the previous matrix\n")
    sentences = [f"sentence {i} " + "word " * (i % 7) for i in range(300)]
    (tmp_path / "s.txt").write_text("\n".join(sentences) + "\n")
    got = on_full_disk(namespace, tmp_path, seed, 100,
                       *cli("similarity-matrix", tmp_path / "s.txt", "--out",
                            f"{{disk}}/idx/matrix{suffix}", *TINY))
    line = got.error_line()
    assert line.startswith(f"error: no space left on device writing {got.disk}/idx/matrix{suffix}")
    assert (got.after / f"matrix{suffix}").read_text() == "the previous matrix\n"


# Writers that do not go through pipeline/parquet.py: the CLI's user_errors turns what they
# raise on a full disk into one line naming the file.
STRAY_WRITE = """
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import typer

from pipeline.cli.app import user_errors

path, kind = Path(sys.argv[1]), sys.argv[2]


def faiss_index(path):
    import faiss

    index = faiss.IndexFlatIP(64)
    index.add(np.ones((4000, 64), np.float32))
    faiss.write_index(index, str(path))


def write_bytes(path):
    with open(path, "wb") as fh:
        fh.write(b"x" * 1_000_000)


WRITERS = {
    "np.save": lambda: np.save(path, np.ones(100_000)),
    "faiss": lambda: faiss_index(path),
    "write_text": lambda: path.write_text("x" * 1_000_000),
    "open": lambda: write_bytes(path),
    # Arrow's own file: nothing in Python holds it, so the line cannot name it.
    "pyarrow": lambda: pq.write_table(pa.table({"x": np.random.rand(100_000)}), str(path)),
}
app = typer.Typer()
app.command()(user_errors(WRITERS[kind]))
app(args=[])  # the arguments are read above
"""


@pytest.mark.parametrize("kind", ["np.save", "faiss", "write_text", "open", "pyarrow"])
def test_other_writers_are_one_line(namespace, tmp_path, kind):
    name = "out.npy" if kind == "np.save" else "out.bin"
    got = on_full_disk(namespace, tmp_path, None, 100, sys.executable, "-c", STRAY_WRITE,
                       f"{{disk}}/{name}", kind)
    line = got.error_line()
    if kind == "pyarrow":
        assert line.startswith("error: no space left on device: free some space")
    else:
        assert line.startswith(f"error: no space left on device writing {got.disk}/{name} (")


ATOMIC_JSON = """
import json, sys
from pathlib import Path
from pipeline.errors import DiskFull
from pipeline.parquet import atomic_write_json

path = Path(sys.argv[1])
try:
    atomic_write_json({"text": "x" * 1_000_000}, path)
except DiskFull as err:
    sys.exit(f"error: {err}")
"""


def test_atomic_write_json_keeps_the_old_file(namespace, tmp_path):
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "manifest.json").write_text('{"old": true}\n')
    got = on_full_disk(namespace, tmp_path, seed, 100, sys.executable, "-c", ATOMIC_JSON,
                       "{disk}/idx/manifest.json")
    line = got.error_line()
    assert line.startswith(f"error: no space left on device writing {got.disk}/idx/manifest.json")
    assert json.loads((got.after / "manifest.json").read_text()) == {"old": True}


def test_disk_full_crosses_a_pipe():
    # The tokenizing child sends its error pickled: DiskFull must come back as itself.
    err = pickle.loads(pickle.dumps(DiskFull("no space left on device writing x")))
    assert isinstance(err, DiskFull) and str(err) == "no space left on device writing x"


@pytest.mark.parametrize("error", [
    PermissionError(errno.EACCES, "Permission denied", "/x/y"),
    OSError("100 requested and 40 written"),  # a short write of no file known to be full
    RuntimeError("Error in faiss::write_index: write error in /x: 1 != 2 (Input/output error)"),
])
def test_other_os_and_runtime_errors_keep_their_traceback(error):
    test_app = typer.Typer()

    @test_app.command()
    @user_errors
    def fail():
        raise error

    result = CliRunner().invoke(test_app, [])
    assert result.exception is error
