"""Reading corpora: plain text, JSON Lines, CSV/TSV and Parquet, compressed or not, one file,
a folder or a glob, streamed document by document.

Every document gets a stable id: the one the data gives (``--id-field``), else one derived
from its file and line (``docs.txt:17``), so re-running over the same files gives the same ids.
Undecodable bytes are replaced (U+FFFD) and counted; files that are not text at all are
refused before anything is written.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import CorpusError

COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2", ".lz4": "lz4"}
FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl",
           ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv",
           ".parquet": "parquet", ".pq": "parquet"}
DEFAULT_TEXT_FIELD = "text"
DEFAULT_ID_FIELD = "id"
SNIFF_BYTES = 1 << 16
# csv refuses fields over 128 KB by default; long documents are legitimate here.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


@dataclass
class Document:
    doc_id: str
    text: str


@dataclass
class ReadStats:
    """Counts that end up in the summary and the manifest."""

    files: int = 0
    documents: int = 0
    empty_skipped: int = 0
    undecodable_replaced: int = 0  # records (lines/rows) in which bytes were replaced
    bytes_read: int = 0
    per_file: dict = field(default_factory=dict)


def split_suffixes(path: Path) -> tuple[str, str | None]:
    """(format, compression) from a name like docs.jsonl.gz; format None if unknown."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes = suffixes[:-1]
    if not suffixes:
        return "text", compression  # a bare name like README: plain text
    return FORMATS.get(suffixes[-1]), compression  # None: unknown, skipped in folders


def resolve_corpus(spec: str | Path) -> tuple[list[Path], Path]:
    """Files named by a path, a folder (recursively, known suffixes) or a glob; and the root
    that derived ids are relative to."""
    spec = str(spec)
    path = Path(spec)
    if path.is_file():
        return [path], path.parent
    if path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and split_suffixes(p)[0] is not None
                       and not p.name.startswith("."))
        if not files:
            raise CorpusError(f"{spec}: folder holds no .txt/.jsonl/.csv/.tsv/.parquet files")
        return files, path
    if any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise CorpusError(f"{spec}: no files match")
        return files, Path(os.path.commonpath([str(f.parent) for f in files]))
    raise CorpusError(f"{spec}: no such file or folder")


def corpus_fingerprint(files: list[Path]) -> list[dict]:
    """Name, size and mtime of each file: cheap, and changes whenever a file does."""
    return [{"path": str(f), "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns}
            for f in files]


def decode_line(raw: bytes, stats: ReadStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.undecodable_replaced += 1
        return raw.decode("utf-8", errors="replace")


def looks_binary(sample: bytes) -> bool:
    """NUL bytes, or mostly undecodable bytes, mean this is not a text file."""
    if not sample:
        return False
    if b"\x00" in sample:
        return True
    text = sample.decode("utf-8", errors="replace")
    # The sample may end inside a multi-byte character: allow a few replacements.
    return text.count("\ufffd") > max(8, len(text) // 10)


def open_stream(path: Path, compression: str | None):
    try:
        return pa.input_stream(str(path), compression=compression)
    except (pa.ArrowInvalid, OSError) as err:
        raise CorpusError(f"{path}: cannot open ({err})") from None


def iter_raw_lines(path: Path, compression: str | None, stats: ReadStats) -> Iterator[bytes]:
    stream = open_stream(path, compression)
    try:
        first = stream.read(SNIFF_BYTES)
    except (pa.ArrowInvalid, OSError) as err:
        raise CorpusError(f"{path}: cannot read ({err})") from None
    if looks_binary(first):
        raise CorpusError(f"{path} does not look like text (binary data); "
                          "expected UTF-8 text, JSON Lines, CSV/TSV or Parquet")
    pending = first
    while True:
        lines = pending.split(b"\n")
        pending = lines.pop()  # a partial last line waits for more bytes
        for line in lines:
            stats.bytes_read += len(line) + 1
            yield line.rstrip(b"\r")
        try:
            block = stream.read(1 << 20)
        except (pa.ArrowInvalid, OSError) as err:
            raise CorpusError(f"{path}: cannot read ({err})") from None
        if not block:
            break
        pending += block
    if pending:
        stats.bytes_read += len(pending)
        yield pending.rstrip(b"\r")


def read_text_file(path, compression, name, stats) -> Iterator[Document]:
    for line_no, raw in enumerate(iter_raw_lines(path, compression, stats), start=1):
        yield Document(f"{name}:{line_no}", decode_line(raw, stats))


def read_jsonl_file(path, compression, name, stats, text_field, id_field) -> Iterator[Document]:
    for line_no, raw in enumerate(iter_raw_lines(path, compression, stats), start=1):
        line = decode_line(raw, stats)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{name}:{line_no}: invalid JSON ({err.msg})") from None
        if not isinstance(record, dict) or text_field not in record:
            raise CorpusError(f"{name}:{line_no}: no field {text_field!r} "
                              "(choose it with --text-field)")
        text = record[text_field]
        doc_id = record.get(id_field) if id_field else None
        yield Document(str(doc_id) if doc_id is not None else f"{name}:{line_no}",
                       "" if text is None else str(text))


def read_delimited_file(path, compression, name, stats, text_field, id_field,
                        delimiter) -> Iterator[Document]:
    lines = (decode_line(raw, stats) for raw in iter_raw_lines(path, compression, stats))
    # TSV has no quoting convention (a field may start with a quote); CSV follows RFC 4180.
    reader = csv.reader(lines, delimiter=delimiter,
                        quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
    header = next(reader, None)
    if header is None:
        return
    if text_field not in header:
        raise CorpusError(f"{name}: no column {text_field!r} (columns: {', '.join(header)}); "
                          "choose it with --text-column")
    text_at = header.index(text_field)
    id_at = header.index(id_field) if id_field and id_field in header else None
    for row_no, row in enumerate(reader, start=1):
        if not row:
            continue
        text = row[text_at] if text_at < len(row) else ""
        doc_id = row[id_at] if id_at is not None and id_at < len(row) else f"{name}:{row_no}"
        yield Document(doc_id, text)


def read_parquet_file(path, name, stats, text_field, id_field) -> Iterator[Document]:
    try:
        pf = pq.ParquetFile(str(path))
    except (pa.ArrowInvalid, OSError) as err:
        raise CorpusError(f"{name}: not a readable Parquet file ({err})") from None
    columns = pf.schema_arrow.names
    if text_field not in columns:
        raise CorpusError(f"{name}: no column {text_field!r} (columns: {', '.join(columns)}); "
                          "choose it with --text-column")
    wanted = [text_field] + ([id_field] if id_field and id_field in columns else [])
    row_no = 0
    for batch in pf.iter_batches(batch_size=8192, columns=wanted):
        texts = batch.column(text_field).to_pylist()
        ids = batch.column(id_field).to_pylist() if len(wanted) > 1 else [None] * len(texts)
        stats.bytes_read += batch.nbytes
        for text, doc_id in zip(texts, ids, strict=True):
            row_no += 1
            yield Document(str(doc_id) if doc_id is not None else f"{name}:{row_no}",
                           "" if text is None else str(text))


def iter_documents(files: list[Path], root: Path, stats: ReadStats,
                   text_field: str = DEFAULT_TEXT_FIELD,
                   id_field: str | None = DEFAULT_ID_FIELD) -> Iterator[Document]:
    """All documents of all files in order, counting files, documents and replaced bytes."""
    for path in files:
        fmt, compression = split_suffixes(path)
        name = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        stats.files += 1
        before = stats.documents
        if fmt == "parquet":
            docs = read_parquet_file(path, name, stats, text_field, id_field)
        elif fmt == "jsonl":
            docs = read_jsonl_file(path, compression, name, stats, text_field, id_field)
        elif fmt in ("csv", "tsv"):
            docs = read_delimited_file(path, compression, name, stats, text_field, id_field,
                                       "\t" if fmt == "tsv" else ",")
        else:
            docs = read_text_file(path, compression, name, stats)
        for doc in docs:
            stats.documents += 1
            yield doc
        stats.per_file[name] = stats.documents - before
