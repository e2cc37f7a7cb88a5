"""Reading every corpus format, compressed or not, with stable ids and honest counts."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.text.corpus import CorpusError, ReadStats, iter_documents, resolve_corpus

TEXTS = ["first document", "", "second, with a comma", "third \"quoted\" text"]


def write_all_formats(folder):
    (folder / "plain.txt").write_text("\n".join(TEXTS) + "\n")
    (folder / "lines.jsonl").write_text(
        "\n".join(json.dumps({"id": f"j{i}", "body": t}) for i, t in enumerate(TEXTS)) + "\n")
    import csv

    with open(folder / "table.csv", "w", newline="") as fh:
        w = csv.writer(fh)  # RFC 4180: the quoted text gets doubled quotes
        w.writerow(["key", "body"])
        for i, t in enumerate(TEXTS):
            w.writerow([f"c{i}", t])
    # TSV has no quoting: quotes are literal characters, as in the STS-B files.
    (folder / "table.tsv").write_text("key\tbody\n" + "".join(
        f"c{i}\t{t}\n" for i, t in enumerate(TEXTS)))
    pq.write_table(pa.table({"key": [f"p{i}" for i in range(4)], "body": TEXTS}),
                   folder / "table.parquet")


def read(spec, **kwargs):
    files, root = resolve_corpus(spec)
    stats = ReadStats()
    return [(d.doc_id, d.text) for d in iter_documents(files, root, stats, **kwargs)], stats


def test_plain_text_ids_are_file_and_line(tmp_path):
    write_all_formats(tmp_path)
    docs, stats = read(tmp_path / "plain.txt")
    assert docs == [(f"plain.txt:{i + 1}", t) for i, t in enumerate(TEXTS)]
    assert stats.documents == 4 and stats.undecodable_replaced == 0


@pytest.mark.parametrize("name,id_field,prefix", [
    ("lines.jsonl", "id", "j"), ("table.csv", "key", "c"), ("table.tsv", "key", "c"),
    ("table.parquet", "key", "p")])
def test_structured_formats(tmp_path, name, id_field, prefix):
    write_all_formats(tmp_path)
    docs, _ = read(tmp_path / name, text_field="body", id_field=id_field)
    assert docs == [(f"{prefix}{i}", t) for i, t in enumerate(TEXTS)]
    # Without an id field, ids come from file and record number.
    docs, _ = read(tmp_path / name, text_field="body", id_field="nope")
    assert [d[0] for d in docs] == [f"{name}:{i + 1}" for i in range(4)]


@pytest.mark.parametrize("suffix,compress", [
    (".gz", gzip.compress),
    (".zst", lambda b: pa.compress(b, "zstd", asbytes=True)),
])
def test_compressed_files_match_plain(tmp_path, suffix, compress):
    payload = ("\n".join(f"line {i} " + "x" * (i % 50) for i in range(5000)) + "\n").encode()
    (tmp_path / "plain.txt").write_bytes(payload)
    # pa.compress writes one raw zstd frame, which is a valid .zst file.
    (tmp_path / f"packed.txt{suffix}").write_bytes(compress(payload))
    plain, _ = read(tmp_path / "plain.txt")
    packed, _ = read(tmp_path / f"packed.txt{suffix}")
    assert [t for _, t in packed] == [t for _, t in plain]


def test_folder_and_glob(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha\nbeta\n")
    (tmp_path / "sub" / "b.txt").write_text("gamma\n")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    docs, stats = read(tmp_path)
    assert docs == [("a.txt:1", "alpha"), ("a.txt:2", "beta"), ("sub/b.txt:1", "gamma")]
    assert stats.files == 2
    docs, _ = read(str(tmp_path / "*.txt"))
    assert docs == [("a.txt:1", "alpha"), ("a.txt:2", "beta")]


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
    (tmp_path / "mixed.txt").write_bytes(b"good line\nbad \xff\xfe line\nfine\n")
    docs, stats = read(tmp_path / "mixed.txt")
    assert docs[1] == ("mixed.txt:2", "bad \ufffd\ufffd line")
    assert stats.undecodable_replaced == 1


@pytest.mark.parametrize("make,message", [
    (lambda p: p.write_bytes(bytes(range(256)) * 400), "does not look like text"),
    (lambda p: p.write_text('{"id": 1, "text": "ok"}\n{broken\n'), "invalid JSON"),
    (lambda p: p.write_text('{"id": 1, "body": "x"}\n'), "no field 'text'"),
])
def test_bad_files_give_clear_errors(tmp_path, make, message):
    suffix = ".jsonl" if "JSON" in message or "field" in message else ".txt"
    path = tmp_path / f"bad{suffix}"
    make(path)
    with pytest.raises(CorpusError, match=message):
        read(path)


def test_missing_column_and_missing_path(tmp_path):
    write_all_formats(tmp_path)
    with pytest.raises(CorpusError, match="no column 'text'.*key, body"):
        read(tmp_path / "table.csv")
    with pytest.raises(CorpusError, match="no column 'text'"):
        read(tmp_path / "table.parquet")
    with pytest.raises(CorpusError, match="no such file"):
        resolve_corpus(tmp_path / "missing.txt")
    with pytest.raises(CorpusError, match="not a readable Parquet"):
        (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
        read(tmp_path / "junk.parquet")
