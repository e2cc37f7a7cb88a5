"""Stage 4: queries -> nearest documents, embedded with the index's own model.

A long document is several rows (windows); hits are merged to one per document, scored by its
best window, so a document never crowds the top k with its own pieces.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import IndexFolderError, UsageError
from pipeline.folder import IndexFolder
from pipeline.model.numpy_forward import NotSupported, QueryEncoder

if TYPE_CHECKING:
    from pipeline.embed.encoder import Encoder

ENGINES = ("auto", "numpy", "torch")


@dataclass
class Hit:
    rank: int
    score: float
    doc_id: str
    chunk: int
    row: int
    text: str


def merge_chunk_hits(rows: Sequence[int], scores: Sequence[float], doc_ids: Sequence[str],
                     k: int) -> list[tuple[int, float]]:
    """(row, score) of the best window of each document, best first, at most k.

    rows/scores come sorted best first, as FAISS returns them; -1 rows (no result) are dropped.
    """
    seen: set[str] = set()
    merged = []
    for row, score, doc_id in zip(rows, scores, doc_ids, strict=True):
        if row < 0 or doc_id in seen:
            continue
        seen.add(doc_id)
        merged.append((int(row), float(score)))
        if len(merged) == k:
            break
    return merged


def load_search_encoder(folder: IndexFolder, model: str | None, device: str | None,
                        engine: str = "auto") -> Encoder | QueryEncoder:
    """The encoder the index was built with; refuses a model whose weights differ.

    engine "auto": on the CPU (no --device, or cpu) the numpy forward of numpy_forward.py,
    which spares the import of torch; torch's Encoder for another device and for models the
    numpy forward does not read (random presets, bf16 weights). "numpy" / "torch" force one.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}")
    identity = folder.require_embeddings()["identity"]
    spec = model or identity["model"]
    encoder = None
    if engine == "numpy" or (engine == "auto" and device in (None, "cpu")):
        try:
            encoder = QueryEncoder.load(spec, identity["pooling"])
        except NotSupported:
            if engine == "numpy":
                raise
    if encoder is None:
        from pipeline.embed.encoder import Encoder

        encoder = Encoder.load(spec, device, identity["pooling"])
    folder.check_identity({"model": encoder.spec, "model_sha256": encoder.sha256},
                          "search with the index's model or rebuild the index")
    return encoder


@functools.cache
def faiss_threads() -> int:
    """FAISS's thread count before any search set it (OMP_NUM_THREADS, or every core)."""
    import faiss

    return faiss.omp_get_max_threads()


class Searcher:
    """The model and the index of one index folder, loaded once: a command makes one, a
    server holds one and answers many queries with it."""

    def __init__(self, index_dir: str | Path, model: str | None = None,
                 device: str | None = None, engine: str = "auto", snapshot: bool = False):
        """`snapshot`: keep the token shards open (IndexFolder.pin_token_shards), so searches
        read the generation loaded even after the folder is rewritten, without a lock: a
        server's choice. Otherwise each search takes the folder's shared lock."""
        from pipeline.index.store import load_search_index

        self.folder, self.snapshot = IndexFolder(index_dir), snapshot
        with self.folder.reading():
            self.generation = self.folder.generation()
            self.encoder = load_search_encoder(self.folder, model, device, engine)
            self.index, self.info = load_search_index(self.folder)
            if snapshot:
                self.folder.pin_token_shards()
            # Documents cut into several windows (rows): only then are hits merged by doc_id.
            stats = self.folder.manifest["tokenize"].get("stats", {})
            self.split_documents = stats.get("split_documents", 1) != 0
            self.deleted = self.folder.deleted_rows

    @contextlib.contextmanager
    def consistent(self):
        """A context in which the rows read are of the generation loaded: a snapshot needs
        nothing; otherwise the folder's shared lock, once it is known unchanged."""
        if self.snapshot:
            yield
            return
        with self.folder.reading():
            self.check_current()
            yield

    def check_current(self) -> None:
        """Refuse to answer from a folder written since it was loaded: the vectors held here
        and the text read from disk would be of two generations. Call under `reading()`."""
        if self.folder.generation() != self.generation:
            raise IndexFolderError(f"{self.folder.path} was rewritten since this search loaded "
                                   "it: search again")

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors of `texts`, made as the index's own were."""
        return self.encoder.embed_texts(list(texts)).astype(np.float32)

    def search(self, queries: Sequence[str], k: int = 10) -> list[list[Hit]]:
        """Top-k documents for each query."""
        if k < 1:
            raise UsageError("-k must be at least 1")
        return self.search_vectors(self.embed(queries), k)

    def search_vectors(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-k documents for each query vector (unit, float32), with their text read from
        the generation the index is of."""
        import faiss

        # A few queries: threads only wait on each other. Many: as many as faiss had (read
        # before the first search sets it).
        many = faiss_threads()
        faiss.omp_set_num_threads(1 if len(vectors) < 16 else many)
        with self.consistent():
            merged = self.nearest_documents(vectors, k)
            wanted = sorted({row for m in merged for row, _ in m})
            records = dict(zip(wanted, self.folder.read_rows(wanted), strict=True))
        return [[Hit(rank + 1, score, records[row]["doc_id"], records[row]["chunk"], row,
                     records[row]["text"]) for rank, (row, score) in enumerate(m)]
                for m in merged]

    def nearest_documents(self, vectors: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        """(row, score) of the best window of each of the k nearest documents, per query;
        rows of deleted documents (IndexFolder.deleted_rows) are never among them."""
        n = self.index.ntotal
        # Windows of one document may fill the first k slots, and deleted rows are dropped:
        # ask for more until k documents.
        fetch = min(n, 4 * k if self.split_documents or len(self.deleted) else k)
        while True:
            scores, rows = self.index.search(vectors, fetch)
            if len(self.deleted):
                rows = np.where(np.isin(rows, self.deleted), -1, rows)
            if not self.split_documents:  # each row is a document of its own: no merging
                merged = [[(int(r), float(x)) for r, x in zip(rows[q], scores[q], strict=True)
                           if r >= 0][:k] for q in range(len(vectors))]
            else:
                found = sorted({int(x) for x in rows.ravel() if x >= 0})
                doc_of = {row: r["doc_id"] for row, r in
                          zip(found, self.folder.read_rows(found, ("doc_id",)), strict=True)}
                merged = [merge_chunk_hits(rows[q], scores[q],
                                           [doc_of.get(int(x), "") for x in rows[q]], k)
                          for q in range(len(vectors))]
            if fetch >= n or all(len(m) == k for m in merged):
                return merged
            fetch = min(n, fetch * 4)


def search(index_dir: str | Path, queries: Sequence[str], k: int = 10,
           model: str | None = None, device: str | None = None,
           engine: str = "auto") -> list[list[Hit]]:
    """Top-k documents for each query (engine: see load_search_encoder)."""
    if k < 1:
        raise UsageError("-k must be at least 1")
    return Searcher(index_dir, model, device, engine).search(queries, k)
