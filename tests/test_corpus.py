"""Reading every corpus format, compressed or not, with stable ids and honest counts."""

import contextlib
import gzip
import json
import os
import signal
from pathlib import Path

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


@contextlib.contextmanager
def time_limit(seconds):
    """Fail, rather than hang the suite, where a walk does not end."""
    def expire(signum, frame):
        raise TimeoutError(f"took over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_glob_reads_each_real_file_once_through_symlink_loops(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "top.txt").write_text("alpha\n")
    (corpus / "sub" / "deep.txt").write_text("beta\n")
    os.symlink(corpus, corpus / "sub" / "back")  # a loop: sub/back/sub/back/...
    with time_limit(10):
        files, _ = resolve_corpus(f"{corpus}/**/*.txt")
    assert files == [corpus / "sub" / "deep.txt", corpus / "top.txt"]
    # Two loops: a naive walk takes 2**40 paths. A link to a file outside is still read, once.
    os.symlink(corpus / "sub", corpus / "sub" / "again")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "far.txt").write_text("gamma\n")
    os.symlink(tmp_path / "outside", corpus / "linked")
    os.symlink(corpus / "top.txt", corpus / "alias.txt")
    with time_limit(10):
        docs, stats = read(f"{corpus}/**/*.txt")
    assert sorted(t for _, t in docs) == ["alpha", "beta", "gamma"] and stats.files == 3


def test_glob_keeps_glob_rules(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / ".hidden").mkdir()
    for name in ("x.txt", "a/y.txt", "a/z.md", ".hidden/h.txt", ".dot.txt"):
        (tmp_path / name).write_text(f"{name}\n")

    def names(spec):
        return [str(f.relative_to(tmp_path)) for f in resolve_corpus(spec)[0]]

    assert names(f"{tmp_path}/**/*.txt") == ["a/y.txt", "x.txt"]  # no hidden ones
    assert names(f"{tmp_path}/*.txt") == ["x.txt"]
    assert names(f"{tmp_path}/*/*.[tm][xd]*") == ["a/y.txt", "a/z.md"]
    assert names(f"{tmp_path}/a/**") == ["a/y.txt", "a/z.md"]
    assert names(f"{tmp_path}/.hidden/*") == [".hidden/h.txt"]
    with pytest.raises(CorpusError, match="no files match"):
        resolve_corpus(f"{tmp_path}/**/*.csv")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def tokenize_cli(tmp_path, corpus, *options):
    from typer.testing import CliRunner

    from pipeline.cli import app

    return CliRunner().invoke(app, ["tokenize", str(corpus), "--index", str(tmp_path / "idx"),
                                    *options])


def assert_refused(result, tmp_path, *needles):
    """Exit 1 with one `error:` line naming each needle, and no index folder left behind."""
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not (tmp_path / "idx").exists()


def test_duplicate_ids_across_files_are_refused(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", [{"id": f"a{i}", "text": f"text {i}"} for i in range(3)]
                + [{"id": "x", "text": "first x"}])
    write_jsonl(corpus / "b.jsonl", [{"id": f"b{i}", "text": f"more {i}"} for i in range(6)]
                + [{"id": "x", "text": "second x"}])
    result = tokenize_cli(tmp_path, corpus)
    assert_refused(result, tmp_path, '"x" twice', "a.jsonl:4", "b.jsonl:7", "--id-field")
    # Without the id field, ids are FILE:LINE and cannot clash.
    assert tokenize_cli(tmp_path, corpus, "--id-field", "").exit_code == 0


@pytest.mark.parametrize("name,write,places", [
    ("t.csv", lambda p: p.write_text("id,text\n7,one\n8,two\n7,three\n"),
     ["t.csv:2", "t.csv:4"]),
    ("t.tsv", lambda p: p.write_text("id\ttext\nq\tone\nq\ttwo\n"), ["t.tsv:2", "t.tsv:3"]),
    ("t.parquet", lambda p: pq.write_table(pa.table({"id": [1, 2, 1], "text": ["a", "b", "c"]}),
                                           p), ["t.parquet row 1", "t.parquet row 3"]),
    # An integer id and the same digits as a string are one id once converted.
    ("t.jsonl", lambda p: write_jsonl(p, [{"id": 5, "text": "a"}, {"id": "5", "text": "b"}]),
     ["t.jsonl:1", "t.jsonl:2"]),
])
def test_duplicate_ids_within_a_file_are_refused(tmp_path, name, write, places):
    write(tmp_path / name)
    with pytest.raises(CorpusError, match="twice") as caught:
        read(tmp_path / name)
    assert all(place in str(caught.value) for place in places), caught.value


def test_csv_quoted_newlines_are_kept(tmp_path):
    (tmp_path / "t.csv").write_text('id,text\na,"line one\nline two"\nb,"x, ""y""\r\nz"\nc,last\n')
    docs, _ = read(tmp_path / "t.csv")
    assert docs == [("a", "line one\nline two"), ("b", 'x, "y"\r\nz'), ("c", "last")]


def test_csv_quoted_newlines_in_compressed_files(tmp_path):
    payload = b'id,text\na,"one\ntwo"\nb,three\n'
    (tmp_path / "t.csv.gz").write_bytes(gzip.compress(payload))
    docs, _ = read(tmp_path / "t.csv.gz")
    assert docs == [("a", "one\ntwo"), ("b", "three")]


@pytest.mark.parametrize("text,line,message", [
    ('id,text\na,fine\nb,"never closed\nc,eaten\nd,eaten too\n', 3, "never closed"),
    ('id,text\na,"two\nlines"\nb,"closed" then junk\nc,fine\n', 4, "malformed row"),
])
def test_csv_unterminated_quote_is_refused(tmp_path, text, line, message):
    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(CorpusError, match=f"t.csv:{line}: .*{message}") as caught:
        read(tmp_path / "t.csv")
    assert "\n" not in str(caught.value)


def test_tsv_quotes_are_literal_and_lines_are_rows(tmp_path):
    # TSV has no quoting: a lone quote is a character, and never swallows the next row.
    (tmp_path / "t.tsv").write_text('id\ttext\na\t"never closed\nb\tnext row\n')
    docs, _ = read(tmp_path / "t.tsv")
    assert docs == [("a", '"never closed'), ("b", "next row")]


def test_non_string_text_is_skipped_and_counted(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [
        {"id": "s", "text": "words"}, {"id": "n", "text": 42}, {"id": "f", "text": 1.5},
        {"id": "b", "text": True}, {"id": "o", "text": {"x": 1}}, {"id": "l", "text": ["a"]},
        {"id": "z", "text": None}])
    docs, stats = read(tmp_path / "t.jsonl")
    assert docs == [("s", "words"), ("n", "42"), ("f", "1.5"), ("z", "")]
    # Skipped records count as documents read, as empty ones do.
    assert stats.non_text_skipped == 3 and stats.documents == 7
    pq.write_table(pa.table({"id": ["a", "b"], "text": [b"bytes", b"more"]}),
                   tmp_path / "b.parquet")
    pq.write_table(pa.table({"id": ["c", "d"], "text": [7, None]}), tmp_path / "n.parquet")
    docs, stats = read(str(tmp_path / "*.parquet"))
    assert docs == [("c", "7"), ("d", "")] and stats.non_text_skipped == 2
    assert stats.per_file == {"b.parquet": 2, "n.parquet": 2}


@pytest.mark.parametrize("bad", [True, 1.5, {"x": 1}, ["a"]])
def test_non_string_ids_are_refused(tmp_path, bad):
    write_jsonl(tmp_path / "t.jsonl", [{"id": "ok", "text": "a"}, {"id": bad, "text": "b"}])
    with pytest.raises(CorpusError, match=r"t\.jsonl:2: .*id"):
        read(tmp_path / "t.jsonl")


def test_non_text_counts_reach_the_manifest(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [{"id": "a", "text": "words"}, {"id": "b", "text": True}])
    result = tokenize_cli(tmp_path, tmp_path / "t.jsonl")
    assert result.exit_code == 0, result.output
    from pipeline.folder import IndexFolder

    stats = IndexFolder(tmp_path / "idx").manifest["tokenize"]["stats"]
    assert stats["documents"] == 2 and stats["non_text_skipped"] == 1
    assert "1 non-text" in result.output


def test_a_given_id_may_not_be_another_records_derived_id(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\n")  # ids a.txt:1, a.txt:2
    write_jsonl(tmp_path / "b.jsonl", [{"id": "a.txt:5", "text": "x"},  # no such line
                                       {"id": "a.txt:2", "text": "y"}])
    with pytest.raises(CorpusError, match='"a.txt:2" twice: a.txt:2 and b.jsonl:2'):
        read(tmp_path)
    # The other way round: a derived id that a given one took first.
    write_jsonl(tmp_path / "b.jsonl", [{"id": "c.txt:1", "text": "x"}])
    (tmp_path / "c.txt").write_text("three\n")
    with pytest.raises(CorpusError, match='"c.txt:1" twice: b.jsonl:1 and c.txt:1'):
        read(tmp_path)


def test_missing_and_empty_ids_and_texts(tmp_path):
    # Empty id cells get FILE:LINE ids (they are not one repeated id ""); a record without
    # the text field is an empty document.
    (tmp_path / "t.csv").write_text("id,text\n,one\n,two\nk,three\n")
    docs, _ = read(tmp_path / "t.csv")
    assert docs == [("t.csv:1", "one"), ("t.csv:2", "two"), ("k", "three")]
    write_jsonl(tmp_path / "t.jsonl", [{"id": "a", "text": "x"}, {"id": "b"}, {"text": "z"}])
    docs, stats = read(tmp_path / "t.jsonl")
    assert docs == [("a", "x"), ("b", ""), ("t.jsonl:3", "z")] and stats.documents == 3


def test_folder_reads_a_linked_file_once_under_its_real_name(tmp_path):
    (tmp_path / "part-1.txt").write_text("alpha\n")
    os.symlink(tmp_path / "part-1.txt", tmp_path / "latest.txt")
    docs, stats = read(tmp_path)
    assert docs == [("part-1.txt:1", "alpha")] and stats.files == 1


def test_relative_glob(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("alpha\n")
    monkeypatch.chdir(tmp_path)
    assert resolve_corpus("**/*.txt")[0] == [Path("sub/a.txt")]
    assert read("s*/*.txt")[0] == [("a.txt:1", "alpha")]


def test_glob_with_plain_parts_after_a_wildcard(tmp_path):
    for name in ("x/docs/a.txt", "y/docs/b.txt", "y/other/c.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("text\n")
    files, _ = resolve_corpus(f"{tmp_path}/*/docs/*.txt")
    assert files == [tmp_path / "x/docs/a.txt", tmp_path / "y/docs/b.txt"]
    files, _ = resolve_corpus(f"{tmp_path}/x/*/../../y/*/c.txt")
    assert [f.name for f in files] == ["c.txt"]
