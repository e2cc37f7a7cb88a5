"""A corpus that grows and changes: only new and changed documents are tokenized into new rows
and embedded, build-index adds them to the trained index, deleted and changed documents are
never returned; checked against a folder built afresh from the same corpus."""

import json

import numpy as np
from helpers_cli import TINY, ok

from pipeline.folder import IndexFolder
from pipeline.search import search


def docs(ids_texts):
    return "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in ids_texts)


def corpus_v1():
    return [(f"d{i}", f"bread number {i} is baked in oven {i % 7} for {i % 5} hours")
            for i in range(300)]


def corpus_v2():
    docs_ = [(i, t) for i, t in corpus_v1() if i not in ("d10", "d11")]  # two deleted
    docs_ = [(i, "a completely different text about sailing boats" if i == "d20" else t)
             for i, t in docs_]  # one changed
    return docs_ + [(f"n{i}", f"new loaf {i} of rye rests {i % 3} days") for i in range(30)]


def stages(corpus, index, *build_args):
    ok("tokenize", corpus, "--index", index, "--max-tokens", 64)
    ok("embed", "--index", index, *TINY)
    return ok("build-index", "--index", index, *build_args)


def test_an_update_adds_only_what_changed_and_searches_like_a_fresh_build(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(docs(corpus_v1()))
    index = tmp_path / "idx"
    stages(corpus, index)
    before = IndexFolder(index)
    old_shards = list(before.token_shards)
    old_hashes = {s["name"]: (index / "tokens" / s["name"]).read_bytes() for s in old_shards}
    old_rows = before.rows
    deleted_rows = {r["doc_id"]: r for r in before.read_rows(range(old_rows), ("doc_id",))}
    assert len(deleted_rows) == 300

    corpus.write_text(docs(corpus_v2()))
    result = stages(corpus, index)
    after = IndexFolder(index)
    update = after.manifest["tokenize"]["stats"]["update"]
    assert update["documents"] == {"added": 30, "changed": 1, "deleted": 2, "unchanged": 297}
    assert update["new_rows"] == 31 and after.rows == old_rows + 31
    # the old shards are untouched, and only the new one was embedded
    for name, data in old_hashes.items():
        assert (index / "tokens" / name).read_bytes() == data
    assert after.embed["stats"]["skipped_shards"] == len(old_shards)
    deleted = after.deleted_rows.tolist()
    gone = after.read_rows(deleted, ("doc_id",))
    assert sorted(r["doc_id"] for r in gone) == ["d10", "d11", "d20"]
    info = json.loads((index / "index.json").read_text())
    assert info["update"]["added_rows"] == 31 and info["n"] == old_rows + 31
    assert "added 31 rows" in result.stderr

    fresh = tmp_path / "fresh"
    fresh_corpus = tmp_path / "fresh.jsonl"
    fresh_corpus.write_text(docs(corpus_v2()))
    stages(fresh_corpus, fresh)
    queries = ["bread number 10 is baked in oven 3 for 0 hours", "sailing boats",
               "new loaf 4 of rye", "bread number 20 is baked in oven 6 for 0 hours"]
    updated_hits = search(index, queries, k=8, model=TINY[1])
    fresh_hits = search(fresh, queries, k=8, model=TINY[1])
    for got, want in zip(updated_hits, fresh_hits, strict=True):
        assert [h.doc_id for h in got] == [h.doc_id for h in want]
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-5)
        assert not {"d10", "d11"} & {h.doc_id for h in got}
        d20 = [h for h in got if h.doc_id == "d20"]
        assert all(h.text.startswith("a completely different") for h in d20)


def test_an_unchanged_corpus_is_current_and_a_rewritten_one_starts_afresh(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(docs(corpus_v1()))
    index = tmp_path / "idx"
    stages(corpus, index)
    shards = IndexFolder(index).token_shards
    ok("tokenize", corpus, "--index", index, "--max-tokens", 64)
    assert IndexFolder(index).token_shards == shards
    # most documents gone: an update would keep more deleted rows than live ones
    corpus.write_text(docs([(f"z{i}", f"pebble {i} on the shore") for i in range(100)]))
    ok("tokenize", corpus, "--index", index, "--max-tokens", 64)
    folder = IndexFolder(index)
    assert folder.rows == 100 and folder.deleted_rows.size == 0
    assert "update" not in folder.manifest["tokenize"]["stats"]
