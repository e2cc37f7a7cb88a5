"""An index folder: indexes/NAME/{manifest.json, tokens/, embeddings/, index.faiss, index.json}.

Row r of the corpus (one document, or one window of a long document) is row r of the token
shards, of the embedding shards and of the FAISS index: shard k holds rows
[first_row, first_row + rows) in order, so no id map is needed.

`IndexFolder` is the one place that knows the paths, reads the manifest (once per object),
and checks that what a stage is given was made by the same model as what is there.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import lock
from pipeline.errors import IndexFolderError
from pipeline.hashing import file_sha256
from pipeline.parquet import arrow_to_vectors, atomic_write_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENS_DIR = "tokens"
EMBEDDINGS_DIR = "embeddings"
INDEX_FILE = "index.faiss"
INFO_FILE = "index.json"
# Files beside index.faiss, named per build (index.<build>.ivfdata: the on-disk IVF lists of a
# streamed build; .rescore: vectors to re-rank with; .trained: its trained empty index, which
# an update adds to; .parts: a build's work in progress), so
# that an index.json never meets another build's.
INDEX_SIDE_PATTERNS = ("index.*.ivfdata", "index.*.rescore", "index.*.trained",
                       "index.*.parts")

# What must agree for two sets of vectors to share one index: the weights, how tokens are
# pooled, how they attend, and the width. (The spec string may differ: a path moves.)
IDENTITY_KEYS = ("model_sha256", "pooling", "attention", "dim")


def shard_name(number: int) -> str:
    return f"part-{number:05d}.parquet"


def identity_mismatch(recorded: dict | None, given: dict) -> str | None:
    """The first identity key on which `given` differs from `recorded` (None: they agree, or
    nothing is recorded). Keys missing from `given` are not compared."""
    if not recorded:
        return None
    for key in IDENTITY_KEYS:
        if key in given and recorded.get(key) != given[key]:
            return key
    return None


def read_manifest(path: Path) -> dict:
    """A manifest, refused with one line naming the file if it is not one we wrote."""
    repair = "rerun `pipeline tokenize --force` into this folder, or use a new --index"
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IndexFolderError(f"{path} is not valid JSON ({err}): {repair}") from None
    problem = manifest_problem(manifest)
    if problem:
        raise IndexFolderError(f"{path} is damaged ({problem}): {repair}")
    return manifest


def manifest_problem(manifest) -> str | None:
    """What is wrong with a manifest's shape (None: nothing), checked before any stage trusts
    it: the keys every reader uses, with their types."""
    if not isinstance(manifest, dict):
        return "not a JSON object"
    tokenize = manifest.get("tokenize")
    if not isinstance(tokenize, dict):
        return "no tokenize section"
    shards = tokenize.get("shards")
    if not isinstance(shards, list) or not all(_is_record(s, TOKEN_RECORD) for s in shards):
        return "tokenize.shards is not a list of shard records"
    deleted = tokenize.get("deleted_rows", [])
    if not isinstance(deleted, list) or not all(isinstance(r, int) for r in deleted):
        return "tokenize.deleted_rows is not a list of rows"
    settings = tokenize.get("settings")
    if not isinstance(settings, dict) or not isinstance(settings.get("max_tokens"), int):
        return "tokenize.settings.max_tokens is missing"
    embed = manifest.get("embed", {})
    if not isinstance(embed, dict):
        return "embed is not an object"
    done = embed.get("shards", {})
    if not isinstance(done, dict) or not all(_is_record(r, EMBED_RECORD) for r in done.values()):
        return "embed.shards is not a map of shard records"
    if embed and not isinstance(embed.get("identity"), dict):
        return "embed.identity is missing"
    return None


# The keys of a shard record, with their types.
TOKEN_RECORD = {"name": str, "first_row": int, "rows": int, "sha256": str}
EMBED_RECORD = {"rows": int, "sha256": str}


def _is_record(record, keys: dict) -> bool:
    return isinstance(record, dict) and all(isinstance(record.get(k), t) for k, t in keys.items())


def check_shard(path: Path, record: dict, repair: str) -> None:
    """Refuse a file whose bytes are not those its record (`sha256`) says were written;
    `repair` tells the user which rerun makes it again."""
    if not path.is_file():
        raise IndexFolderError(f"{path} is missing: {repair}")
    if file_sha256(path) != record.get("sha256"):
        raise IndexFolderError(f"{path} is damaged (its sha256 is not the one recorded when it "
                               f"was written): {repair}")


class IndexFolder:
    """Paths and manifest of one index folder. The manifest is read on first use and kept:
    make a new IndexFolder (or call `reload`) to see another process's writes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._manifest: dict | None = None
        # Shard footers, by path: read once per object. A reader that outlives a rewrite of
        # the folder refuses it (Searcher.check_current) before reading rows again.
        self._footers: dict[Path, pq.FileMetaData] = {}
        self._pinned: dict[Path, pq.ParquetFile] = {}  # pin_token_shards

    def pin_token_shards(self) -> None:
        """Open every token shard now, and read rows through these handles from then on: a
        snapshot of this generation. A rewrite of the folder makes new files and unlinks
        these, which stay readable while open, so a reader holding a snapshot (a server)
        needs no lock to read rows, and writers need not wait for it. One open file per
        shard."""
        self._pinned = {self.tokens_dir / s["name"]: pq.ParquetFile(self.tokens_dir / s["name"])
                        for s in self.token_shards}

    def __repr__(self) -> str:
        return f"IndexFolder({str(self.path)!r})"

    # -- paths -------------------------------------------------------------------------------
    @property
    def manifest_file(self) -> Path:
        return self.path / MANIFEST

    @property
    def tokens_dir(self) -> Path:
        return self.path / TOKENS_DIR

    @property
    def embeddings_dir(self) -> Path:
        return self.path / EMBEDDINGS_DIR

    @property
    def index_file(self) -> Path:
        return self.path / INDEX_FILE

    @property
    def info_file(self) -> Path:
        return self.path / INFO_FILE

    # -- manifest ----------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.manifest_file.is_file()

    @property
    def manifest(self) -> dict:
        if self._manifest is None:
            self.reload()
        return self._manifest

    def reload(self) -> dict:
        if not self.exists():
            raise IndexFolderError(f"{self.path} has no {MANIFEST}: run `pipeline tokenize` "
                                   "first")
        manifest = read_manifest(self.manifest_file)
        self._manifest = manifest
        return manifest

    # -- locks (lock.py) ---------------------------------------------------------------------
    def writing(self, command: str):
        """A context that holds the folder for `command`, a writer: no other command reads
        or writes it meanwhile (IndexBusy otherwise)."""
        return lock.writing(self.path, command)

    def reading(self):
        """A context in which no other command writes the folder (IndexBusy otherwise)."""
        return lock.reading(self.path)

    def generation(self) -> str:
        """Changes whenever a stage writes the folder: a hash of the manifest and index.json,
        read now (a reader compares it with what it loaded)."""
        digest = hashlib.sha256()
        for path in (self.manifest_file, self.info_file):
            digest.update(path.read_bytes() if path.is_file() else b"-")
        return digest.hexdigest()

    def write_manifest(self, manifest: dict | None = None) -> Path:
        """Write `manifest` (default: the one held, changed in place) atomically."""
        if manifest is not None:
            self._manifest = manifest
        return atomic_write_json(self._manifest, self.manifest_file)

    @property
    def token_shards(self) -> list[dict]:
        """The tokenize stage's shard records: name, first_row, rows, docs, sha256."""
        return self.manifest.get("tokenize", {}).get("shards", [])

    @property
    def rows(self) -> int:
        return sum(s["rows"] for s in self.token_shards)

    @property
    def embed(self) -> dict:
        """The embed stage's section ({} before any embedding)."""
        return self.manifest.get("embed", {})

    @property
    def identity(self) -> dict | None:
        """What made the vectors (model, its sha256, pooling, ...), or None."""
        return self.embed.get("identity")

    def require_embeddings(self) -> dict:
        """The embed section, after checking that every token shard has its embedding shard."""
        done = self.embed.get("shards", {})
        missing = [s["name"] for s in self.token_shards if s["name"] not in done]
        if not self.token_shards or missing:
            raise IndexFolderError(f"{self.path}: embeddings are incomplete ({len(missing)} "
                                   "shard(s) left): run `pipeline embed --index`")
        return self.embed

    def check_identity(self, given: dict, fix: str) -> None:
        """Refuse `given` (an encoder's identity) if the vectors here were made otherwise;
        `fix` tells the user what to do instead."""
        recorded = self.identity
        key = identity_mismatch(recorded, given)
        if key is not None:
            what = "another model" if key == "model_sha256" else f"another {key}"
            raise IndexFolderError(
                f"{self.path} was embedded with {what}: {recorded.get('model')} ({key} "
                f"{str(recorded.get(key))[:12]}), not {given.get('model')} "
                f"({str(given.get(key))[:12]}): {fix}")

    def embeddings_fingerprint(self) -> str:
        """sha256 over the embedding shards' names, row counts and file hashes, in row order:
        it changes whenever any embedding shard is redone."""
        done = self.embed.get("shards", {})
        records = [[s["name"], done.get(s["name"], {}).get("rows"),
                    done.get(s["name"], {}).get("sha256")] for s in self.token_shards]
        return hashlib.sha256(json.dumps(records).encode()).hexdigest()

    # -- vectors and rows --------------------------------------------------------------------
    @property
    def deleted_rows(self) -> np.ndarray:
        """Rows of documents deleted or changed since they were tokenized (text/update.py):
        still in the shards and the index, never returned by search."""
        return np.asarray(self.manifest["tokenize"].get("deleted_rows", []), np.int64)

    def embedding_dim(self) -> int:
        """Vector dims from the first embedding shard's schema, without reading its data."""
        self.require_embeddings()
        first = self.embeddings_dir / self.token_shards[0]["name"]
        return pq.read_schema(first).field("embedding").type.list_size

    def vector_shards(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first_row, (n, dim) float32 vectors) per embedding shard, in row order."""
        self.require_embeddings()
        for shard in self.token_shards:
            table = pq.read_table(self.embeddings_dir / shard["name"], columns=["embedding"])
            yield shard["first_row"], arrow_to_vectors(table["embedding"]).astype(np.float32)

    def load_vectors(self) -> np.ndarray:
        """All vectors as one (N, dim) float32 array, row r = corpus row r."""
        parts = [v for _, v in self.vector_shards()]
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)

    def vectors_at(self, rows: Sequence[int]) -> np.ndarray:
        """The float32 vectors of the given global rows, in the order asked, reading only the
        shards (and within them the row groups) that hold them."""
        self.require_embeddings()
        table = self._take(self.embeddings_dir, rows, ("embedding",))
        if table is None:
            return np.zeros((0, self.embedding_dim()), np.float32)
        return arrow_to_vectors(table["embedding"]).astype(np.float32)

    def read_rows(self, rows: Sequence[int],
                  columns: Sequence[str] = ("doc_id", "chunk", "text")) -> list[dict]:
        """Token-shard columns for the given global rows (search hits), in the order asked."""
        table = self._take(self.tokens_dir, rows, columns)
        return [] if table is None else table.to_pylist()

    def sample_rows(self, count: int, seed: int = 0) -> np.ndarray:
        """`count` distinct rows (all when count >= rows), sorted, reproducible from seed."""
        return sample_rows(self.rows, count, seed)

    def _take(self, folder: Path, rows: Sequence[int], columns: Sequence[str]
              ) -> pa.Table | None:
        """`columns` of the given global rows from the shards in `folder`, in the order asked
        (None for no rows)."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        if len(rows) == 0:
            return None
        wanted = np.unique(rows)
        if wanted[0] < 0 or wanted[-1] >= self.rows:
            bad = wanted[0] if wanted[0] < 0 else wanted[-1]
            raise IndexFolderError(f"{self.path} has no row {bad} ({self.rows} rows)")
        parts = []
        for shard in self.token_shards:
            lo, hi = shard["first_row"], shard["first_row"] + shard["rows"]
            local = wanted[(wanted >= lo) & (wanted < hi)] - lo
            if len(local):
                parts.append(self._read_shard_rows(folder / shard["name"], local, columns))
        table = pa.concat_tables(parts)  # the rows of `wanted`, in order
        return table.take(pa.array(np.searchsorted(wanted, rows)))


    def _read_shard_rows(self, path: Path, local: np.ndarray, columns: Sequence[str]
                         ) -> pa.Table:
        """read_shard_rows, a file that does not read as the shard recorded being one line."""
        try:
            if path in self._pinned:
                return read_shard_rows(self._pinned[path], local, columns)
            if path not in self._footers:  # parsed once, not per search
                self._footers[path] = pq.read_metadata(path)
            with pq.ParquetFile(path, metadata=self._footers[path]) as pf:
                return read_shard_rows(pf, local, columns)
        except (OSError, pa.ArrowException) as err:
            stage = "tokenize CORPUS --force" if path.parent == self.tokens_dir else "embed"
            raise IndexFolderError(f"cannot read {path} ({err}): it is damaged or missing: run "
                                   f"`pipeline {stage} --index {self.path}`") from None


def sample_rows(n: int, count: int, seed: int = 0) -> np.ndarray:
    """`count` distinct rows of n (all when count >= n), sorted, reproducible from seed."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(count, n), replace=False)).astype(np.int64)


def read_shard_rows(pf: pq.ParquetFile, local_rows: np.ndarray, columns: Sequence[str]
                    ) -> pa.Table:
    """`columns` of rows (sorted, distinct, within the file) of one Parquet shard, in that
    order, reading only the row groups that hold them: search stays fast on big shards."""
    group_starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows
                                    for g in range(pf.num_row_groups)])
    group_of = np.searchsorted(group_starts, local_rows, side="right") - 1
    groups = sorted({int(g) for g in group_of})
    table = pf.read_row_groups(groups, columns=list(columns))
    # Row r of the shard is row r - start(g) + (rows of the groups read before g).
    before = dict(zip(groups, np.cumsum([0] + [pf.metadata.row_group(g).num_rows
                                               for g in groups])[:-1], strict=True))
    positions = [int(before[int(g)] + r - group_starts[g])
                 for r, g in zip(local_rows, group_of, strict=True)]
    return table.take(pa.array(positions, pa.int64()))
