"""Spherical k-means over an index folder's documents (or rows), and the cluster report.

What is clustered, a "unit", is a document by default: a long document is several rows (its
overlapping windows, each with its own vector), and a document's vector is the mean of its
rows' unit vectors, re-normalised. With `rows=True` (`cluster --rows`) each row is a unit.

Memory stays bounded by streaming the embedding shards: k-means trains on a uniform random
sample (`sample` units), then every shard's units are assigned to their nearest centroid in
turn; only per-unit labels and similarities (a few bytes each) are kept for the whole corpus.
The near-duplicate search compares shards' units pairwise with FAISS range search, so it
holds at most two shards at a time.

Outputs (in the report folder, or `INDEX/clusters/` without one), one entry per unit:
    clusters.parquet  documents: id (doc_id), row (its first row), rows (how many), cluster,
                      similarity (cosine to its centroid); rows: row, id, chunk, cluster,
                      similarity
    centroids.npy     (k, dim) float32, unit length; row c is cluster c
    clusters.json     settings, sizes, cohesion, representatives (positions in
                      clusters.parquet), the k curve, timings, the vectors' identity
    report.html, report.md, *.png, near_duplicates.parquet   (with a report folder only)

Clusters are numbered by size, largest first, so cluster 0 is the biggest in every output.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.analysis import report as rpt
from pipeline.analysis.metrics import unit_rows
from pipeline.errors import MissingExtra, UsageError, pip_install
from pipeline.folder import IndexFolder, sample_rows
from pipeline.parquet import atomic_open, atomic_write_json, atomic_write_table

log = logging.getLogger(__name__)

CLUSTERS_FILE = "clusters.parquet"
CENTROIDS_FILE = "centroids.npy"
SUMMARY_FILE = "clusters.json"
DUPLICATES_FILE = "near_duplicates.parquet"

NITER = 25  # faiss's default; spherical k-means on text embeddings settles well before
# Lloyd's iterations cannot move a centroid across a gap between well-separated groups, so a
# bad start (two seeds in one group) stays bad: random seeding of 8 equal groups almost always
# is one. k-means++ seeding, best of NREDO runs, recovered such groups in 150 of 150 trials.
NREDO = 3
SELECT_TRAIN_ROWS = 20_000  # k-means runs per candidate k during `-k auto`
SILHOUETTE_ROWS = 4_000  # silhouette is quadratic in rows: 4k rows = 16M pairs per k
MAP_ROWS = 6_000  # points on the 2-D map; more only blurs it
REPRESENTATIVES = 5
TOP_WORDS = 10
NEIGHBOURS = 3
DUPLICATE_GROUPS_SHOWN = 20
MAX_DUPLICATE_PAIRS = 2_000_000  # a threshold so low that it finds more is a mistake


# ---------------------------------------------------------------------------------------------
# Pure functions: vectors and labels in, numbers out


@dataclass(frozen=True)
class Units:
    """What is clustered: unit u is rows bounds[u]:bounds[u + 1] of the index; one row each,
    or one document's windows (consecutive rows with its doc_id, chunk 0, 1, ...)."""

    name: str  # "documents" or "rows": the word every message and report uses for a unit
    bounds: np.ndarray  # (units + 1,) int64, 0 .. the number of rows
    documents: int  # documents in the index, whichever is clustered
    doc_ids: pa.ChunkedArray  # per row
    chunks: pa.ChunkedArray  # per row

    def __len__(self) -> int:
        return len(self.bounds) - 1

    @property
    def rows(self) -> int:
        return int(self.bounds[-1])

    @property
    def first_rows(self) -> np.ndarray:
        return self.bounds[:-1]

    @property
    def pooled(self) -> bool:
        return len(self) != self.rows

    def per_row(self, values: np.ndarray) -> np.ndarray:
        """A per-unit array spread over the unit's rows."""
        return np.repeat(values, np.diff(self.bounds))


def document_bounds(doc_ids: pa.ChunkedArray, chunks: pa.ChunkedArray) -> np.ndarray:
    """Row offsets of the documents, and the row count last. A document starts at chunk 0, or
    where the doc_id changes (a folder whose ids repeat still splits at chunk 0)."""
    n = len(chunks)
    starts = chunks.to_numpy() == 0
    if n:
        starts[0] = True
    if n > 1:
        changed = pc.not_equal(doc_ids.slice(1), doc_ids.slice(0, n - 1))
        starts[1:] |= pc.fill_null(changed, True).to_numpy()
    return np.append(np.flatnonzero(starts), n).astype(np.int64)


def make_units(doc_ids: pa.ChunkedArray | Sequence[str], chunks: pa.ChunkedArray | Sequence[int],
               by_rows: bool = False) -> Units:
    """The documents of an index (from its rows' doc_id and chunk), or with by_rows its rows."""
    if not isinstance(doc_ids, pa.ChunkedArray):
        doc_ids = pa.chunked_array([pa.array(doc_ids, pa.string())])
    if not isinstance(chunks, pa.ChunkedArray):
        chunks = pa.chunked_array([pa.array(chunks, pa.int32())])
    documents = document_bounds(doc_ids, chunks)
    if by_rows:
        return Units("rows", np.arange(len(chunks) + 1, dtype=np.int64), len(documents) - 1,
                     doc_ids, chunks)
    return Units("documents", documents, len(documents) - 1, doc_ids, chunks)


def pool_rows(vectors: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Unit vectors of groups of rows: group g is rows offsets[g]:offsets[g + 1] of vectors,
    its vector the mean of its rows' unit vectors, re-normalised (so a long document's windows
    weigh alike, whatever their stored lengths)."""
    if len(offsets) - 1 == len(vectors):  # one row each: nothing to pool
        return unit_rows(vectors)
    return unit_rows(np.add.reduceat(unit_rows(vectors), offsets[:-1], axis=0))


def pool_blocks(shards: Iterable[tuple[int, np.ndarray]], bounds: np.ndarray
                ) -> Iterator[tuple[int, np.ndarray]]:
    """(first unit, unit vectors) of the units that end in each (first_row, vectors) block of
    consecutive rows. A unit cut by a block's end waits for the next block, so a document's
    windows may span shards; a block that ends no unit yields nothing."""
    carry_first, carry = 0, None
    for first, vectors in shards:
        if carry is not None and len(carry):
            first, vectors = carry_first, np.concatenate([carry, vectors])
        end = first + len(vectors)
        lo = int(np.searchsorted(bounds, first))  # bounds[lo] == first
        hi = int(np.searchsorted(bounds, end, side="right")) - 1  # units lo..hi-1 end by `end`
        done = int(bounds[hi]) - first
        if hi > lo:
            yield lo, pool_rows(vectors[:done], bounds[lo:hi + 1] - first)
        carry_first, carry = int(bounds[hi]), vectors[done:]


@contextmanager
def _threads_for(multiply_adds: float):
    """Run small faiss calls on one thread: OpenMP's start-up and spin-waiting cost more than
    a small problem takes, and far more on a busy machine (docs/performance.md, Analysis)."""
    if multiply_adds >= 1e7:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _flat_ip(dim: int):
    index = faiss.IndexFlatIP(dim)
    if faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    return index


def train_spherical_kmeans(x: np.ndarray, k: int, seed: int = 0, niter: int = NITER,
                           nredo: int = NREDO) -> np.ndarray:
    """(k, dim) unit-length centroids of the unit-length rows of x (cosine k-means)."""
    if not 1 <= k <= len(x):
        raise UsageError(f"k={k} needs between 1 and {len(x)} clusters (one per vector at most)")
    options = {"niter": niter, "nredo": nredo, "seed": seed, "spherical": True,
               # only gates a warning printed from C++ for small inputs
               "min_points_per_centroid": 1}
    if hasattr(faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS"):  # older faiss: random seeds
        options["init_method"] = faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS
    km = faiss.Kmeans(x.shape[1], k, gpu=faiss.get_num_gpus() > 0, **options)
    with _threads_for(x.size * k):
        km.train(np.ascontiguousarray(x, dtype=np.float32))
    return unit_rows(km.centroids)


def nearest_centroid(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels int32, cosine similarity float32) of each unit-length row's nearest centroid."""
    index = _flat_ip(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    with _threads_for(x.size * len(centroids)):
        sims, ids = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return ids[:, 0].astype(np.int32), sims[:, 0]


def silhouette_cosine(x: np.ndarray, labels: np.ndarray, block: int = 1024) -> float:
    """Mean silhouette with cosine distance (1 - x.y) of unit-length rows.

    For each point, a = mean distance to the other members of its cluster and b = the
    smallest mean distance to another cluster; s = (b - a) / max(a, b), 0 for singletons
    (as in scikit-learn). Per-cluster distance sums come from one matrix product per block
    of rows against a one-hot label matrix, so nothing loops over pairs in Python.
    """
    labels = np.asarray(labels)
    ids, labels = np.unique(labels, return_inverse=True)
    if len(ids) < 2:
        return float("nan")
    n = len(x)
    onehot = np.zeros((n, len(ids)), np.float64)
    onehot[np.arange(n), labels] = 1
    counts = onehot.sum(0)
    scores = np.zeros(n)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        dist = 1.0 - x[lo:hi].astype(np.float64) @ x.T.astype(np.float64)  # (b, n)
        np.clip(dist, 0, None, out=dist)
        sums = dist @ onehot  # (b, clusters): total distance to each cluster
        own = labels[lo:hi]
        rows = np.arange(hi - lo)
        own_count = counts[own]
        # The point's distance to itself is ~0 but may round to a tiny number: remove it.
        a = (sums[rows, own] - dist[rows, np.arange(lo, hi)]) / np.maximum(own_count - 1, 1)
        mean_other = sums / counts
        mean_other[rows, own] = np.inf
        b = mean_other.min(1)
        s = (b - a) / np.maximum(np.maximum(a, b), 1e-12)
        scores[lo:hi] = np.where(own_count > 1, s, 0.0)
    return float(scores.mean())


def auto_k_candidates(n: int, k_min: int = 2, k_max: int | None = None) -> list[int]:
    """The k to try: every k up to 10, where one more cluster changes the picture, then a
    geometric grid (about 10 steps) up to k_max.

    The default top, sqrt(n) capped at 100, keeps clusters big enough to read: a report of
    hundreds of clusters is not something a person looks through.
    """
    if k_max is None:
        k_max = min(100, int(math.sqrt(n)))
    k_max = max(k_min, min(k_max, n - 1))
    small = range(k_min, min(k_max, 10) + 1)
    large = np.geomspace(10, k_max, 11) if k_max > 10 else []
    return sorted({*small, *(int(round(k)) for k in large)})


def choose_k(curve: Sequence[tuple[int, float]]) -> int:
    """The k of the highest score; on a tie, the smaller k (fewer clusters read easier)."""
    valid = [(k, s) for k, s in curve if not math.isnan(s)]
    if not valid:
        raise ValueError("no k could be scored")
    return min(valid, key=lambda ks: (-ks[1], ks[0]))[0]


def size_order(labels: np.ndarray, k: int) -> np.ndarray:
    """new_id[old_id]: clusters renumbered by size, largest first (stable on ties)."""
    sizes = np.bincount(labels, minlength=k)
    order = np.argsort(-sizes, kind="stable")
    new_id = np.empty(k, np.int32)
    new_id[order] = np.arange(k, dtype=np.int32)
    return new_id


def top_rows_per_cluster(labels: np.ndarray, sims: np.ndarray, k: int,
                         m: int) -> list[np.ndarray]:
    """Per cluster, the (up to) m rows most similar to its centroid, most similar first."""
    order = np.lexsort((-sims, labels))  # by cluster, then by similarity descending
    starts = np.searchsorted(labels[order], np.arange(k + 1))
    return [order[starts[c]: min(starts[c] + m, starts[c + 1])] for c in range(k)]


def cluster_neighbours(centroids: np.ndarray, m: int) -> list[list[tuple[int, float]]]:
    """Per cluster, the m other clusters whose centroids are most similar (cosine)."""
    sims = centroids @ centroids.T
    np.fill_diagonal(sims, -np.inf)
    m = min(m, len(centroids) - 1)
    out = []
    for row in sims:
        best = np.argsort(-row, kind="stable")[:m]
        out.append([(int(j), float(row[j])) for j in best])
    return out


def pca_2d(x: np.ndarray) -> np.ndarray:
    """(n, 2) projection on the two leading principal axes (SVD of the centred rows)."""
    centred = x - x.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


def umap_2d(x: np.ndarray, seed: int) -> np.ndarray:
    try:
        import umap
    except ImportError:
        raise MissingExtra(f"--projection umap needs umap-learn: {pip_install('umap')}") from None
    # random_state makes it reproducible and single-threaded (n_jobs=1 says so, silencing
    # umap-learn's warning about it)
    return umap.UMAP(n_components=2, metric="cosine", random_state=seed,
                     n_jobs=1).fit_transform(x)


# Words, not BPE pieces: a lowercase word may join letters, digits and inner hyphens
# ("command-line", "x11", "python3"); it must start with a letter, so numbers drop out.
WORD_RE = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
STOP_WORD_TEXT = """
a about above after again against all almost also although am among an and another any are
aren as at be because been before being below between both but by can cannot could couldn
did didn do does doesn doing don down during each either else etc even ever every few for
from further had has hasn have haven having he her here hers herself him himself his how
however i ie if in into is isn it its itself just least less let like ll many may me might
more most much must my myself neither no nor not now of off often on once one only or other
others otherwise our ours ourselves out over own per rather re same shall she should
shouldn since so some such than that the their theirs them themselves then there therefore
these they this those though through thus to too under until up upon us use used uses using
ve very via was wasn we well were weren what when where whether which while who whom whose
why will with within without would wouldn yet you your yours yourself yourselves
"""
STOP_WORDS = frozenset(STOP_WORD_TEXT.split())


def words(text: str) -> list[str]:
    """Lowercase words of at least 2 characters, stop words removed."""
    return [w for w in WORD_RE.findall(text.lower()) if len(w) > 1 and w not in STOP_WORDS]


def class_tfidf(counts: Sequence[Counter], top: int = TOP_WORDS) -> list[list[tuple[str, float]]]:
    """Most distinctive words per class by class-based TF-IDF (as in BERTopic).

    All documents of a class are one document: weight(t, c) = tf(t, c) * log(1 + A / f(t)),
    with tf the word's share of the class's words, f(t) its count over all classes and A
    the mean number of words per class. A word frequent in one class and rare elsewhere
    wins; one frequent everywhere (a corpus-wide stop word) scores low everywhere.
    """
    overall: Counter = Counter()
    for c in counts:
        overall.update(c)
    sizes = [sum(c.values()) for c in counts]
    nonempty = [s for s in sizes if s]
    if not nonempty:
        return [[] for _ in counts]
    mean_words = sum(nonempty) / len(nonempty)
    out = []
    for c, size in zip(counts, sizes, strict=True):
        scores = ((n / size * math.log(1 + mean_words / overall[w]), w) for w, n in c.items())
        out.append([(w, s) for s, w in heapq.nlargest(top, scores)])
    return out


def range_pairs(query: np.ndarray, query_first: int, base: np.ndarray, base_first: int,
                threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i < j) of global rows with cosine >= threshold between two blocks of rows.

    FAISS's exact inner-product range search finds them without listing all pairs; keeping
    only i < j drops self-matches and, for a block against itself, each pair's mirror.
    """
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(np.ascontiguousarray(base, dtype=np.float32))
    with _threads_for(query.size * len(base)):
        lims, sims, ids = index.range_search(np.ascontiguousarray(query, dtype=np.float32),
                                             float(threshold))
    i = np.repeat(np.arange(len(query), dtype=np.int64), np.diff(lims).astype(np.int64))
    i += query_first
    j = ids.astype(np.int64) + base_first
    keep = i < j
    return i[keep], j[keep], sims[keep]


def group_pairs(i: np.ndarray, j: np.ndarray) -> list[np.ndarray]:
    """Connected groups of rows linked by pairs (union-find), largest first, rows sorted."""
    if len(i) == 0:
        return []
    nodes, inverse = np.unique(np.concatenate([i, j]), return_inverse=True)
    a, b = inverse[: len(i)], inverse[len(i):]
    parent = list(range(len(nodes)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving keeps the trees shallow
            x = parent[x]
        return x

    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        rx, ry = find(x), find(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    roots = np.array([find(x) for x in range(len(nodes))])
    order = np.argsort(roots, kind="stable")
    bounds = np.flatnonzero(np.diff(roots[order])) + 1
    groups = [nodes[g] for g in np.split(order, bounds)]
    groups.sort(key=lambda g: (-len(g), g[0]))
    return groups


def group_similarities(groups: list[np.ndarray], i: np.ndarray, j: np.ndarray,
                       sims: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[int, float]]:
    """Per group the lowest and highest similarity of the pairs that joined it, and per row
    the similarity of its closest duplicate."""
    group_of = np.full(max(int(j.max()), int(i.max())) + 1 if len(i) else 0, -1)
    for g, rows in enumerate(groups):
        group_of[rows] = g
    lo = np.full(len(groups), np.inf)
    hi = np.full(len(groups), -np.inf)
    np.minimum.at(lo, group_of[i], sims)
    np.maximum.at(hi, group_of[i], sims)
    rows, row_sims = np.concatenate([i, j]), np.concatenate([sims, sims])
    best: dict[int, float] = {}
    for r, s in zip(rows.tolist(), row_sims.tolist(), strict=True):
        best[r] = max(s, best.get(r, s))
    return lo, hi, best


# ---------------------------------------------------------------------------------------------
# I/O: shards in, files out


@contextmanager
def timed(stage: str, seconds: dict[str, float]):
    start = time.perf_counter()
    yield
    seconds[stage] = round(time.perf_counter() - start, 2)
    log.info("%s: %.2f s", stage, seconds[stage])


def _progress(total: int, desc: str, unit: str = "row"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr,
                leave=False, disable=None)


def unit_blocks(folder: IndexFolder, units: Units | None = None
                ) -> Iterator[tuple[int, np.ndarray]]:
    """(first unit, unit vectors) per embedding shard, in order; units None: the rows."""
    shards = folder.vector_shards()
    if units is None or not units.pooled:
        return ((first, unit_rows(vectors)) for first, vectors in shards)
    return pool_blocks(shards, units.bounds)


def read_sample(folder: IndexFolder, units: Units, size: int,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted units, unit-length vectors) of a uniform random sample, shard by shard."""
    picked = sample_rows(len(units), size, seed)
    parts = []
    with _progress(len(units), "sample", unit=units.name[:-1]) as bar:
        for first, vectors in unit_blocks(folder, units):
            lo, hi = np.searchsorted(picked, [first, first + len(vectors)])
            parts.append(vectors[picked[lo:hi] - first])
            bar.update(len(vectors))
    return picked, np.concatenate(parts)


def assign_shards(folder: IndexFolder, units: Units,
                  centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid and its similarity for every unit, one shard at a time."""
    labels = np.empty(len(units), np.int32)
    sims = np.empty(len(units), np.float32)
    with _progress(len(units), "assign", unit=units.name[:-1]) as bar:
        for first, vectors in unit_blocks(folder, units):
            end = first + len(vectors)
            labels[first:end], sims[first:end] = nearest_centroid(vectors, centroids)
            bar.update(len(vectors))
    return labels, sims


def _token_columns(folder: IndexFolder, columns: list[str]) -> Iterator[tuple[int, pa.Table]]:
    folder.require_embeddings()  # rows without vectors have no cluster
    for shard in folder.token_shards:
        yield shard["first_row"], pq.read_table(folder.tokens_dir / shard["name"],
                                                columns=columns)


def count_words(folder: IndexFolder, labels: np.ndarray, k: int) -> list[Counter]:
    """Word counts per cluster over every document's text, one token shard at a time."""
    counts = [Counter() for _ in range(k)]
    with _progress(len(labels), "words") as bar:
        for first, table in _token_columns(folder, ["text"]):
            texts = table["text"].to_pylist()
            for label, text in zip(labels[first: first + len(texts)].tolist(), texts,
                                   strict=True):
                counts[label].update(words(text or ""))
            bar.update(len(texts))
    return counts


def read_ids(folder: IndexFolder) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """doc_id and chunk of every row, in row order (for clusters.parquet)."""
    table = pa.concat_tables(t for _, t in _token_columns(folder, ["doc_id", "chunk"]))
    return table["doc_id"], table["chunk"]


def near_duplicate_pairs(folder: IndexFolder, threshold: float, units: Units | None = None,
                         limit: int = MAX_DUPLICATE_PAIRS):
    """All pairs of units (rows when units is None) with cosine >= threshold: every shard's
    units against themselves and each later shard's, so at most two shards are in memory.
    Raises if more than `limit` pairs turn up."""
    folder.require_embeddings()
    shards = folder.token_shards
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    total = 0
    n_blocks = len(shards) * (len(shards) + 1) // 2
    with _progress(n_blocks, "near-duplicates", unit="block") as bar:
        for a, (first_a, query) in enumerate(unit_blocks(folder, units)):
            # The later blocks are streamed again rather than held: pooling a document needs
            # the shards before it, and the range searches cost far more than the rereads.
            later = itertools.islice(unit_blocks(folder, units), a + 1, None)
            for first_b, base in itertools.chain([(first_a, query)], later):
                pairs = range_pairs(query, first_a, base, first_b, threshold)
                total += len(pairs[0])
                if total > limit:
                    raise UsageError(f"more than {limit:,} pairs reach similarity {threshold}:"
                                     " raise --near-duplicate-threshold")
                found.append(pairs)
                bar.update(1)
    return tuple(np.concatenate(parts) for parts in zip(*found, strict=True))


def parse_k(k: int | str) -> int | None:
    """An int k, or None for "auto"."""
    if isinstance(k, str):
        if k.strip().lower() == "auto":
            return None
        if not k.strip().isdigit():
            raise UsageError(f"-k must be a whole number or 'auto', not {k!r}")
        k = int(k)
    if k < 1:
        raise UsageError(f"-k must be at least 1, not {k}")
    return k


def select_k(sample: np.ndarray, seed: int, console=None,
             unit: str = "vectors") -> tuple[int, list[tuple[int, float]]]:
    """Try each candidate k on (part of) the sample; keep the best mean silhouette.

    One k-means run per k (no restarts): the curve is read for its shape, and ~20 runs with
    restarts would cost more than the final clustering."""
    if len(sample) < 3:
        return 1, []  # silhouette needs two clusters with a point to spare
    rng = np.random.default_rng(seed + 1)
    train = sample[rng.permutation(len(sample))[:SELECT_TRAIN_ROWS]]
    scored = train[:SILHOUETTE_ROWS]
    curve = []
    for k in _iter_progress(auto_k_candidates(len(train)), "choose k"):
        centroids = train_spherical_kmeans(train, k, seed, nredo=1)
        labels, _ = nearest_centroid(scored, centroids)
        curve.append((k, silhouette_cosine(scored, labels)))
    if all(math.isnan(s) for _, s in curve):
        raise UsageError(f"-k auto: the sampled {unit} do not fall into two or more clusters "
                         "(are they all alike?): give -k")
    chosen = choose_k(curve)
    if console is not None:
        _print_k_curve(console, curve, chosen, f"{len(scored):,} sampled {unit}")
    return chosen, curve


def _print_k_curve(console, curve: list[tuple[int, float]], chosen: int, scored: str) -> None:
    from rich.table import Table

    table = Table(title=f"Choosing k: silhouette on {scored}")
    table.add_column("k", justify="right")
    table.add_column("silhouette", justify="right")
    table.add_column("")
    best = max((s for _, s in curve if not math.isnan(s)), default=0.0)
    for k, s in curve:
        bar = "█" * max(0, round(30 * s / best)) if best > 0 and not math.isnan(s) else ""
        style = "bold green" if k == chosen else None
        table.add_row(str(k), f"{s:.4f}", bar, style=style)
    console.print(table)


def _iter_progress(items: list, desc: str):
    with _progress(len(items), desc, unit="k") as bar:
        for item in items:
            yield item
            bar.update(1)


# ---------------------------------------------------------------------------------------------
# A whole run: options -> units -> sample -> k-means -> files -> report


@dataclass
class Clustering:
    """Per unit its cluster and the cosine to that cluster's centroid; clusters by size."""

    centroids: np.ndarray  # (k, dim) unit length; row c is cluster c
    labels: np.ndarray  # (units,) int32
    sims: np.ndarray  # (units,) float32
    curve: list[tuple[int, float]] | None  # (k, silhouette) when k was chosen

    @property
    def k(self) -> int:
        return len(self.centroids)

    @property
    def sizes(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.k)

    @property
    def cohesion(self) -> np.ndarray:
        """Mean similarity of each cluster's members to its centroid; NaN when empty."""
        sizes = self.sizes
        out = np.bincount(self.labels, weights=self.sims, minlength=self.k) / np.maximum(sizes, 1)
        out[sizes == 0] = np.nan
        return out

    def representatives(self) -> list[np.ndarray]:
        return top_rows_per_cluster(self.labels, self.sims, self.k, REPRESENTATIVES)


def check_options(k: int | str, sample: int, projection: str) -> int | None:
    """The wanted k (None: auto), after refusing options that cannot work."""
    wanted_k = parse_k(k)
    if sample < 1:
        raise UsageError(f"--sample must be at least 1, not {sample}")
    if projection not in ("pca", "umap"):
        raise UsageError(f"unknown projection {projection!r}: choose pca or umap")
    return wanted_k


def check_k(k: int, units: Units, sampled: int, folder: IndexFolder) -> None:
    if k > len(units):
        raise UsageError(f"-k {k} is more than the {len(units):,} {units.name} of "
                         f"{folder.path}")
    if k > sampled:
        raise UsageError(f"-k {k} is more than the {sampled:,} sampled {units.name}: raise "
                         "--sample")


def run_cluster(index_dir: Path, k: int | str, report_dir: Path | None, seed: int,
                near_duplicate_threshold: float, sample: int, console=None,
                projection: str = "pca", by_rows: bool = False) -> dict:
    """Cluster an index folder's documents (with by_rows: its rows); write the cluster files
    and (with report_dir) the report. `near_duplicate_threshold` <= 0 skips the
    near-duplicate search. Returns a summary."""
    folder = IndexFolder(index_dir)
    wanted_k = check_options(k, sample, projection)
    if report_dir is not None:
        rpt.require_report_extra()  # before the clustering, not after it
    with folder.reading():  # no stage rewrites the vectors or the text meanwhile
        return cluster_folder(folder, wanted_k, report_dir, seed, near_duplicate_threshold,
                              sample, console, projection, by_rows)


def cluster_folder(folder: IndexFolder, wanted_k: int | None, report_dir: Path | None,
                   seed: int, near_duplicate_threshold: float, sample: int, console,
                   projection: str, by_rows: bool) -> dict:
    """`run_cluster` once the folder is held."""
    folder.require_embeddings()
    out_dir = Path(report_dir) if report_dir is not None else folder.path / "clusters"
    seconds: dict[str, float] = {}

    with timed("sample", seconds):
        units = make_units(*read_ids(folder), by_rows=by_rows)
        sample_units, sample_vectors = read_sample(folder, units, sample, seed)
    result = fit_clusters(folder, units, sample_vectors, wanted_k, seed, console, seconds)
    files = write_cluster_files(out_dir, cluster_table(units, result), result.centroids)
    summary = make_summary(folder, units, result, seed, len(sample_units))
    summary["rows"] = folder.rows
    if report_dir is not None:
        report, written = write_report(folder, out_dir, units, result, sample_units,
                                       sample_vectors, near_duplicate_threshold, seed,
                                       projection, seconds)
        summary["near_duplicate_pairs"] = report.duplicate_pairs
        summary["near_duplicate_groups"] = report.duplicate_groups_total
        files.update(written)
    summary["seconds"] = seconds
    files["summary"] = atomic_write_json(summary, out_dir / SUMMARY_FILE)
    summary["files"] = {name: str(path) for name, path in files.items()}
    if console is not None:
        _print_summary(console, summary)
    return summary


def fit_clusters(folder: IndexFolder, units: Units, sample_vectors: np.ndarray, k: int | None,
                 seed: int, console, seconds: dict[str, float]) -> Clustering:
    """k (chosen when None), k-means on the sample, every unit assigned; clusters by size."""
    curve = None
    if k is None:
        with timed("choose k", seconds):
            k, curve = select_k(sample_vectors, seed, console, units.name)
    check_k(k, units, len(sample_vectors), folder)
    with timed("k-means", seconds):
        centroids = train_spherical_kmeans(sample_vectors, k, seed)
    with timed("assign", seconds):
        labels, sims = assign_shards(folder, units, centroids)
    new_id = size_order(labels, k)
    return Clustering(centroids[np.argsort(new_id)], new_id[labels], sims, curve)


def cluster_table(units: Units, result: Clustering) -> pa.Table:
    """clusters.parquet: one entry per unit, in row order."""
    first = units.first_rows
    if units.pooled:
        key = {"id": units.doc_ids.take(pa.array(first)), "row": pa.array(first),
               "rows": pa.array(np.diff(units.bounds).astype(np.int32))}
    else:
        key = {"row": pa.array(first), "id": units.doc_ids, "chunk": units.chunks}
    return pa.table({**key, "cluster": pa.array(result.labels),
                     "similarity": pa.array(result.sims)})


def write_cluster_files(out_dir: Path, table: pa.Table, centroids: np.ndarray) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"clusters": atomic_write_table(table, out_dir / CLUSTERS_FILE),
             "centroids": out_dir / CENTROIDS_FILE}
    with atomic_open(files["centroids"]) as fh:  # a full disk leaves no half-written .npy
        np.save(fh, centroids.astype(np.float32))
    return files


def make_summary(folder: IndexFolder, units: Units, result: Clustering, seed: int,
                 sampled: int) -> dict:
    """clusters.json, less the timings and files: n counts what was clustered."""
    return {
        "index": str(folder.path), "clustered": units.name, "n": len(units),
        "documents": units.documents, "rows": units.rows, "dim": result.centroids.shape[1],
        "k": result.k, "seed": seed, "sample": sampled, "niter": NITER,
        "gpu": faiss.get_num_gpus() > 0, "k_curve": result.curve,
        "sizes": result.sizes.tolist(),
        "cohesion": [None if math.isnan(c) else round(float(c), 5) for c in result.cohesion],
        "representatives": [r.tolist() for r in result.representatives()],
        "vectors": folder.embed.get("identity", {}),
    }


# ---------------------------------------------------------------------------------------------
# The report


@dataclass
class Duplicates:
    """Near-duplicate units: the pairs found, joined into groups (largest first)."""

    threshold: float
    pairs: int
    groups: list[np.ndarray]
    lowest: np.ndarray  # per group, the lowest similarity of the pairs that joined it
    highest: np.ndarray
    closest: dict[int, float]  # per unit in a group, the similarity of its closest duplicate


def write_report(folder: IndexFolder, out_dir: Path, units: Units, result: Clustering,
                 sample_units: np.ndarray, sample_vectors: np.ndarray, threshold: float,
                 seed: int, projection: str, seconds: dict[str, float]
                 ) -> tuple[rpt.ClusterReport, dict[str, Path]]:
    """The report's files, and near_duplicates.parquet when searched."""
    duplicates = None
    if threshold > 0:
        with timed("near-duplicates", seconds):
            duplicates = find_duplicates(folder, units, threshold)
    report = build_report(folder, units, result, sample_units, sample_vectors, duplicates,
                          seed, projection, seconds)
    files = {}
    if duplicates is not None:
        files["near_duplicates"] = atomic_write_table(duplicates_table(units, duplicates),
                                                      out_dir / DUPLICATES_FILE)
    with timed("render", seconds):
        report.facts.update({f"time: {stage}": f"{s:.1f} s" for stage, s in seconds.items()})
        files.update(rpt.write_cluster_report(report, out_dir))
    return report, files


def find_duplicates(folder: IndexFolder, units: Units, threshold: float) -> Duplicates:
    i, j, sims = near_duplicate_pairs(folder, threshold, units)
    groups = group_pairs(i, j)
    lowest, highest, closest = group_similarities(groups, i, j, sims)
    return Duplicates(threshold, len(i), groups, lowest, highest, closest)


def duplicates_table(units: Units, duplicates: Duplicates) -> pa.Table:
    """near_duplicates.parquet: group, then the member (documents: id and first row)."""
    groups = duplicates.groups
    members = np.concatenate(groups) if groups else np.zeros(0, np.int64)
    columns = {"group": pa.array(np.repeat(np.arange(len(groups)), [len(g) for g in groups]),
                                 pa.int32())}
    if units.pooled:
        columns["id"] = units.doc_ids.take(pa.array(units.first_rows[members]))
    columns["row"] = pa.array(units.first_rows[members], pa.int64())
    return pa.table(columns)


def build_report(folder: IndexFolder, units: Units, result: Clustering, sample_units: np.ndarray,
                 sample_vectors: np.ndarray, duplicates: Duplicates | None, seed: int,
                 projection: str, seconds: dict[str, float]) -> rpt.ClusterReport:
    """Everything the report shows."""
    with timed("words", seconds):
        top_words = class_tfidf(count_words(folder, units.per_row(result.labels), result.k))
    representatives = result.representatives()
    shown = duplicates.groups[:DUPLICATE_GROUPS_SHOWN] if duplicates else []
    wanted_units = np.concatenate(representatives).tolist()
    wanted_units += [int(u) for g in shown for u in g[:REPRESENTATIVES]]
    documents = read_documents(folder, units, wanted_units)
    neighbours = cluster_neighbours(result.centroids, NEIGHBOURS)
    cohesion = result.cohesion
    sections = [rpt.ClusterSection(
        c, int(result.sizes[c]), float(cohesion[c]), top_words[c],
        [documents(u, result.sims[u]) for u in representatives[c]], neighbours[c])
        for c in range(result.k)]
    groups = [rpt.DuplicateGroup(len(g), [documents(u, duplicates.closest[int(u)])
                                          for u in g[:REPRESENTATIVES]],
                                 float(duplicates.lowest[n]), float(duplicates.highest[n]))
              for n, g in enumerate(shown)]
    with timed("plots", seconds):
        images, mapped = draw_plots(result, sample_units, sample_vectors, seed, projection,
                                    units.name)
    facts = report_facts(folder, units, result, len(sample_units), mapped, seed, projection)
    return rpt.ClusterReport(
        title=f"Clusters of {folder.path.name}", n=len(units), dim=result.centroids.shape[1],
        clusters=sections, duplicate_threshold=duplicates.threshold if duplicates else None,
        duplicate_pairs=duplicates.pairs if duplicates else 0, duplicate_groups=groups,
        duplicate_groups_total=len(duplicates.groups) if duplicates else 0,
        k_curve=result.curve, facts=facts, images=images, unit=units.name)


def read_documents(folder: IndexFolder, units: Units, wanted_units: list[int]):
    """A function (unit, similarity) -> rpt.Document for the wanted units, whose texts are
    read here: a document shows its first window's text and its doc_id alone."""
    wanted = units.first_rows[wanted_units].tolist()
    records = dict(zip(wanted_units, folder.read_rows(wanted), strict=True))

    def document(unit: int, similarity: float) -> rpt.Document:
        r = records[int(unit)]
        chunk = 0 if units.pooled else int(r["chunk"] or 0)
        return rpt.Document(int(units.first_rows[unit]), str(r["doc_id"]), r["text"] or "",
                            float(similarity), chunk)

    return document


def draw_plots(result: Clustering, sample_units: np.ndarray, sample_vectors: np.ndarray,
               seed: int, projection: str, unit: str) -> tuple[dict[str, bytes], int]:
    """The report's PNGs (k curve when k was chosen, 2-D map of sampled units, sizes), and how
    many units the map shows."""
    rng = np.random.default_rng(seed + 2)
    on_map = np.sort(rng.permutation(len(sample_units))[:MAP_ROWS])
    points = sample_vectors[on_map]
    xy = pca_2d(points) if projection == "pca" else umap_2d(points, seed)
    images = {"map": rpt.plot_map(xy, result.labels[sample_units[on_map]], result.k,
                                  projection.upper(), unit=unit),
              "sizes": rpt.plot_sizes(result.sizes, unit=unit)}
    if result.curve:
        images = {"k_curve": rpt.plot_k_curve(result.curve, result.k), **images}
    return images, len(on_map)


def report_facts(folder: IndexFolder, units: Units, result: Clustering, sampled: int, mapped: int,
                 seed: int, projection: str) -> dict[str, str]:
    pooled = " (each the mean of its rows' vectors)" if units.pooled else ""
    return {"index": str(folder.path), "clustered": units.name + pooled,
            "documents": f"{units.documents:,}", "rows": f"{units.rows:,}",
            "k": str(result.k),
            "k chosen by": "silhouette over a grid" if result.curve else "-k",
            "trained on": f"{sampled:,} sampled {units.name}, seed {seed}",
            "map": f"{projection.upper()} of {mapped:,} sampled {units.name}",
            "FAISS": f"{faiss.__version__}, {faiss.get_num_gpus()} GPU(s)"}


def _print_summary(console, summary: dict) -> None:
    from rich.table import Table
    from rich.text import Text

    sizes, cohesion = summary["sizes"], summary["cohesion"]
    other = "rows" if summary["clustered"] == "documents" else "documents"
    # A line of its own: a table title would wrap to the (narrow) table's width.
    console.print(Text(f"{summary['k']} clusters of {summary['n']:,} {summary['clustered']} "
                       f"({summary[other]:,} {other})"))
    table = Table(title=f"largest {min(10, len(sizes))}")
    table.add_column("cluster", justify="right")
    table.add_column("size", justify="right")
    table.add_column("cohesion", justify="right")
    for c in range(min(10, len(sizes))):
        table.add_row(str(c), f"{sizes[c]:,}",
                      "—" if cohesion[c] is None else f"{cohesion[c]:.3f}")
    console.print(table)
    timings = ", ".join(f"{stage} {s:.1f}s" for stage, s in summary["seconds"].items())
    console.print(f"timings: {timings}")
    for name, path in summary["files"].items():
        # Text: a path may hold [brackets] that a console with markup would swallow.
        console.print(Text(f"wrote {name}: {path}"), highlight=False)
