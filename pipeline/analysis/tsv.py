"""The evaluation files' one format: tab-separated, a header row, no quoting (csv.QUOTE_NONE),
UTF-8. Every way a file can be unreadable is one InputFileError line."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

from pipeline.errors import InputFileError


def read_tsv(path: str | Path, required: Iterable[str]) -> list[dict[str, str]]:
    """The rows of `path` as dicts; the header must name every `required` column, and there
    must be at least one row."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"cannot read {path}: no such file")
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
            missing = set(required) - set(reader.fieldnames or ())
            if missing:
                raise InputFileError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
            rows = list(reader)
    except UnicodeDecodeError:
        raise InputFileError(f"{path} is not UTF-8 text") from None
    except csv.Error as err:
        raise InputFileError(f"{path}: not a readable TSV ({err})") from None
    if not rows:
        raise InputFileError(f"{path} has no rows")
    return rows
