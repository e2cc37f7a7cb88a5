"""The indexes a server answers from, each in a slot holding the Searcher in use now.

A rebuild of the folder (tokenize, embed, build-index) changes its generation; the watcher
then loads a new Searcher beside the old one and swaps it in by one assignment, so a request
gets the old Searcher or the new one, never a mix. A load runs under the folder's shared lock
(Searcher does it), so it never reads a half-written folder: a folder in the middle of a
rebuild is refused (incomplete embeddings, a stale index), the old Searcher stays, and the
next stage's write is seen at the next poll.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import IndexBusy, PipelineError, UsageError
from pipeline.folder import IndexFolder
from pipeline.search import Searcher

log = logging.getLogger("pipeline.serve")


def describe(searcher: Searcher) -> dict:
    """What /info says of an index, from what the Searcher loaded (no disk read)."""
    folder, info = searcher.folder, searcher.info
    identity = folder.identity or {}
    return {"documents": sum(s.get("docs", s["rows"]) for s in folder.token_shards),
            "rows": folder.rows, "dim": info.get("dim"), "key": info.get("key"),
            "recall": info.get("recall"), "model": identity.get("model"),
            "model_sha256": identity.get("model_sha256"),
            "tokenizer": identity.get("tokenizer")}


def folder_name(path: str | Path) -> str:
    """The name an index is asked for by: its folder's (a symlink's own name, not its
    target's)."""
    return Path(os.path.abspath(path)).name


class IndexSlot:
    """One served index folder, by the name of the folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = folder_name(path)
        self.searcher = Searcher(self.path, snapshot=True)
        self.info = describe(self.searcher)
        self.refused: str | None = None  # a generation whose load failed: not retried

    def changed(self) -> bool:
        """Whether the folder was written since the Searcher in use loaded it (and is not a
        generation already refused)."""
        now = IndexFolder(self.path).generation()
        return now not in (self.searcher.generation, self.refused)

    def reload(self) -> str:
        """Load the folder anew and swap the new Searcher in; the outcome for the logs and
        /metrics: loaded, busy (a writer holds it: tried again at the next poll), failed
        (kept the old one)."""
        attempt = IndexFolder(self.path).generation()
        try:
            searcher = Searcher(self.path, snapshot=True)
        except IndexBusy:
            return "busy"
        except Exception as err:  # the old Searcher keeps answering, whatever went wrong
            self.refused = attempt
            # Each stage of a rebuild leaves a folder that is not whole yet: said, not raised.
            if isinstance(err, PipelineError):
                log.warning("%s: not loaded again yet, the one loaded before stays: %s",
                            self.name, err)
            else:
                log.exception("%s: loading it again failed; the one loaded before stays",
                              self.name)
            return "failed"
        self.info = describe(searcher)
        self.searcher = searcher  # the swap: requests from now on get the new one
        self.refused = None
        log.info("%s: loaded %s rows", self.name, self.info["rows"])
        return "loaded"


def load_slots(paths: Sequence[str | Path]) -> dict[str, IndexSlot]:
    """A slot per folder, by name; refuses two folders of one name (they could not both be
    asked for) and a folder given twice."""
    if not paths:
        raise UsageError("give at least one --index")
    slots: dict[str, IndexSlot] = {}
    seen: set[str] = set()
    for path in paths:
        real, name = os.path.realpath(path), folder_name(path)
        if real in seen:
            raise UsageError(f"{path} is given twice")
        if name in slots:
            raise UsageError(f"two index folders are named {name!r} ({slots[name].path} and "
                             f"{path}): an index is asked for by its folder's name")
        seen.add(real)
        slots[name] = IndexSlot(path)
    return slots
