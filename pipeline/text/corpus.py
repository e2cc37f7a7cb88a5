"""Reading corpora: plain text, JSON Lines, CSV/TSV and Parquet, compressed or not, one file,
a folder or a glob, streamed document by document.

Every document gets a stable id: the one the data gives (``--id-field``), else one derived
from its file and line (``docs.txt:17``), so re-running over the same files gives the same ids.
Undecodable bytes are replaced (U+FFFD) and counted; files that are not text at all are
refused before anything is written.

The rules for values (JSON Lines and Parquet; CSV/TSV cells are strings already):

- A text field must be a string. A number is converted with str() (42 -> "42"); null, a
  missing field or an empty string is an empty document (skipped and counted in
  ``empty_skipped``); booleans, lists, objects and bytes are not text: the record is skipped
  and counted in ``non_text_skipped``. A JSON Lines file in which no record has the field is
  refused (a wrong ``--text-field``).
- An id must be a string or an integer (converted with str: 7 and "7" are the same id); a
  null, missing or empty id gives the derived FILE:LINE id; anything else is refused, naming
  the record. Ids must be unique in the whole corpus: search merges the hits of one id, so a
  repeated one would hide a document. A repeat is refused, naming both places.

A CSV field may be quoted over several lines (RFC 4180); a quote that is never closed is
refused, naming the line of the row it opens in. TSV has no quoting: a row is a line.

A folder is read recursively, not following links to folders. A glob follows them, entering
each real folder once, so a link loop (a/b/up -> a) ends there. Either way each real file is
read once, under its real name where the corpus names it by that too.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import NamedTuple

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


class Record(NamedTuple):
    """A record as its file holds it, before the rules for text and ids (module docstring)."""

    number: int  # in its file, from 1: a derived id is FILE:number
    line: int | None  # the line it starts on, for messages; None in Parquet (rows, no lines)
    text: object
    doc_id: object = None  # None where the record has no id


@dataclass
class ReadStats:
    """Counts that end up in the summary and the manifest."""

    files: int = 0
    documents: int = 0
    empty_skipped: int = 0
    non_text_skipped: int = 0  # records whose text is a boolean, list, object or bytes
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
        # rglob does not follow links to folders: a link loop cannot trap it.
        files = drop_aliases(sorted(p for p in path.rglob("*")
                                    if p.is_file() and split_suffixes(p)[0] is not None
                                    and not p.name.startswith(".")))
        if not files:
            raise CorpusError(f"{spec}: folder holds no .txt/.jsonl/.csv/.tsv/.parquet files")
        return files, path
    if has_magic(spec):
        files = drop_aliases(sorted(glob_files(spec)))
        if not files:
            raise CorpusError(f"{spec}: no files match")
        return files, Path(os.path.commonpath([str(f.parent) for f in files]))
    raise CorpusError(f"{spec}: no such file or folder")


def has_magic(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def glob_files(spec: str) -> Iterator[Path]:
    """The files a glob matches, by glob.glob's rules (a wildcard matches no hidden name, **
    any depth of folders), except that ** enters each real folder once: glob.glob follows a
    link loop 40 links deep, and each further loop doubles that walk."""
    parts = Path(spec).parts
    first = next(i for i, part in enumerate(parts) if has_magic(part))
    yield from expand(Path(*parts[:first]), parts[first:])


def expand(folder: Path, pattern: tuple[str, ...]) -> Iterator[Path]:
    """The files under `folder` whose path below it matches `pattern`, one part per level."""
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        for sub in walk_folders(folder):
            yield from expand(sub, rest or ("*",))  # a last ** matches every file below
        return
    if has_magic(head):
        # As glob.glob: a hidden name only matches a part that starts with "." itself.
        names = [e.name for e in list_folder(folder) if fnmatch.fnmatch(e.name, head)
                 and (head.startswith(".") or not e.name.startswith("."))]
    else:
        names = [head]  # a plain part (even "..") names one entry, listed or not
    for name in names:
        path = folder / name
        if rest and path.is_dir():
            yield from expand(path, rest)
        elif not rest and path.is_file():
            yield path


def walk_folders(top: Path) -> Iterator[Path]:
    """`top` and the folders below it (no hidden ones), following links to folders but
    entering each real folder, known by device and inode, once."""
    seen = set()
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            info = folder.stat()
        except OSError:
            continue  # a dangling link, or gone meanwhile
        if (info.st_dev, info.st_ino) in seen:
            continue
        seen.add((info.st_dev, info.st_ino))
        yield folder
        subs = [folder / e.name for e in list_folder(folder)
                if not e.name.startswith(".") and is_kind(e, "dir")]
        stack.extend(reversed(subs))  # depth first, in name order


def list_folder(folder: Path) -> list[os.DirEntry]:
    """A folder's entries by name; none where it cannot be read (glob.glob skips it too)."""
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda e: e.name)
    except OSError:
        return []


def is_kind(entry: os.DirEntry, kind: str) -> bool:
    """Whether an entry is (or links to) a folder or a file."""
    try:
        return entry.is_dir() if kind == "dir" else entry.is_file()
    except OSError:
        return False


def drop_aliases(files: list[Path]) -> list[Path]:
    """Each real file once (two names for one file would read it twice, its ids repeated),
    under its real name where that is one of them, so that a link added beside a file
    leaves the file's ids as they were; sorted."""
    real_first = sorted(files, key=lambda f: (f.resolve() != f.absolute(), f))
    seen, kept = set(), []
    for f in real_first:
        info = f.stat()
        if (info.st_dev, info.st_ino) not in seen:
            seen.add((info.st_dev, info.st_ino))
            kept.append(f)
    return sorted(kept)


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


def iter_raw_lines(path: Path, compression: str | None, stats: ReadStats,
                   keep_ends: bool = False) -> Iterator[bytes]:
    """The file's lines, without their line ends unless `keep_ends` (the csv module needs them
    to keep the line breaks of a quoted field)."""
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
            yield line + b"\n" if keep_ends else line.rstrip(b"\r")
        try:
            block = stream.read(1 << 20)
        except (pa.ArrowInvalid, OSError) as err:
            raise CorpusError(f"{path}: cannot read ({err})") from None
        if not block:
            break
        pending += block
    if pending:
        stats.bytes_read += len(pending)
        yield pending if keep_ends else pending.rstrip(b"\r")


def read_text_file(path, compression, name, stats) -> Iterator[Record]:
    for line_no, raw in enumerate(iter_raw_lines(path, compression, stats), start=1):
        yield Record(line_no, line_no, decode_line(raw, stats))


def read_jsonl_file(path, compression, name, stats, text_field, id_field) -> Iterator[Record]:
    has_field = has_records = False
    for line_no, raw in enumerate(iter_raw_lines(path, compression, stats), start=1):
        line = decode_line(raw, stats)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{name}:{line_no}: invalid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise CorpusError(f"{name}:{line_no}: not a JSON object (a record is an object "
                              f"with a field {text_field!r})")
        has_records = True
        has_field = has_field or text_field in record
        yield Record(line_no, line_no, record.get(text_field),
                     record.get(id_field) if id_field else None)
    # A record without the field is an empty document; a file without it is the wrong field.
    if has_records and not has_field:
        raise CorpusError(f"{name}: no field {text_field!r} in any record "
                          "(choose it with --text-field)")


def read_delimited_file(path, compression, name, stats, text_field, id_field,
                        delimiter) -> Iterator[Record]:
    lines = (decode_line(raw, stats)
             for raw in iter_raw_lines(path, compression, stats, keep_ends=True))
    # TSV has no quoting convention (a field may start with a quote); CSV follows RFC 4180,
    # strictly: a quote never closed is an error, not the rest of the file read as one field.
    reader = csv.reader(lines, delimiter=delimiter, strict=True,
                        quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
    rows = numbered_rows(reader, name)
    _, header = next(rows, (0, None))
    if header is None:
        return
    if text_field not in header:
        raise CorpusError(f"{name}: no column {text_field!r} (columns: {', '.join(header)}); "
                          "choose it with --text-column")
    text_at = header.index(text_field)
    id_at = header.index(id_field) if id_field and id_field in header else None
    for row_no, (line_no, row) in enumerate(rows, start=1):
        if not row:
            continue
        yield Record(row_no, line_no, row[text_at] if text_at < len(row) else "",
                     row[id_at] if id_at is not None and id_at < len(row) else None)


def numbered_rows(reader, name: str) -> Iterator[tuple[int, list[str]]]:
    """(the line a row starts on, the row); a malformed row is one CorpusError naming it."""
    while True:
        line_no = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            if "unexpected end of data" in str(err):
                raise CorpusError(f"{name}:{line_no}: a quote opened in this row is never "
                                  "closed (the rest of the file would be one field)") from None
            raise CorpusError(f"{name}:{line_no}: malformed row ({err})") from None
        yield line_no, row


def read_parquet_file(path, name, stats, text_field, id_field,
                      row_groups: Sequence[int] | None = None) -> Iterator[Record]:
    """Records of a Parquet file, or of its `row_groups` only (a Ray piece of the file,
    text/ray_tokenize.py): numbered by row in the whole file either way."""
    try:
        pf = pq.ParquetFile(str(path))
    except (pa.ArrowInvalid, OSError) as err:
        raise CorpusError(f"{name}: not a readable Parquet file ({err})") from None
    columns = pf.schema_arrow.names
    if text_field not in columns:
        raise CorpusError(f"{name}: no column {text_field!r} (columns: {', '.join(columns)}); "
                          "choose it with --text-column")
    wanted = [text_field] + ([id_field] if id_field and id_field in columns else [])
    row_no = sum(pf.metadata.row_group(g).num_rows for g in range(row_groups[0])
                 ) if row_groups else 0
    for batch in pf.iter_batches(batch_size=8192, columns=wanted, row_groups=row_groups):
        texts = batch.column(text_field).to_pylist()
        ids = batch.column(id_field).to_pylist() if len(wanted) > 1 else [None] * len(texts)
        stats.bytes_read += batch.nbytes
        for text, doc_id in zip(texts, ids, strict=True):
            row_no += 1
            yield Record(row_no, None, text, doc_id)


def read_records(path: Path, name: str, stats: ReadStats, text_field: str,
                 id_field: str | None, row_groups: Sequence[int] | None = None
                 ) -> Iterator[Record]:
    fmt, compression = split_suffixes(path)
    if fmt == "parquet":
        return read_parquet_file(path, name, stats, text_field, id_field, row_groups)
    if fmt == "jsonl":
        return read_jsonl_file(path, compression, name, stats, text_field, id_field)
    if fmt in ("csv", "tsv"):
        return read_delimited_file(path, compression, name, stats, text_field, id_field,
                                   "\t" if fmt == "tsv" else ",")
    return read_text_file(path, compression, name, stats)


def place(name: str, record: Record) -> str:
    """Where a record is, for messages: file:line, or file row N in Parquet."""
    return f"{name}:{record.line}" if record.line is not None else f"{name} row {record.number}"


def text_value(value: object) -> str | None:
    """A text field's text; None where it holds no text (a boolean, list, object, bytes)."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        return str(value)
    return None


def id_value(value: object, name: str, record: Record) -> str | None:
    """A given id as a string; None where there is none (null, missing or empty)."""
    if isinstance(value, str) or value is None:
        return value or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    raise CorpusError(f"{place(name, record)}: the id {shown} is not a string or an integer "
                      "(or give --id-field '' for FILE:LINE ids)")


def document_id(name: str, record: Record) -> tuple[str, bool]:
    """The record's id, and whether it is derived (FILE:N, where the record gives none)."""
    given = id_value(record.doc_id, name, record)
    return (f"{name}:{record.number}", True) if given is None else (given, False)


def file_name(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def iter_documents(files: list[Path], root: Path, stats: ReadStats,
                   text_field: str = DEFAULT_TEXT_FIELD,
                   id_field: str | None = DEFAULT_ID_FIELD) -> Iterator[Document]:
    """All documents of all files in order, counting files, documents, skipped records and
    replaced bytes; a repeated id is a CorpusError."""
    ids = IdCheck()
    for path in files:
        name = file_name(path, root)
        for document, derived, record in file_documents(path, name, stats, text_field,
                                                        id_field):
            if ids.may_repeat(document.doc_id, name, derived):
                check_repeat(files, root, document.doc_id, place(name, record), text_field,
                             id_field)
            yield document


def file_documents(path: Path, name: str, stats: ReadStats, text_field: str,
                   id_field: str | None, row_groups: Sequence[int] | None = None
                   ) -> Iterator[tuple[Document, bool, Record]]:
    """(document, whether its id is derived, its record) for each record of one file (or of
    its Parquet `row_groups`) that holds text, counting into `stats`; ids are not checked
    for repeats here (`IdCheck`: across the corpus)."""
    if not row_groups or row_groups[0] == 0:
        stats.files += 1  # a file in pieces counts once, with its first piece
    before = stats.documents
    for record in read_records(path, name, stats, text_field, id_field, row_groups):
        stats.documents += 1
        text = text_value(record.text)
        if text is None:
            stats.non_text_skipped += 1
            continue
        doc_id, derived = document_id(name, record)
        yield Document(doc_id, text), derived, record
    stats.per_file[name] = stats.per_file.get(name, 0) + stats.documents - before


def check_repeat(files: list[Path], root: Path, doc_id: str, here: str | None,
                 text_field: str, id_field: str | None) -> None:
    """Raise the CorpusError of a repeated id, naming both places, if the id that `IdCheck`
    says may repeat (at `here`, or None: the second place is found too) really does."""
    found = places(files, root, doc_id, text_field, id_field, 1 if here else 2)
    second = here or (found[1] if len(found) > 1 else None)
    if found and second is not None and found[0] != second:
        raise CorpusError(f"corpus has the id {json.dumps(doc_id)} twice: {found[0]} "
                          f"and {second}: ids must be unique (give --id-field '' "
                          "for FILE:LINE ids)")


class IdCheck:
    """Tells which ids may have come before. The given ids are kept (a set of strings); the
    derived ones (FILE:N) are not, since no two of them are the same: a given id may still
    equal one, so the files that had derived ids are kept, to look whether it does."""

    def __init__(self):
        self.given: set[str] = set()
        self.derived_in: set[str] = set()

    def may_repeat(self, doc_id: str, name: str, derived: bool) -> bool:
        if derived:
            self.derived_in.add(name)
            return doc_id in self.given
        if doc_id in self.given:
            return True
        self.given.add(doc_id)
        if not self.derived_in:
            return False  # the common case: every record so far had its id
        file, _, number = doc_id.rpartition(":")
        return file in self.derived_in and number.isdigit()


def places(files: list[Path], root: Path, doc_id: str, text_field: str,
           id_field: str | None, count: int) -> list[str]:
    """Where the documents with this id occur, the first `count` of them: read again from
    the start, which only a repeated id (an error) or a given id shaped like a derived one
    costs."""
    stats, found = ReadStats(), []
    for path in files:
        name = file_name(path, root)
        for record in read_records(path, name, stats, text_field, id_field):
            if text_value(record.text) is None:
                continue
            if document_id(name, record)[0] == doc_id:
                found.append(place(name, record))
                if len(found) == count:
                    return found
    return found
