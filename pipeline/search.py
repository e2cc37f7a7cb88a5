"""Stage 4: queries -> nearest documents, embedded with the index's own model.

A long document is several rows (windows); hits are merged to one per document, scored by its
best window, so a document never crowds the top k with its own pieces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import UsageError
from pipeline.model.numpy_forward import NotSupported, QueryEncoder
from pipeline.parquet import IndexFolderError, read_rows, require_embeddings

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


def load_search_encoder(index_dir: Path, model: str | None, device: str | None,
                        engine: str = "auto") -> Encoder | QueryEncoder:
    """The encoder the index was built with; refuses a model whose weights differ.

    engine "auto": on the CPU (no --device, or cpu) the numpy forward of query_encoder, which
    spares the ~1 s import of torch; torch's Encoder for another device and for models the
    numpy forward does not read (random presets, bf16 weights). "numpy" / "torch" force one.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}")
    identity = require_embeddings(index_dir)["embed"]["identity"]
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
    if encoder.sha256 != identity["model_sha256"]:
        raise IndexFolderError(
            f"{index_dir} was embedded with another model ({identity['model']}, sha256 "
            f"{identity['model_sha256'][:12]}) than {encoder.spec} (sha256 "
            f"{encoder.sha256[:12]}): search with the index's model or rebuild the index")
    return encoder


def search(index_dir: str | Path, queries: Sequence[str], k: int = 10,
           model: str | None = None, device: str | None = None,
           engine: str = "auto") -> list[list[Hit]]:
    """Top-k documents for each query (engine: see load_search_encoder)."""
    from pipeline.index.build import load_index

    index_dir = Path(index_dir)
    if k < 1:
        raise UsageError("-k must be at least 1")
    encoder = load_search_encoder(index_dir, model, device, engine)
    index, _info = load_index(index_dir)
    if len(queries) < 16:
        import faiss

        faiss.omp_set_num_threads(1)  # a few queries: threads only wait on each other
    vectors = encoder.embed_texts(list(queries)).astype(np.float32)
    n = index.ntotal
    # Windows of one document may fill the first k slots: ask for more until k documents.
    fetch = min(n, 4 * k)
    while True:
        scores, rows = index.search(vectors, fetch)
        found = sorted({int(x) for x in rows.ravel() if x >= 0})
        doc_of = {row: r["doc_id"]
                  for row, r in zip(found, read_rows(index_dir, found, ("doc_id",)), strict=True)}
        merged = [merge_chunk_hits(rows[q], scores[q], [doc_of.get(int(x), "") for x in rows[q]],
                                   k) for q in range(len(queries))]
        if fetch >= n or all(len(m) == k for m in merged):
            break
        fetch = min(n, fetch * 4)
    wanted = sorted({row for m in merged for row, _ in m})
    records = dict(zip(wanted, read_rows(index_dir, wanted), strict=True))
    return [[Hit(rank + 1, score, records[row]["doc_id"], records[row]["chunk"], row,
                 records[row]["text"]) for rank, (row, score) in enumerate(m)]
            for m in merged]
