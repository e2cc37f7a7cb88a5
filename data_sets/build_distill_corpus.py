"""Build the plain-English sentence corpus for distillation training (not committed).

Sources (every one from a package registry):
  debian   Debian package descriptions, from apt's Translation-en files (run, as root,
           `apt-get update -o Acquire::Languages=en` first): each short description, and
           each long description cut into sentences / list items of 5-60 words.
           Licence: that of each package (DFSG-free).
  wordnet  WordNet 3.0 glosses and usage examples, from the Debian package `wordnet-base`
           ("lemma, synonym: definition" lines, and each quoted example on its own).
           Licence: WordNet 3.0 licence (Princeton University, BSD-like).
  fortunes Fortune cookies of at most 60 words, from the Debian packages `fortunes` and
           `fortunes-min` (ascii-art and the Latin translate-me file skipped).
           Licence: BSD (fortune-mod); the quotations belong to their authors.
  gcide    Definitions from GCIDE (Webster's 1913 + WordNet additions), Debian `dict-gcide`.
           Licence: GPL-2+.
  stsb     STS-B train and dev sentences, read from data_sets/{train,dev}.tsv
           (made by build_stsb.py). Never the test split: any sentence that also occurs in
           data_sets/test.tsv is dropped from the whole corpus.

Debian packages are fetched with `apt-get download` into a temporary folder and unpacked
with `dpkg -x` (no installation, no root needed for that part).

Run:

    python data_sets/build_distill_corpus.py --out .cache/distill_sentences.txt

Output: UTF-8 text, one sentence per line, whitespace collapsed, exact duplicates removed,
shuffled with a fixed seed (--seed): the same inputs always give the same file.
"""

from __future__ import annotations

import argparse
import gzip
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from build_debian_corpus import collapse, find_index_files, load_descriptions

MIN_WORDS = 3
MAX_WORDS = 60
MIN_CHUNK_WORDS = 5  # for sentences cut out of Debian long descriptions
WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
SKIPPED_FORTUNE_FILES = {"ascii-art", "translate-me"}
APT_PACKAGES = ("wordnet-base", "fortunes", "fortunes-min", "dict-gcide")

BULLET = re.compile(r"^(?:[*+o•-]|\d+[.)])\s+")
# A sentence ends at . ! ? after a lowercase letter, digit or closing bracket/quote (so not
# inside "A.D." or "U.S."), unless the word is e.g. / i.e. / vs.; the next one starts with a
# capital, quote or bracket.
SENTENCE_END = re.compile(
    r"(?<=[a-z0-9)\"'][.!?])(?<!\be\.g\.)(?<!\bi\.e\.)(?<!\bvs\.)\s+(?=[A-Z\"'(])"
)


def keep(text: str, min_words: int = MIN_WORDS, max_words: int = MAX_WORDS) -> bool:
    """Whether a candidate sentence has a sane length and is mostly letters."""
    n_words = len(text.split())
    if not min_words <= n_words <= max_words:
        return False
    chars = text.replace(" ", "")
    letters = sum(c.isalpha() for c in chars)
    return letters >= 0.6 * len(chars)


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences (see SENTENCE_END)."""
    return [s for s in SENTENCE_END.split(collapse(text)) if s]


def description_chunks(long: str) -> list[str]:
    """Cut a Debian long description into sentences and list items of 5-60 words."""
    chunks = []
    for paragraph in re.split(r"\n\s*\n", long):
        items: list[list[str]] = [[]]
        for line in paragraph.splitlines():
            stripped = line.strip()
            bullet = BULLET.match(stripped)
            if bullet:
                items.append([stripped[bullet.end() :]])
            else:
                items[-1].append(stripped)
        for item in items:
            chunks.extend(split_sentences(" ".join(item)))
    return [c for c in chunks if keep(c, min_words=MIN_CHUNK_WORDS)]


def split_gloss(gloss: str) -> tuple[str, list[str]]:
    """Split a WordNet gloss into its definition and its quoted examples.

    Parts are separated by ';' outside double quotes; quoted parts are examples (an
    attribution after the closing quote is dropped), the other parts form the definition.
    """
    parts = re.findall(r'(?:"[^"]*"|[^;"])+|"[^"]*$', gloss)
    definition, examples = [], []
    for part in (p.strip() for p in parts):
        if part.startswith('"'):
            end = part.rfind('"')
            examples.append(part[1:end] if end > 0 else part[1:])
        elif part:
            definition.append(part)
    return "; ".join(definition), [collapse(e) for e in examples]


def parse_wordnet_line(line: str, max_lemmas: int = 3) -> list[str]:
    """Sentences from one line of a WordNet data.* file ('' header lines give none)."""
    if line.startswith("  ") or " | " not in line:
        return []
    head, gloss = line.split(" | ", 1)
    fields = head.split()
    n_words = int(fields[3], 16)
    lemmas = [re.sub(r"\(\w+\)$", "", w).replace("_", " ") for w in fields[4 : 4 + 2 * n_words : 2]]
    definition, examples = split_gloss(gloss.strip())
    out = [f"{', '.join(lemmas[:max_lemmas])}: {definition}"] if definition else []
    return out + examples


def parse_fortunes(text: str) -> list[str]:
    """Single-lined cookies from a fortune file ('%' lines separate them)."""
    text = re.sub(r".\x08", "", text)  # undo overstriking (bold/underline via backspace)
    cookies = re.split(r"^%\s*$", text, flags=re.MULTILINE)
    return [collapse(c) for c in cookies if c.strip()]


GCIDE_MARKUP = [
    (re.compile(r"\[(?:1913 Webster|Webster|WordNet|PJC)[^\]]*\].*"), ""),  # source tag: end
    (re.compile(r"\[[^\]]*\]"), ""),  # etymologies, [Obs.]
    (re.compile(r"--\s?[A-Z][^.]*\.(?:\s?[A-Z]\w*\.)*"), ""),  # citations: --U. S. Pharm.
    (re.compile(r"^(?:(?:\d+\.|\([a-z]\)|pl\.)\s*)+"), ""),  # sense numbers, 'pl.'
    (re.compile(r"^(?:\([A-Z][\w. &]*\)\s*)+"), ""),  # field labels: (Zool.) (Physics)
    (re.compile(r"[{}]"), ""),  # cross-reference braces
]
GCIDE_HEADER = re.compile(r"^[^\\]*\\[^\\]*\\,?")  # 'Cat \Cat\,'
GCIDE_PRONUNCIATION = re.compile(r"^\s*\([^)]*\),?")  # '(kr[udd]),' after the header
GCIDE_POS = re.compile(r"^(?:\s*(?:[a-z]{1,5}\.|&|,))+\s*")  # 'n.', 'v. t.', 'a.'
GCIDE_PHRASE = re.compile(r"^\{([^}]+)\},\s*")  # '{To let the cat out of the bag}, ...'


def clean_gcide_definition(text: str) -> str:
    """Strip GCIDE markup from one definition paragraph; '' if too messy to keep."""
    for pattern, repl in GCIDE_MARKUP:
        text = collapse(pattern.sub(repl, text))
    if any(mark in text for mark in ('"', "`", "\\", "?", "*", "[", "]", "|")):
        return ""  # pronunciation codes or lost Greek/accented characters
    return text.rstrip(" ,;:")


def parse_gcide(text: str) -> Iterator[str]:
    """'headword: definition' sentences from GCIDE's dictd text (dict.dz unpacked).

    An entry starts with an unindented line 'Word \\Pro*nun"ci*a`tion\\, pos. [etym.]'
    followed by its first definition; further indented paragraphs are more senses,
    'Syn:' / 'Note:' paragraphs (skipped), '{phrase}, definition' sub-entries, or
    literary quotations (indented 8+ spaces), which are kept as they are.
    """
    headword = ""
    for block in re.split(r"\n\s*\n", text):
        paragraph = collapse(block)
        if block[:1].isalpha():
            match = re.match(r"([A-Za-z][A-Za-z' -]*?) \\", block)
            headword = match.group(1) if match else ""
            paragraph = re.sub(r"\[[^\]]*\]", "", GCIDE_HEADER.sub("", paragraph))
            paragraph = GCIDE_POS.sub("", GCIDE_PRONUNCIATION.sub("", paragraph))
        if not headword or paragraph.startswith(("Syn:", "Note:", "[")):
            continue
        if block.startswith(" " * 8):
            quotation = clean_gcide_definition(paragraph)
            if quotation:
                yield quotation
            continue
        subject = headword
        phrase = GCIDE_PHRASE.match(paragraph)
        if phrase:
            subject, paragraph = phrase.group(1), paragraph[phrase.end() :]
        definition = clean_gcide_definition(paragraph)
        if definition:
            yield f"{subject}: {definition}"


def apt_download(packages: Iterable[str], dest: Path) -> Path:
    """Download Debian packages with apt-get and unpack them all under dest/root."""
    subprocess.run(
        ["apt-get", "download", "-q", *packages], cwd=dest, check=True, stdout=subprocess.DEVNULL
    )
    root = dest / "root"
    for deb in sorted(dest.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return root


def read_tsv_sentences(path: Path) -> list[str]:
    """sentence1 and sentence2 columns of an STS-B TSV written by build_stsb.py."""
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [s for line in lines for s in line.split("\t")[1:3]]


def debian_sentences(lists_dir: Path) -> list[str]:
    """Short descriptions and long-description chunks of every Debian package."""
    descriptions = load_descriptions(find_index_files(lists_dir, "i18n_Translation-en"))
    out = []
    for name in sorted(descriptions):
        desc = descriptions[name]
        out.append(collapse(desc.short))
        out.extend(description_chunks(desc.long))
    return out


def wordnet_sentences(root: Path) -> list[str]:
    """Glosses and examples from WordNet's data.* files."""
    out = []
    for name in WORDNET_FILES:
        text = (root / "usr/share/wordnet" / name).read_text(encoding="utf-8", errors="replace")
        for line in text.splitlines():
            out.extend(parse_wordnet_line(line))
    return out


def fortune_sentences(root: Path) -> list[str]:
    """Cookies from every English fortune file (not .dat indexes, not .u8 links)."""
    out = []
    for path in sorted((root / "usr/share/games/fortunes").iterdir()):
        if path.suffix in (".dat", ".u8") or path.is_symlink() or path.is_dir():
            continue
        if path.name in SKIPPED_FORTUNE_FILES:
            continue
        out.extend(parse_fortunes(path.read_bytes().decode("utf-8", errors="replace")))
    return out


def gcide_sentences(root: Path) -> list[str]:
    """Definitions from GCIDE (dict.dz is gzip-compatible)."""
    data = gzip.decompress((root / "usr/share/dictd/gcide.dict.dz").read_bytes())
    return list(parse_gcide(data.decode("utf-8", errors="replace")))


def merge_sources(
    sources: dict[str, list[str]], exclude: set[str]
) -> tuple[list[str], dict[str, int]]:
    """Filter and deduplicate in source order, leaving out `exclude`.

    Returns the sorted sentences and, per source, how many new unique ones it added
    (plus 'excluded': how many distinct kept candidates were in `exclude`).
    """
    seen: set[str] = set()
    excluded: set[str] = set()
    counts = {}
    for name, sentences in sources.items():
        before = len(seen)
        for sentence in map(collapse, sentences):
            if not keep(sentence):
                continue
            (excluded if sentence in exclude else seen).add(sentence)
        counts[name] = len(seen) - before
    counts["excluded"] = len(excluded)
    return sorted(seen), counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(".cache/distill_sentences.txt"))
    parser.add_argument("--lists-dir", type=Path, default=Path("/var/lib/apt/lists"))
    parser.add_argument("--stsb-dir", type=Path, default=Path(__file__).parent)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-gcide", action="store_true", help="leave out dict-gcide")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    sources: dict[str, list[str]] = {"debian": debian_sentences(args.lists_dir)}
    if not sources["debian"]:
        print(
            "no Debian descriptions: run apt-get update -o Acquire::Languages=en", file=sys.stderr
        )
        return 1
    packages = [p for p in APT_PACKAGES if not (args.no_gcide and p == "dict-gcide")]
    with tempfile.TemporaryDirectory() as tmp:
        root = apt_download(packages, Path(tmp))
        sources["wordnet"] = wordnet_sentences(root)
        sources["fortunes"] = fortune_sentences(root)
        if not args.no_gcide:
            sources["gcide"] = gcide_sentences(root)
    sources["stsb"] = [
        s for split in ("train", "dev") for s in read_tsv_sentences(args.stsb_dir / f"{split}.tsv")
    ]
    test = {collapse(s) for s in read_tsv_sentences(args.stsb_dir / "test.tsv")}

    sentences, counts = merge_sources(sources, exclude=test)
    random.Random(args.seed).shuffle(sentences)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    tmp_out.write_text("".join(s + "\n" for s in sentences), encoding="utf-8")
    tmp_out.replace(args.out)

    for name, sentences_in in sources.items():
        print(f"{name:9s} {len(sentences_in):8,d} candidates {counts[name]:8,d} new unique")
    print(f"dropped  {counts['excluded']:8,d} sentences that are also in STS-B test")
    print(
        f"total     {len(sentences):8,d} sentences -> {args.out} "
        f"({args.out.stat().st_size:,} bytes)"
    )
    print(f"time: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
