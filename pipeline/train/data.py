"""Training data as the loop consumes it: texts from files, token sequences in flat tables,
and the seeded plan that says which rows make the k-th batch."""

from __future__ import annotations

import bz2
import gzip
import lzma
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.embed.encoder import pad_batch
from pipeline.errors import InputFileError

# Batches are cut from length-sorted chunks of this many batches: little padding, and still
# a different mix of texts in every batch from epoch to epoch.
CHUNK_BATCHES = 32


def read_texts(path: str | Path) -> list[str]:
    """Texts of a file: one per line (plain, .gz, .xz or .bz2), or a Parquet 'text' column."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"cannot read {path}: no such file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise InputFileError(f"{path} has no 'text' column")
        texts = table.column("text").to_pylist()
    else:
        opener = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}.get(path.suffix, open)
        with opener(path, "rt", encoding="utf-8") as fh:
            texts = fh.read().splitlines()
    return [t.strip() for t in texts if t and t.strip()]


def unique_texts(groups: Sequence[Sequence[str]]) -> list[str]:
    """Concatenate, dropping exact duplicates (first occurrence wins, order kept)."""
    return list(dict.fromkeys(t for group in groups for t in group))


@dataclass(frozen=True)
class TokenTable:
    """Many token sequences in one flat array: ids[offsets[i]:offsets[i+1]] is sequence i."""

    ids: np.ndarray  # (total,) int32
    offsets: np.ndarray  # (N + 1,) int64

    @classmethod
    def build(cls, token_lists: Sequence[Sequence[int]], max_tokens: int) -> TokenTable:
        lists = [t[:max_tokens] or [0] for t in token_lists]  # an empty text still gets a slot
        lengths = np.array([len(t) for t in lists], dtype=np.int64)
        offsets = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.fromiter((i for t in lists for i in t), dtype=np.int32, count=int(offsets[-1]))
        return cls(ids, offsets)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def rows(self, indices: Sequence[int]) -> list[np.ndarray]:
        return [self.ids[self.offsets[i]:self.offsets[i + 1]] for i in indices]


def plan_epoch(lengths: np.ndarray, batch_size: int, seed: int, stream: int,
               epoch: int) -> list[np.ndarray]:
    """The batches of one epoch: a seeded shuffle, cut into chunks sorted by length (less
    padding), cut into full batches (an epoch drops its remainder so every batch has the same
    size, which in-batch negatives want), in shuffled order. Fewer texts than one batch make one
    smaller batch."""
    n = len(lengths)
    rng = np.random.default_rng([seed, stream, epoch])
    perm = rng.permutation(n)
    if n < batch_size:
        return [perm]
    n_batches = n // batch_size
    perm = perm[: n_batches * batch_size]
    batches = []
    chunk = batch_size * CHUNK_BATCHES
    for start in range(0, len(perm), chunk):
        part = perm[start:start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


class BatchStream:
    """The k-th batch of an objective, for any k: epochs are planned on demand."""

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int, stream: int):
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed, self.stream = seed, stream
        self.per_epoch = max(1, len(lengths) // batch_size)
        self._epoch, self._plan = -1, []

    def batch(self, k: int) -> np.ndarray:
        epoch, i = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._plan = plan_epoch(self.lengths, self.batch_size, self.seed, self.stream, epoch)
        return self._plan[i]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Pinned, asynchronous copies to a GPU: the CPU prepares the next batch meanwhile
    (a copy from pageable memory would wait for all queued GPU work)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def to_batch(rows: Sequence[np.ndarray], device: torch.device):
    ids, mask = pad_batch(rows)
    return to_device(ids, device), to_device(mask, device)
