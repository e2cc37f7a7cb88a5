"""Mixed commands on one index folder at once, for a bounded time: every command must either
succeed with the results a serial run gives, or fail with one clear line; nothing is lost or
mixed.

    python benchmarks/folder_stress.py --seconds 180      # `make stress`

Two corpora, A and B, are indexed serially first (the references). Then, for --seconds, up to
--parallel commands at a time run on one shared folder, each picked at random: tokenize A or B
(--force), embed, build-index, or search --queries --json. A search that succeeds must return,
for every query, exactly the hits of reference A or of reference B (one generation, never a
mix); any command that fails must print one `error:` line and no traceback. At the end a
serial embed + build-index must leave the folder equal to the reference of the corpus it
holds. Prints a count per command and outcome; exits 1 on any violation.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

from pipeline.folder import IndexFolder  # noqa: E402
from pipeline.hashing import file_sha256  # noqa: E402

MODEL = ["--model", "random:gpt2-tiny", "--device", "cpu"]
TOKENIZE = ["--force", "--shard-rows", 500, "--max-tokens", 64]
QUERIES = ["bread baked in the oven", "rocket launch to orbit", "a guitar concert", "number 7"]


def pipeline(*args, check: bool = False) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=ROOT,
                         capture_output=True, text=True)
    if check and run.returncode != 0:
        raise SystemExit(f"pipeline {' '.join(map(str, args))} failed:\n{run.stderr}")
    return run


def write_corpus(path: Path, words: str, n: int) -> Path:
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"{words.split()[0]}-{i}",
                                 "text": f"{words} number {i} {words.split()[i % 3]}"}) + "\n")
    return path


def build(corpus: Path, index: Path) -> None:
    pipeline("tokenize", corpus, "--index", index, *TOKENIZE, check=True)
    pipeline("embed", "--index", index, *MODEL, check=True)
    pipeline("build-index", "--index", index, check=True)


def hits(payload: list) -> list:
    """Per query, (doc_id, score rounded): what must equal a reference."""
    return [[(h["doc_id"], round(h["score"], 4)) for h in q["hits"]] for q in payload]


def search(index: Path, queries: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "search", "--queries",
                             str(queries), "--json", "-k", "5", "--index", str(index)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def start(kind: str, shared: Path, corpora: dict, queries: Path) -> subprocess.Popen:
    if kind == "search":
        return search(shared, queries)
    args = {"tokenize A": ["tokenize", corpora["A"], "--index", shared, *TOKENIZE],
            "tokenize B": ["tokenize", corpora["B"], "--index", shared, *TOKENIZE],
            "embed": ["embed", "--index", shared, *MODEL],
            "build-index": ["build-index", "--index", shared]}[kind]
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def judge(kind: str, run: subprocess.Popen, references: dict) -> tuple[str, str | None]:
    """(outcome, violation or None) of a finished command."""
    out, err = run.communicate()
    if run.returncode != 0:
        lines = err.strip().splitlines()
        if run.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"):
            return "refused", None
        return "broken", f"{kind}: exit {run.returncode}, stderr:\n{err}"
    if kind == "search" and hits(json.loads(out)) not in references.values():
        return "wrong", f"search returned a mix of generations:\n{out[:2000]}"
    return "ok", None


def folder_problems(folder: Path) -> list[str]:
    """What is inconsistent in a folder no command is writing: a recorded shard missing or
    not the bytes recorded, a shard on disk that no record names, leftover temp files."""
    index = IndexFolder(folder)
    problems = [f"{p.name} left behind" for p in folder.rglob("*.tmp")]
    recorded = {index.tokens_dir / s["name"]: s["sha256"] for s in index.token_shards}
    recorded |= {index.embeddings_dir / n: r["sha256"]
                 for n, r in index.embed.get("shards", {}).items()}
    for path, sha256 in recorded.items():
        if not path.is_file() or file_sha256(path) != sha256:
            problems.append(f"{path.parent.name}/{path.name} is not the file recorded")
    on_disk = set(index.tokens_dir.glob("*.parquet")) | set(index.embeddings_dir.glob("*.parquet"))
    problems += [f"{p.parent.name}/{p.name} is recorded nowhere" for p in on_disk - set(recorded)]
    return problems


def stress(work: Path, seconds: float, parallel: int, seed: int) -> int:
    corpora = {"A": write_corpus(work / "a.jsonl", "bread oven flour butter", 8000),
               "B": write_corpus(work / "b.jsonl", "rocket orbit moon satellite", 6000)}
    queries = work / "queries.txt"
    queries.write_text("\n".join(QUERIES) + "\n")
    references = {}
    for name, corpus in corpora.items():
        build(corpus, work / f"ref-{name}")
        references[name] = hits(json.loads(search(work / f"ref-{name}", queries)
                                            .communicate()[0]))
    shared = work / "shared"
    build(corpora["A"], shared)
    rng = random.Random(seed)
    kinds = ["tokenize A", "tokenize B", "embed", "build-index", "search", "search"]
    counts: collections.Counter = collections.Counter()
    violations = []
    deadline = time.time() + seconds
    while time.time() < deadline:  # waves of commands started together, then a check
        wave = []
        for _ in range(parallel):
            kind = rng.choice(kinds)
            wave.append((kind, start(kind, shared, corpora, queries)))
            time.sleep(rng.uniform(0, 0.3))
        for kind, run in wave:
            outcome, violation = judge(kind, run, references)
            counts[kind, outcome] += 1
            violations += [violation] if violation else []
        violations += [f"after a wave: {p}" for p in folder_problems(shared)]
    pipeline("embed", "--index", shared, *MODEL, check=True)  # finish what is left
    pipeline("build-index", "--index", shared, check=True)
    final = hits(json.loads(search(shared, queries).communicate()[0]))
    if final not in references.values():
        violations.append("after the run, the folder answers neither as A nor as B")
    for (kind, outcome), n in sorted(counts.items()):
        print(f"{kind:12} {outcome:8} {n}")
    for violation in violations:
        print("VIOLATION:", violation)
    print(f"{sum(counts.values())} commands in {seconds:.0f} s, {len(violations)} violations")
    return 1 if violations else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=180, help="how long to start commands")
    p.add_argument("--parallel", type=int, default=3, help="commands running at once")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="folder-stress-") as work:
        return stress(Path(work), args.seconds, args.parallel, args.seed)


if __name__ == "__main__":
    sys.exit(main())
