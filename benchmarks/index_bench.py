"""Indexes past memory (issue 18): streamed builds under a memory budget, and compressed codes.

    python benchmarks/index_bench.py large [--rows 10000000] [--memory-budget 2GB] [--out F]
    python benchmarks/index_bench.py compressed [--index indexes/default] [--out F]
    python benchmarks/index_bench.py update [--ivf-key IVF256,Flat] [--out F]

`large`: N synthetic vectors (below) are built into an index by the same streamed build as
`pipeline build-index` (pipeline/index/streamed.py) under the budget, in a child process whose
peak RSS (VmHWM) is read at its end; then a second child loads the index as search does
(on-disk lists mapped) and measures, on held-out queries that are not in the index (other
draws of the generator), recall@10 against exact float search (streamed over all N), QPS at
batch 1 and 256, and its RSS. The index's files and sizes are reported.

Synthetic vectors with the structure of real ones: each is a real embedding of the default
corpus (indexes/default; `make index` first) plus Gaussian noise shaped by those embeddings'
own covariance (so the noise lies in the directions the model uses, at their variances),
scaled by --noise, normalised. Shard s of 50,000 rows is a pure function of (seed, s), so
both passes of the build and the exact search see the same vectors without storing them.

`update`: the default corpus split into its first 90% and last 10% of documents (two Parquet
files): a folder made from the 90% (set-up, not timed) gets the 10% file added and runs
tokenize, embed and build-index again (the update), against a fresh folder made from both
files in the same run (the full rebuild); both with the default Flat index and with an IVF
one (--ivf-key), compared by their search results (Flat: the same rows and scores) and
recall. Each stage is a `pipeline` command, timed from outside.

`compressed`: on the default index's own vectors, `BFlat,Rescore(int8)` (binary codes in
memory, calibrated int8 on disk) against exact float search (Flat): recall@10 on held-out
rows, RAM of each, and QPS of each at batch 1 and 256 in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARD_ROWS = 50_000


def status_bytes(field: str, pid: str = "self") -> int:
    """A /proc/PID/status field (VmHWM, VmRSS, RssAnon, RssFile) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class SyntheticSource:
    """N unit vectors around the real ones (see the module docstring), in shards."""

    def __init__(self, real: np.ndarray, n: int, noise: float, seed: int):
        self.real, self.n, self.dim, self.noise, self.seed = real, n, real.shape[1], noise, seed
        centred = real - real.mean(axis=0)
        cov = centred.T @ centred / len(real)
        values, vectors = np.linalg.eigh(cov)
        self.shape = (vectors * np.sqrt(np.maximum(values, 0))) @ vectors.T  # cov^(1/2)

    def block(self, number: int, rows: int, stream: int = 0) -> np.ndarray:
        rng = np.random.default_rng([self.seed, stream, number])
        anchors = self.real[rng.integers(len(self.real), size=rows)]
        z = rng.standard_normal((rows, self.dim), dtype=np.float32)
        x = anchors + self.noise * (z @ self.shape.astype(np.float32))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def shards(self):
        for number, first in enumerate(range(0, self.n, SHARD_ROWS)):
            yield first, self.block(number, min(SHARD_ROWS, self.n - first))


def real_vectors(index_dir: Path) -> np.ndarray:
    from pipeline.folder import IndexFolder

    folder = IndexFolder(index_dir)
    if not folder.exists():
        sys.exit(f"{index_dir} has no index folder: run `make index` first")
    return folder.load_vectors()


# -- large: build (child) ---------------------------------------------------------------------

def build_child(args) -> None:
    import faiss

    from pipeline.index import streamed
    from pipeline.index.choice import choose_index_key, parse_bytes

    budget = parse_bytes(args.memory_budget)
    source = SyntheticSource(real_vectors(args.index), args.rows, args.noise, args.seed)
    key = args.key or choose_index_key(args.rows, source.dim, budget)
    out = Path(args.work)
    start = time.perf_counter()
    last = [0.0]

    def progress(message: str) -> None:
        now = time.perf_counter()
        if now - last[0] > 30 or not message.startswith("adding"):
            print(f"  [{now - start:7.1f} s, RSS {status_bytes('VmRSS') / 1e9:.2f} GB] "
                  f"{message}", file=sys.stderr, flush=True)
            last[0] = now

    built = streamed.build_streamed(source, key, out, memory_budget=budget,
                                    target_recall=args.target_recall, progress=progress)
    faiss.write_index(built.index, str(out / "index.faiss"))
    info = {**built.info, "build_seconds": round(time.perf_counter() - start, 1),
            "build_peak_rss_bytes": status_bytes("VmHWM"),
            "side_files": {role: {"name": p.name, "bytes": p.stat().st_size}
                           for role, p in (("ivfdata", built.ivfdata),
                                           ("rescore", built.rescore_path)) if p}}
    (out / "index.json").write_text(json.dumps(info, indent=2))


# -- large: search (child) --------------------------------------------------------------------

def search_child(args) -> None:
    import faiss

    from pipeline.index import rescore as rs
    from pipeline.index import store, streamed
    from pipeline.index.recall import RECALL_K, recall_at_k

    out = Path(args.work)
    info = json.loads((out / "index.json").read_text())
    rss_before = status_bytes("VmRSS")
    start = time.perf_counter()
    index = store.read_index_file(out / "index.faiss", info)
    store.apply_index_params(index, info["params"])
    _, rescore = rs.split_key(info["key"])
    rescore_file = None
    if rescore is not None:
        rescore_file = rs.RescoreFile(out / info["side_files"]["rescore"]["name"], rescore,
                                      info["calibration"], info["dim"])
    searchable = streamed.SearchIndex(index, rescore_file, info.get("calibration"))
    searchable.set_params(info["params"])
    load_seconds = time.perf_counter() - start
    rss_loaded = status_bytes("VmRSS")

    truth = np.load(out / "truth.npz")
    queries, truth_ids = truth["queries"], truth["ids"]
    threads = faiss.omp_get_max_threads()

    faiss.omp_set_num_threads(1)
    t = time.perf_counter()
    found1 = np.concatenate([searchable.search(q[None], RECALL_K)[1] for q in queries])
    qps1 = len(queries) / (time.perf_counter() - t)
    faiss.omp_set_num_threads(threads)
    t = time.perf_counter()
    found256 = np.concatenate([searchable.search(queries[i:i + 256], RECALL_K)[1]
                               for i in range(0, len(queries), 256)])
    qps256 = len(queries) / (time.perf_counter() - t)
    result = {
        "recall_at_10": round(recall_at_k(found256, truth_ids, RECALL_K), 4),
        "recall_at_10_batch1": round(recall_at_k(found1, truth_ids, RECALL_K), 4),
        "qps_batch_1": round(qps1, 1), "qps_batch_256": round(qps256, 1),
        "load_seconds": round(load_seconds, 2),
        "rss_before_load_bytes": rss_before, "rss_after_load_bytes": rss_loaded,
        "rss_after_search_bytes": status_bytes("VmRSS"),
        "rss_anon_bytes": status_bytes("RssAnon"), "rss_file_bytes": status_bytes("RssFile"),
        "search_peak_rss_bytes": status_bytes("VmHWM"), "queries": len(queries),
        "threads": threads,
    }
    (out / "search.json").write_text(json.dumps(result, indent=2))


def truth_child(args) -> None:
    """Held-out queries (other draws of the generator: not in the index) and their exact top
    10 over all N, streamed; in a process of its own so that search's RSS is the index's."""
    from pipeline.index.recall import RECALL_K, exact_neighbours

    source = SyntheticSource(real_vectors(args.index), args.rows, args.noise, args.seed)
    queries = source.block(0, args.queries, stream=1)
    start = time.perf_counter()
    scores, ids = exact_neighbours((b for _, b in source.shards()), queries, RECALL_K)
    np.savez(Path(args.work) / "truth.npz", queries=queries, ids=ids, scores=scores,
             seconds=time.perf_counter() - start)


def large(args) -> dict:
    work = Path(args.work or tempfile.mkdtemp(prefix="index_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    common = ["--rows", str(args.rows), "--noise", str(args.noise), "--seed", str(args.seed),
              "--index", str(args.index), "--work", str(work)]
    me = [sys.executable, __file__]
    subprocess.run(me + ["_build", *common, "--memory-budget", args.memory_budget,
                         "--target-recall", str(args.target_recall)]
                   + (["--key", args.key] if args.key else []), check=True)
    subprocess.run(me + ["_truth", *common, "--queries", str(args.queries)], check=True)
    subprocess.run(me + ["_search", *common], check=True)
    truth = np.load(work / "truth.npz")
    real = real_vectors(args.index)
    sample = real[np.random.default_rng(0).choice(len(real), 2000, replace=False)]
    from pipeline.index.recall import exact_neighbours

    real_top = exact_neighbours(real, sample, 2)[0][:, 1]  # own row first
    info = json.loads((work / "index.json").read_text())
    search = json.loads((work / "search.json").read_text())
    files = {p.name: p.stat().st_size for p in work.iterdir()
             if p.is_file() and p.name.startswith("index.")}
    in_ram = files["index.faiss"] + info["side_files"].get("ivfdata", {}).get("bytes", 0)
    return {"rows": args.rows, "dim": info["dim"], "key": info["key"],
            "params": info["params"], "memory_budget": args.memory_budget,
            "build_seconds": info["build_seconds"], "build_stage_seconds": info["seconds"],
            "build_peak_rss_bytes": info["build_peak_rss_bytes"],
            "tuned_recall_held_out_rows": info["recall"], "index_bytes": in_ram,
            "rescore_bytes": info["side_files"].get("rescore", {}).get("bytes", 0),
            "float32_bytes": args.rows * info["dim"] * 4, "files": files, **search,
            "exact_truth_seconds": round(float(truth["seconds"]), 1),
            # How near neighbours are: the synthetic queries' against the real corpus's own
            "top1_cosine_median": round(float(np.median(truth["scores"][:, 0])), 4),
            "real_corpus_top1_cosine_median": round(float(np.median(real_top)), 4),
            "work": str(work)}


# -- compressed -------------------------------------------------------------------------------

def compressed(args) -> dict:
    import shutil

    import faiss

    from pipeline.folder import IndexFolder
    from pipeline.index.build import build_folder_index
    from pipeline.index.recall import RECALL_K, drop_self, held_out_truth, recall_at_k
    from pipeline.index.store import load_search_index

    work = Path(tempfile.mkdtemp(prefix="compressed_bench_"))
    results = {}
    vectors = IndexFolder(args.index).load_vectors()
    rows = np.sort(np.random.default_rng(123).choice(len(vectors), args.queries, replace=False))
    _, truth = held_out_truth(vectors, rows, RECALL_K)
    queries = vectors[rows]
    for key in ("Flat", "BFlat,Rescore(int8)"):
        folder = work / key.replace(",", "_").replace("(", "").replace(")", "")
        shutil.copytree(args.index, folder, ignore=shutil.ignore_patterns("index.*"))
        t = time.perf_counter()
        info = build_folder_index(folder, index_key=key, force=True)
        build_seconds = time.perf_counter() - t
        searchable, _ = load_search_index(IndexFolder(folder))
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        searchable.search(queries[:8], RECALL_K + 1)  # warm the page cache and code paths
        t = time.perf_counter()
        for q in queries:
            searchable.search(q[None], RECALL_K + 1)
        qps1 = len(queries) / (time.perf_counter() - t)
        faiss.omp_set_num_threads(threads)
        t = time.perf_counter()
        found = np.concatenate([searchable.search(queries[i:i + 256], RECALL_K + 1)[1]
                                for i in range(0, len(queries), 256)])
        qps256 = len(queries) / (time.perf_counter() - t)
        found = drop_self(found, rows, RECALL_K)
        results[key] = {"recall_at_10": round(recall_at_k(found, truth, RECALL_K), 4),
                        "params": info["params"], "index_bytes": info["memory"]["index_bytes"],
                        "rescore_bytes": info["memory"]["rescore_bytes"],
                        "qps_batch_1": round(qps1, 1), "qps_batch_256": round(qps256, 1),
                        "build_seconds": round(build_seconds, 2)}
    flat, binary = results["Flat"], results["BFlat,Rescore(int8)"]
    results["memory_ratio"] = round(flat["index_bytes"] / binary["index_bytes"], 1)
    results["speedup_batch_1"] = round(binary["qps_batch_1"] / flat["qps_batch_1"], 2)
    results["speedup_batch_256"] = round(binary["qps_batch_256"] / flat["qps_batch_256"], 2)
    results["rows"], results["dim"] = len(vectors), vectors.shape[1]
    shutil.rmtree(work, ignore_errors=True)
    return results


def pipeline_command(*args) -> float:
    """Seconds a `pipeline` command takes, run as a user runs it."""
    venv = ROOT / ".venv" / "bin" / "pipeline"
    start = time.perf_counter()
    subprocess.run([str(venv) if venv.exists() else "pipeline", *map(str, args)], check=True,
                   capture_output=True)
    return time.perf_counter() - start


def tokens_and_vectors(corpus: Path, folder: Path) -> dict:
    return {"tokenize": pipeline_command("tokenize", corpus, "--index", folder),
            "embed": pipeline_command("embed", "--index", folder)}


def update(args) -> dict:
    """See the module docstring. The embeddings do not depend on the index, so each side
    embeds once and copies the folder per index key; each key's total is that side's tokenize
    + embed + its own build-index."""
    import shutil

    import pyarrow.parquet as pq

    from pipeline.folder import IndexFolder
    from pipeline.index.store import load_search_index

    work = Path(tempfile.mkdtemp(prefix="update_bench_"))
    table = pq.read_table(ROOT / "data_sets" / "debian_packages.parquet")
    cut = int(table.num_rows * 0.9)
    grown, both = work / "grown", work / "both"
    grown.mkdir()
    both.mkdir()
    pq.write_table(table.slice(0, cut), grown / "a.parquet")
    shutil.copy(grown / "a.parquet", both / "a.parquet")
    pq.write_table(table.slice(cut), both / "b.parquet")
    keys = ["Flat", args.ivf_key]
    # set-up: the folders before the corpus grew, one per key
    tokens_and_vectors(grown, work / "base")
    for key in keys:
        shutil.copytree(work / "base", work / f"update-{key}")
        pipeline_command("build-index", "--index", work / f"update-{key}", "--index-key", key)
    shutil.copy(both / "b.parquet", grown / "b.parquet")
    full_shared = tokens_and_vectors(both, work / "full")
    results = {"documents_before": cut, "documents_added": table.num_rows - cut,
               "full_tokenize_embed_s": {k: round(v, 2) for k, v in full_shared.items()}}
    for key in keys:
        old, new = work / f"update-{key}", work / f"full-{key}"
        updated = tokens_and_vectors(grown, old)
        updated["build-index"] = pipeline_command("build-index", "--index", old,
                                                  "--index-key", key)
        shutil.copytree(work / "full", new)
        full = {**full_shared, "build-index": pipeline_command("build-index", "--index", new,
                                                                "--index-key", key)}
        a, a_info = load_search_index(IndexFolder(old))
        b, b_info = load_search_index(IndexFolder(new))
        rows = IndexFolder(new).rows
        queries = IndexFolder(new).vectors_at(np.arange(0, rows, 53))
        sa, ia = a.search(queries, 10)
        sb, ib = b.search(queries, 10)
        results[key] = {
            "update_s": {k: round(v, 2) for k, v in updated.items()},
            "update_total_s": round(sum(updated.values()), 1),
            "full_total_s": round(sum(full.values()), 1),
            "update_over_full": round(sum(updated.values()) / sum(full.values()), 3),
            "build_index_update_over_full": round(updated["build-index"] / full["build-index"],
                                                  3),
            "same_rows_as_full": bool((ia == ib).all()),
            "max_score_difference": float(np.abs(sa - sb).max()),
            "recall_update": a_info["recall"], "recall_full": b_info["recall"],
            "update_record": a_info.get("update"), "rows": a_info["n"],
            "queries": len(queries),
        }
    shutil.rmtree(work, ignore_errors=True)
    return results


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["large", "compressed", "update", "_build", "_truth",
                                         "_search"])
    parser.add_argument("--ivf-key", default="IVF256,Flat")
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--memory-budget", default="2GB")
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--key", default=None)
    parser.add_argument("--noise", type=float, default=0.75)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--index", type=Path, default=ROOT / "indexes" / "default")
    parser.add_argument("--work", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.mode == "_build":
        return build_child(args)
    if args.mode == "_search":
        return search_child(args)
    if args.mode == "_truth":
        return truth_child(args)
    result = {"large": large, "compressed": compressed, "update": update}[args.mode](args)
    result = {"mode": args.mode, "cpu": cpu_name(), "cores": os.cpu_count(), **result}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
