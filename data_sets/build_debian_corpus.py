"""Build the default search corpus: Debian package descriptions -> Parquet.

Source: the English package descriptions ("Translation-en" index files) that apt downloads
for the configured Debian suites, plus the "Packages" index files for each package's section.
Fetch them first (as root):

    apt-get update -o Acquire::Languages=en

Licence: each description is part of its Debian package and is distributed under that
package's licence (all of Debian main meets the Debian Free Software Guidelines).

Run:

    python data_sets/build_debian_corpus.py --out data_sets/debian_packages.parquet

Output columns (one row per package name, sorted by id):
    id                 package name (unique)
    package            package name
    section            Debian section from the Packages index ("" if not found)
    short_description  first line of Description-en
    long_description   the remaining lines, leading space removed, " ." lines as blank lines
    text               "package: short description. long description", one line, whitespace
                       collapsed: the column that gets indexed

When a package name has several descriptions (different versions or suites), the longest one
is kept (ties: the smaller Description-md5), so the result does not depend on file order.
If the file would exceed --max-bytes, a deterministic subset is kept: rows are ranked by
sha256(package name) and the first N are kept, N being the largest count that fits.
Needs pyarrow; reads plain, .gz, .xz and .lz4 index files (.lz4 through the `lz4` Python
module or the `lz4cat` command).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import lzma
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROW_GROUP_SIZE = 8192
ZSTD_LEVEL = 19
DATA_PAGE_SIZE = 8 << 20
DEFAULT_MAX_BYTES = 10_000_000
COMPRESSED_SUFFIXES = ("", ".lz4", ".xz", ".gz")


@dataclass(frozen=True)
class Description:
    """One package description from a Translation-en stanza."""

    package: str
    md5: str
    short: str
    long: str


def read_index(path: Path) -> str:
    """Return the text of an apt index file, decompressing by its suffix."""
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    elif path.suffix == ".xz":
        data = lzma.decompress(data)
    elif path.suffix == ".lz4":
        try:
            import lz4.frame  # type: ignore[import-not-found]

            data = lz4.frame.decompress(data)
        except ImportError:
            data = subprocess.run(["lz4cat", str(path)], check=True, capture_output=True).stdout
    return data.decode("utf-8", errors="replace")


def iter_stanzas(text: str) -> Iterator[dict[str, str]]:
    """Split RFC 822 style text into stanzas; continuation lines keep their leading space."""
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields:
            yield fields


def parse_long_description(lines: list[str]) -> str:
    """Undo Debian's description encoding: drop one leading space, " ." is a blank line."""
    out = []
    for line in lines:
        line = line[1:] if line.startswith(" ") else line
        out.append("" if line.strip() == "." else line.rstrip())
    return "\n".join(out).strip("\n")


def parse_description(fields: dict[str, str]) -> Description | None:
    """Turn a Translation-en stanza into a Description (None if it has no description)."""
    raw = fields.get("Description-en")
    if not fields.get("Package") or raw is None:
        return None
    first, *rest = raw.split("\n")
    return Description(
        package=fields["Package"],
        md5=fields.get("Description-md5", ""),
        short=first.strip(),
        long=parse_long_description(rest),
    )


def collapse(text: str) -> str:
    """Collapse every run of whitespace (newlines included) into one space."""
    return " ".join(text.split())


def make_text(package: str, short: str, long: str) -> str:
    """The indexed text: 'package: short description. long description' on one line."""
    short = collapse(short)
    if short and short[-1] not in ".!?":
        short += "."
    return collapse(f"{package}: {short} {long}")


def pick(a: Description, b: Description) -> Description:
    """Of two descriptions of one package keep the longer (ties: smaller md5)."""
    key_a = (-len(a.short) - len(a.long), a.md5)
    key_b = (-len(b.short) - len(b.long), b.md5)
    return a if key_a <= key_b else b


def hash_rank(name: str) -> str:
    """Deterministic pseudo-random rank of a package name, for subsetting."""
    return hashlib.sha256(name.encode()).hexdigest()


def find_index_files(lists_dir: Path, kind: str) -> list[Path]:
    """Index files of one kind ('i18n_Translation-en' or 'Packages') in apt's lists folder."""
    found = []
    for path in sorted(lists_dir.iterdir()):
        stem = path.name
        for suffix in COMPRESSED_SUFFIXES:
            if suffix and stem.endswith(suffix):
                stem = stem[: -len(suffix)]
                break
        if stem.endswith("_" + kind):
            found.append(path)
    return found


def release_info(lists_dir: Path, index_file: Path) -> str:
    """Describe the suite an index file came from, using its (In)Release file."""
    match = re.match(r"(.*_dists_[^_]+)_", index_file.name)
    if not match:
        return index_file.name
    for name in ("InRelease", "Release"):
        release = lists_dir / f"{match.group(1)}_{name}"
        if release.exists():
            text = release.read_text(errors="replace")
            # InRelease is PGP-signed: skip the armour header stanza.
            fields = next((f for f in iter_stanzas(text) if "Suite" in f), {})
            parts = [fields.get(k, "?") for k in ("Origin", "Version", "Codename", "Suite", "Date")]
            return "{} {} {} ({}), dated {}".format(*parts)
    return index_file.name


def load_descriptions(files: list[Path]) -> dict[str, Description]:
    """Read Translation-en files; one description per package name."""
    chosen: dict[str, Description] = {}
    for path in files:
        for fields in iter_stanzas(read_index(path)):
            desc = parse_description(fields)
            if desc is None:
                continue
            old = chosen.get(desc.package)
            chosen[desc.package] = desc if old is None else pick(old, desc)
    return chosen


def load_sections(files: list[Path]) -> dict[str, str]:
    """Map package name -> section from Packages files (smallest name if they disagree)."""
    sections: dict[str, str] = {}
    for path in files:
        for fields in iter_stanzas(read_index(path)):
            name, section = fields.get("Package"), fields.get("Section")
            if name and section:
                sections[name] = min(section, sections.get(name, section))
    return sections


def build_table(descriptions: list[Description], sections: dict[str, str]) -> pa.Table:
    """Rows sorted by package name, in the corpus schema."""
    rows = sorted(descriptions, key=lambda d: d.package)
    return pa.table(
        {
            "id": [d.package for d in rows],
            "package": [d.package for d in rows],
            "section": [sections.get(d.package, "") for d in rows],
            "short_description": [d.short for d in rows],
            "long_description": [d.long for d in rows],
            "text": [make_text(d.package, d.short, d.long) for d in rows],
        }
    )


def write_parquet(table: pa.Table, metadata: dict[str, str]) -> bytes:
    """Serialize a table with zstd and fixed row groups; returns the file bytes."""
    table = table.replace_schema_metadata(metadata)
    sink = io.BytesIO()
    pq.write_table(
        table,
        sink,
        compression="zstd",
        compression_level=ZSTD_LEVEL,
        row_group_size=ROW_GROUP_SIZE,
        # One large page per column chunk compresses better; dictionaries dedupe the
        # descriptions shared by sibling packages (libfoo1 / libfoo-dev).
        data_page_size=DATA_PAGE_SIZE,
        use_dictionary=["section", "short_description", "long_description"],
        write_statistics=["id"],
    )
    return sink.getvalue()


def fit_subset(
    descriptions: list[Description],
    sections: dict[str, str],
    metadata: dict[str, str],
    max_bytes: int,
) -> bytes:
    """Write all rows, or the largest hash-ranked prefix whose file fits in max_bytes."""
    ranked = sorted(descriptions, key=lambda d: hash_rank(d.package))
    n = len(ranked)
    data = write_parquet(build_table(ranked, sections), metadata)
    while len(data) > max_bytes:
        n = int(n * max_bytes / len(data) * 0.99)
        meta = {**metadata, "subset": f"first {n} of {len(ranked)} names ranked by sha256"}
        data = write_parquet(build_table(ranked[:n], sections), meta)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data_sets/debian_packages.parquet"))
    parser.add_argument("--lists-dir", type=Path, default=Path("/var/lib/apt/lists"))
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    translations = find_index_files(args.lists_dir, "i18n_Translation-en")
    if not translations:
        print(
            f"no Translation-en files in {args.lists_dir}; run (as root): "
            "apt-get update -o Acquire::Languages=en",
            file=sys.stderr,
        )
        return 1
    suites = sorted({release_info(args.lists_dir, p) for p in translations})
    for suite in suites:
        print(f"source: {suite}")
    descriptions = load_descriptions(translations)
    sections = load_sections(find_index_files(args.lists_dir, "Packages"))
    metadata = {
        "source": "Debian package descriptions (Translation-en): " + "; ".join(suites),
        "licence": "each description is under the licence of its Debian package (DFSG)",
        "built_by": "data_sets/build_debian_corpus.py",
    }
    data = fit_subset(list(descriptions.values()), sections, metadata, args.max_bytes)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(args.out)
    rows = pq.ParquetFile(args.out).metadata.num_rows
    print(f"packages with descriptions: {len(descriptions)}")
    print(f"rows written: {rows}")
    print(f"file: {args.out} ({len(data):,} bytes)")
    print(f"time: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
