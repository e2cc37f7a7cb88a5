"""Paragraph checks against brute-force references; `pipeline evaluate --paragraphs` CLI."""

import json

import numpy as np
import pytest
from helpers_cli import cli, one_error_line

from pipeline.analysis import paragraphs as para
from pipeline.analysis.evaluate import load_embedder
from pipeline.analysis.metrics import pearson, spearman
from pipeline.errors import InputFileError

TINY_A, TINY_B = "random:gpt2-tiny:7", "random:gpt2-tiny:8"


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_ranks(q, d, texts):
    """Rank of doc i for query i, one comparison at a time: every other text scoring at least
    as high is ahead of it (ties count against), a copy of the right text never is."""
    ranks = []
    for i in range(len(q)):
        right = float(q[i].astype(np.float32) @ d[i].astype(np.float32))
        ahead = sum(1 for j in range(len(d)) if texts[j] != texts[i]
                    and float(q[i].astype(np.float32) @ d[j].astype(np.float32)) >= right)
        ranks.append(1 + ahead)
    return np.array(ranks)


@pytest.mark.parametrize("seed", range(4))
def test_retrieval_matches_a_loop(seed, monkeypatch):
    monkeypatch.setattr(para, "BLOCK_ROWS", 7)  # several blocks, one of them short
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    q = unit(rng.normal(size=(n, 6)))
    d = unit(q + rng.normal(scale=1.0, size=q.shape))
    texts = [f"doc {i}" for i in range(n)]
    if seed % 2:  # exact ties: duplicated vectors under other texts, and a duplicated text
        d[n // 2] = d[0]
        texts[-1] = texts[0]
        d[-1] = d[0]
    ranks = para.retrieval_ranks(q, d, texts)
    np.testing.assert_array_equal(ranks, brute_ranks(q, d, texts))
    m = para.rank_metrics(ranks)
    assert m["recall@1"] == pytest.approx(np.mean(ranks <= 1))
    assert m["recall@10"] == pytest.approx(np.mean(ranks <= 10))
    assert m["mrr"] == pytest.approx(np.mean(1 / ranks))


def test_ties_do_not_favour_the_right_answer():
    n = 9
    same = np.ones((n, 4)) / 2.0  # a collapsed model: one vector for everything
    ranks = para.retrieval_ranks(same, same, [f"t{i}" for i in range(n)])
    assert ranks.tolist() == [n] * n
    # A copy of the right text is not a competitor, however it scores.
    assert para.retrieval_ranks(same, same, ["x"] * n).tolist() == [1] * n


def test_margin_matches_brute_force():
    rng = np.random.default_rng(3)
    q, d = unit(rng.normal(size=(12, 5))), unit(rng.normal(size=(12, 5)))
    sims = q @ d.T
    others = [sims[i, j] for i in range(12) for j in range(12) if i != j]
    m = para.margin_metrics(q, d)
    assert m["match_cosine"] == pytest.approx(np.mean(np.diag(sims)))
    assert m["other_cosine"] == pytest.approx(np.mean(others))
    assert m["margin"] == pytest.approx(np.mean(np.diag(sims)) - np.mean(others))


@pytest.mark.parametrize("n", [2, 3, 6, 50])
def test_agreement_pairs_hold_the_true_neighbours(n, monkeypatch):
    monkeypatch.setattr(para, "BLOCK_ROWS", 16)
    rng = np.random.default_rng(n)
    ref = unit(rng.normal(size=(n, 8)))
    pairs = para.agreement_pairs(ref)
    np.testing.assert_array_equal(pairs, para.agreement_pairs(ref.copy()))  # deterministic
    as_set = {tuple(p) for p in pairs.tolist()}
    assert len(as_set) == len(pairs) and all(i < j for i, j in as_set)
    k = min(para.NEIGHBOURS, n - 1)
    for i in range(n):
        # Brute force: the k others of highest cosine, one comparison at a time.
        sims = sorted(((float(ref[i] @ ref[j]), j) for j in range(n) if j != i), reverse=True)
        for _, j in sims[:k]:
            assert (min(i, j), max(i, j)) in as_set
    # Each document brings at most k nearest plus RANDOM_OTHERS random partners.
    assert len(pairs) <= n * (k + para.RANDOM_OTHERS)
    if n == 50:  # the random partners add pairs beyond the neighbours
        assert len(pairs) > n * k // 2 + n
    assert len(para.agreement_pairs(ref[:1])) == 0
    other_seed = para.agreement_pairs(ref, seed=1)
    assert n < 10 or not np.array_equal(pairs, other_seed)


def test_agreement_of_the_reference_with_itself_is_one():
    rng = np.random.default_rng(0)
    ref = unit(rng.normal(size=(30, 8)))
    pairs = para.agreement_pairs(ref)
    same = para.agreement_metrics(ref * 3.0, ref, pairs)  # scale does not change cosines
    assert same["agreement_pearson"] == pytest.approx(1.0)
    assert same["agreement_spearman"] == pytest.approx(1.0)
    other = para.agreement_metrics(unit(ref + rng.normal(size=ref.shape)), ref, pairs)
    assert other["agreement_pearson"] < 0.99


def write_paragraphs(path, rows):
    path.write_text("query\tdocument\n" + "".join(f"{q}\t{d}\n" for q, d in rows),
                    encoding="utf-8")
    return path


WIKI = [
    ("Bread: staple food baked from dough", "Bread is a staple food prepared from a dough of "
     "flour and water, usually by baking."),
    ("Erbium: chemical element with atomic number 68", "Erbium is a chemical element; it has "
     "symbol Er and atomic number 68."),
    ("Paris: capital of France", "Paris is the capital and largest city of France."),
    ("Guitar: fretted string instrument", "The guitar is a stringed musical instrument that is "
     "usually fretted and typically has six strings."),
    ("Moon: natural satellite of Earth", "The Moon is Earth's only natural satellite."),
    ("Python: programming language", "Python is a high-level, general-purpose programming "
     "language."),
    ("Onion: vegetable", "The onion is a vegetable that is the most widely cultivated species "
     "of the genus Allium."),
]
BIBLE = [
    ("In the beginning God created the heaven and the earth.",
     "In the beginning, God created the heavens and the earth."),
    ("And God said, Let there be light: and there was light.",
     "God said, \u201cLet there be light,\u201d and there was light."),
    ("Jesus wept.", "Jesus wept."),
    ("The LORD is my shepherd; I shall not want.",
     "Yahweh is my shepherd: I shall lack nothing."),
]


def test_read_paragraphs_errors(tmp_path):
    data = para.read_paragraphs(write_paragraphs(tmp_path / "wiki.tsv", WIKI))
    assert data.name == "wiki" and len(data) == len(WIKI)
    assert data.queries[2] == WIKI[2][0] and data.documents[2] == WIKI[2][1]
    cases = {
        "cols.tsv": (b"query\ttext\na\tb\n", "missing column"),
        "latin1.tsv": ("query\tdocument\ncaf\xe9\tx\n".encode("latin-1"), "not UTF-8"),
        "empty.tsv": (b"query\tdocument\n", "no rows"),
        "short.tsv": (b"query\tdocument\na\tb\nc\n", "line 3"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(InputFileError, match=message):
            para.read_paragraphs(tmp_path / name)
    with pytest.raises(InputFileError, match="no such file"):
        para.read_paragraphs(tmp_path / "missing.tsv")


def direct_metrics(spec, data, reference_spec):
    """What the CLI should report, computed here from the models' own vectors."""
    ref_embed, ref_name = load_embedder(reference_spec, "cpu")
    ref_docs = unit(para.embed_paragraphs(ref_embed, data)[1])
    pairs = para.agreement_pairs(ref_docs)
    embed, _ = load_embedder(spec, "cpu")
    q, d = para.embed_paragraphs(embed, data)
    ranks = brute_ranks(q, d, data.documents)
    sims = q @ d.T
    mine = [float(d[i] @ d[j]) for i, j in pairs]
    theirs = [float(ref_docs[i] @ ref_docs[j]) for i, j in pairs]
    return {"recall@1": np.mean(ranks <= 1), "recall@10": np.mean(ranks <= 10),
            "mrr": np.mean(1 / ranks),
            "margin": np.mean(np.diag(sims)) - (sims.sum() - np.trace(sims)) / (len(q) ** 2
                                                                                 - len(q)),
            "agreement_pearson": pearson(mine, theirs),
            "agreement_spearman": spearman(np.array(mine), np.array(theirs)),
            "agreement_pairs": len(pairs)}


def test_cli_paragraphs_end_to_end(tmp_path):
    wiki = write_paragraphs(tmp_path / "wiki.tsv", WIKI)
    bible = write_paragraphs(tmp_path / "bible.tsv", BIBLE)
    save = tmp_path / "out" / "results.json"
    result = cli("evaluate", "-m", TINY_A, "-m", TINY_B, "--paragraphs", wiki, "--paragraphs",
                 bible, "--reference", TINY_B, "--device", "cpu", "--json", "--save", save)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out == json.loads(save.read_text())
    assert [r["model"] for r in out] == [TINY_A, TINY_B]  # the --model order, reference or not
    for res in out:
        assert "metrics" not in res  # no --data, no STS-B metrics
        assert res["reference"] == TINY_B and set(res["paragraphs"]) == {"wiki", "bible"}
        assert res["paragraph_data"]["wiki"] == str(wiki)
    for name, data in (("wiki", wiki), ("bible", bible)):
        expected = direct_metrics(TINY_A, para.read_paragraphs(data), TINY_B)
        got = out[0]["paragraphs"][name]
        assert got["pairs"] == len(para.read_paragraphs(data))
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-5), (name, key)
        ref = out[1]["paragraphs"][name]
        assert ref["agreement_pearson"] == pytest.approx(1.0)
        assert ref["agreement_spearman"] == pytest.approx(1.0)
        assert ref["agreement_pairs"] == got["agreement_pairs"]  # the same pairs for all


def test_cli_paragraphs_with_pairs_and_tables(tmp_path):
    from test_evaluate import write_pairs

    data = write_pairs(tmp_path / "test.tsv")
    wiki = write_paragraphs(tmp_path / "wiki.tsv", WIKI)
    # A reference outside the --model list is loaded on its own, for its documents only.
    result = cli("evaluate", "-m", TINY_A, "--data", data, "--paragraphs", wiki,
                 "--reference", TINY_B, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    [res] = json.loads(result.stdout)
    assert "spearman" in res["metrics"] and res["reference"] == TINY_B
    assert res["paragraphs"]["wiki"]["agreement_pearson"] < 1.0
    # No --reference: no agreement, and the table leaves its rows out.
    table = cli("evaluate", "-m", TINY_A, "--data", data, "--paragraphs", wiki,
                "--device", "cpu")
    assert table.exit_code == 0, table.output
    assert "Spearman vs score" in table.stdout and "margin" in table.stdout
    assert "agreement" not in table.stdout
    with_ref = cli("evaluate", "-m", TINY_A, "-m", TINY_B, "--paragraphs", wiki,
                   "--reference", TINY_B, "--device", "cpu")
    assert with_ref.exit_code == 0, with_ref.output
    assert "agreement Pearson" in with_ref.stdout and "Spearman vs score" not in with_ref.stdout


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    (b"query\tdoc\na\tb\n", "missing column"),
    ("query\tdocument\ncaf\xe9\tx\n".encode("latin-1"), "not UTF-8"),
    (b"query\tdocument\n", "no rows"),
])
def test_cli_bad_paragraph_files(tmp_path, content, message):
    path = tmp_path / "bad.tsv"
    if content is not None:
        path.write_bytes(content)
    line = one_error_line(cli("evaluate", "-m", TINY_A, "--paragraphs", path,
                              "--device", "cpu"))
    assert message in line


def test_cli_needs_something_to_evaluate(tmp_path):
    assert "--paragraphs" in one_error_line(cli("evaluate", "-m", TINY_A, "--device", "cpu"))
    wiki = write_paragraphs(tmp_path / "wiki.tsv", WIKI)
    (tmp_path / "b").mkdir()
    same_name = write_paragraphs(tmp_path / "b" / "wiki.tsv", WIKI)
    assert "named 'wiki'" in one_error_line(cli("evaluate", "-m", TINY_A, "--paragraphs", wiki,
                                                "--paragraphs", same_name, "--device", "cpu"))
