"""Tests of data_sets/build_text_corpus.py's pure parsers, on small inputs in the real formats."""

from __future__ import annotations

import json
import sys
from pathlib import Path

# data_sets/ is a folder of scripts, not a package: import them the way they import each other.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data_sets"))

import build_text_corpus as btc  # noqa: E402


def words(n: int, word: str = "word") -> str:
    return " ".join([word] * n)


# --- Brown corpus -------------------------------------------------------------------------

BROWN = (
    "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' was/bedz found/vbn ./.\n"
    "\n\n\tMerger/nn-hl proposed/vbn-hl\n"
    "\n\n\tIt/pps was/bedz won/vbn by/in Ivan/np Allen/np Jr./np ./.\n"
    "\n\n\tHe/pps said/vbd (/( quietly/rb )/) :/: ``/`` I/ppss can't/md* ''/'' ;/. "
    "1/2/cd of/in it/ppo ?/.\n"
)


def test_brown_tags_stripped_and_detokenized():
    assert btc.parse_brown(BROWN) == [
        'The jury said "no evidence" was found.',
        "It was won by Ivan Allen Jr.",
        'He said (quietly): "I can\'t"; 1/2 of it?',
    ]


def test_brown_headlines_dropped():
    assert not any("Merger" in s for s in btc.parse_brown(BROWN))


# --- dictd --------------------------------------------------------------------------------


def b64(n: int) -> str:
    out = ""
    while True:
        out = btc.B64[n % 64] + out
        n //= 64
        if not n:
            return out


def dictd(entries: list[tuple[list[str], str]]) -> tuple[str, bytes]:
    """An .index text and unpacked .dict bytes; several headwords may share one entry."""
    data, index = b"00-database-short\n     Test dictionary\n", []
    index.append(f"00-database-short\t{b64(0)}\t{b64(len(data))}")
    for headwords, text in entries:
        raw = text.encode("utf-8")
        index += [f"{h}\t{b64(len(data))}\t{b64(len(raw))}" for h in headwords]
        data += raw
    return "\n".join(sorted(index)) + "\n", data


FOLDOC_ENTRY = (
    "algorithm\n\n   <algorithm, programming> A detailed sequence of actions to\n"
    "   perform a task.  Named after {Muhammad ibn Musa al-Khwarizmi}.\n\n"
    "   {Paul E. Black's Dictionary (http://nist.gov/dads/)}.\n\n   (2002-02-05)\n\n"
)
JARGON_ENTRY = (
    "hacker\n n.\n\n    [originally, someone who makes furniture with an axe]\n\n"
    "    1. A person who enjoys exploring the details of programmable systems.\n\n"
    "    2. One who programs {enthusiastically}.\n\n"
)


def test_b64_numbers():
    assert btc.b64_number("A") == 0
    assert btc.b64_number("Ba") == 64 + 26
    assert all(btc.b64_number(b64(n)) == n for n in (0, 1, 63, 64, 4095, 123456))


def test_parse_dictd_one_per_entry_in_file_order():
    index, data = dictd([(["algorithm", "algorithms"], FOLDOC_ENTRY), (["hacker"], JARGON_ENTRY)])
    entries = btc.parse_dictd(index, data)
    assert [h for h, _ in entries] == ["algorithm", "hacker"]  # alias and metadata skipped
    assert entries[1][1] == JARGON_ENTRY


def test_clean_foldoc_entry():
    assert btc.clean_dictd_entry("algorithm", FOLDOC_ENTRY) == (
        "algorithm: A detailed sequence of actions to perform a task. Named after "
        "Muhammad ibn Musa al-Khwarizmi. Paul E. Black's Dictionary."
    )


def test_clean_jargon_entry():
    assert btc.clean_dictd_entry("hacker", JARGON_ENTRY) == (
        "hacker: A person who enjoys exploring the details of programmable systems. "
        "One who programs enthusiastically."
    )


# --- roff ---------------------------------------------------------------------------------

MAN_PAGE = r""".\" Copyright (C) 2007 Someone
.TH intro 2 2023-02-05 "Linux man-pages 6.03"
.SH NAME
intro \- introduction to system calls
.SH SYNOPSIS
.nf
.B #include <unistd.h>
.fi
.SH DESCRIPTION
Section 2 of the manual describes the \fBLinux\fP system calls.
A call returns \-1 on error; see
.BR errno (3).
.PP
The
.I errno
variable is set \(em usually.
.nf
    int x = 1;
.fi
.SH "SEE ALSO"
.BR syscalls (2)
"""


def test_parse_man_keeps_name_and_description_prose():
    assert btc.parse_man(MAN_PAGE) == [
        "intro - introduction to system calls",
        "Section 2 of the manual describes the Linux system calls. "
        "A call returns -1 on error; see errno(3).",
        "The errno variable is set - usually.",
    ]


def test_roff_unescape():
    assert btc.roff_unescape(r"\fIfile\fR\(aqs \[lq]x\[rq] a\~b \e\&") == 'file\'s "x" a b \\'


# --- HTML ---------------------------------------------------------------------------------

HTML = """<html><head><title>T</title><script>var x = "<p>no</p>";</script></head><body>
<p class="title"><strong>Example 6.1</strong></p>
<p>The <code>len()</code> function returns
   the length &amp; more.</p>
<div class="highlight"><pre>print("code")</pre></div>
<div class="para">
  APT is <span class="emphasis"><em>advanced</em></span>.
  <div class="example"><pre class="programlisting">deb url dist</pre></div>
  It <div>nests</div> fine.
</div>
<p class="topless"><a href="x.html">Next</a></p>
<p></p>
</body></html>"""


def test_html_paragraphs_prose_only():
    assert btc.html_paragraphs(HTML) == [
        "The len() function returns the length & more.",
        "APT is advanced. It nests fine.",
    ]


# --- Bible markup -------------------------------------------------------------------------


def test_clean_osis_drops_notes_titles_and_tags():
    raw = (
        '<title canonical="true" type="psalm">A Psalm.</title> <w lemma="strong:H0430">God</w>'
        '<note placement="foot"><reference>1:1 </reference>Hebrew “Elohim”.</note>'
        '<w lemma="x">created</w> <w>the</w> <w>earth</w> . ¶ <q who="Jesus">Go</q>, now.'
    )
    assert btc.clean_osis(raw) == "God created the earth. Go, now."


# --- windows, cuts, passages --------------------------------------------------------------


def test_paragraph_windows_respect_limits_and_sentence_boundaries():
    sentences = [f"S{i} {words(5 + i % 30)}." for i in range(120)]
    windows = btc.paragraph_windows(sentences, min_words=40, max_words=200)
    assert len(windows) > 5
    joined = " ".join(sentences)
    position = 0
    for window in windows:
        assert 40 <= len(window.split()) <= 200
        assert window.startswith("S") and window.endswith(".")  # whole sentences
        found = joined.find(window, position)
        assert found >= position  # consecutive sentences, in order, not overlapping
        position = found + len(window)


def test_paragraph_windows_short_document_and_long_sentence():
    assert btc.paragraph_windows(["One two three.", "Four five."]) == ["One two three. Four five."]
    assert btc.paragraph_windows(["Only one sentence here."]) == []
    too_long = words(250) + "."
    windows = btc.paragraph_windows([too_long] + [words(30) + "."] * 4, 40, 200)
    assert windows == [" ".join([words(30) + "."] * 4)]


def test_cut_at_sentence():
    sentences = [words(20) + ".", words(20) + ".", words(20) + "."]
    assert len(btc.cut_at_sentence(sentences, 45, 1000).split()) == 40
    assert btc.cut_at_sentence(sentences, 10, 1000) == ""
    assert len(btc.cut_at_sentence(sentences, 45, 30).split()) == 20  # 40 words ~ 52 tokens


def test_approx_tokens_counts_long_words():
    assert btc.approx_tokens(words(100)) == 130  # ordinary words: 1.3 per word
    assert btc.approx_tokens("x" * 420) == 100  # one long "word": UTF-8 bytes / 4.2


def test_paragraph_windows_respect_token_estimate():
    sentences = [f"S{i} " + " ".join(["internationalization"] * 9) + "." for i in range(40)]
    windows = btc.paragraph_windows(sentences, min_words=20, max_words=200, max_tokens=100)
    assert windows and all(btc.approx_tokens(w) <= 100 for w in windows)


def test_passages_limits_and_no_overlap():
    chapter = [("Gen", 1, v) for v in range(1, 31)]
    kjv = {ref: f"v{ref[2]} " + words(8 + ref[2] % 9, "k") + "." for ref in chapter}
    web = {ref: f"v{ref[2]} " + words(9 + ref[2] % 7, "w") + "." for ref in chapter}
    web["Gen", 1, 15] = ""  # a verse missing from one translation breaks passages
    out = btc.passages(kjv, web, chapter, 3, 6)
    assert out
    used: list[str] = []
    for k, w in out:
        assert 35 <= len(k.split()) <= 110 and 35 <= len(w.split()) <= 110
        verses = [t for t in k.split() if t.startswith("v")]
        assert 3 <= len(verses) <= 6 and verses == [t for t in w.split() if t.startswith("v")]
        assert "v15" not in verses
        used += verses
    assert len(set(used)) == len(used)  # non-overlapping


# --- held-out selection -------------------------------------------------------------------


def wiki_json(n: int) -> bytes:
    entries = {}
    for i in range(n):
        summary = " ".join(f"Article {i} fact {j} is {words(8, 'true')}." for j in range(3 + i % 5))
        entry = {"title": f"Title {i}", "extract": summary, "topic": "x"}
        if i % 2:
            entry["description"] = f"Description {i}"
        entries[f"Title {i}"] = entry
    entries["Stub"] = {"title": "Stub", "extract": "Too short.", "description": "tiny"}
    return json.dumps(entries).encode()


def test_parse_wiki_queries():
    articles = {a.title: a for a in btc.parse_wiki(wiki_json(4))}
    assert articles["Title 1"].query == "Title 1: Description 1"
    assert articles["Title 0"].query == "Title 0"


def test_heldout_selection_deterministic_and_disjoint():
    articles = btc.parse_wiki(wiki_json(60))
    held, train = btc.split_wiki(articles, n=10)
    again, _ = btc.split_wiki(list(reversed(articles)), n=10)
    assert [a.title for a in held] == [a.title for a in again]  # input order does not matter
    assert len(held) == 10 and len(train) == len(articles) - 10
    assert not {a.title for a in held} & {a.title for a in train}
    assert "Stub" in {a.title for a in train}  # too short to evaluate on: stays in training
    ranks = sorted(btc.title_rank(a.title) for a in articles if a.title != "Stub")
    assert sorted(btc.title_rank(a.title) for a in held) == ranks[:10]
    for article in held:
        document = btc.eval_document(article.summary)
        assert 35 <= len(document.split()) <= 110 and article.summary.startswith(document)


def test_heldout_text_never_reaches_training_texts():
    articles = btc.parse_wiki(wiki_json(40))
    held, train = btc.split_wiki(articles, n=8)
    exclude = set()
    for article in held:
        exclude.update([article.summary, *btc.split_sentences(article.summary)])
    # A training document that quotes a held-out sentence must not carry it into a window.
    quoted = btc.split_sentences(held[0].summary)[0]
    docs = [btc.split_sentences(a.summary) for a in train]
    docs.append(btc.split_sentences(train[0].summary) + [quoted])
    texts, counts = btc.merge_texts({"wiki": btc.document_texts(docs, exclude)}, exclude)
    held_sentences = {s for a in held for s in btc.split_sentences(a.summary)}
    assert texts and counts["wiki"]["texts"] == len(texts)
    assert not any(s in text for text in texts for s in held_sentences)


def test_ranked_sample_deterministic():
    items = [(f"k{i}", f"w{i}") for i in range(50)]
    sample = btc.ranked_sample(items, 7)
    assert sample == btc.ranked_sample(items, 7) and len(sample) == 7
    assert [items.index(s) for s in sample] == sorted(items.index(s) for s in sample)


def test_write_tsv_fields_have_no_tabs_or_newlines(tmp_path):
    path = tmp_path / "pairs.tsv"
    assert btc.write_tsv(path, ("a", "b"), [("x\ty", "line\nbreak")]) == 1
    assert path.read_text(encoding="utf-8") == "a\tb\nx y\tline break\n"


def test_silver_pairs_skip_excluded_sentences():
    chapter = [("Gen", 1, v) for v in range(1, 4)]
    kjv = {ref: f"Verse {ref[2]} of the old text is here." for ref in chapter}
    web = {ref: f"Verse {ref[2]} of the new text is here." for ref in chapter}
    web["Gen", 1, 2] += " His name is Yahweh."
    article = btc.Article("Title", "", "A summary of the article. It has two sentences.")
    kinds = btc.silver_pairs([article], kjv, web, [chapter], exclude={"His name is Yahweh."})
    assert kinds["wiki"] == [("Title", article.summary)]
    assert [k for k, _ in kinds["verses"]] == [kjv["Gen", 1, 1], kjv["Gen", 1, 3]]


def test_sliding_windows_overlap_stay_in_limits_and_are_deterministic():
    sentences = [f"Sentence {i} " + " ".join(f"w{i}x{j}" for j in range(12)) + "."
                 for i in range(30)]
    windows = btc.sliding_windows(sentences, stride=2, min_words=40, max_words=120)
    assert windows == btc.sliding_windows(sentences, stride=2, min_words=40, max_words=120)
    assert len(windows) > len(btc.paragraph_windows(sentences, 40, 120))  # they overlap
    for w in windows:
        assert 40 <= len(w.split()) <= 120
        # Whole sentences only, consecutive ones, starting at an even sentence.
        parts = [p + "." for p in w.split(". ") if p]
        parts[-1] = parts[-1].removesuffix("..") + ("" if parts[-1].endswith(".") else "")
        first = sentences.index(parts[0] if parts[0].endswith(".") else parts[0] + ".")
        assert first % 2 == 0
        assert w == " ".join(sentences[first:first + len(w.split(". "))])
