"""Padded batches, the CPU path (and training's): length-sorted, within a token budget, so
that padding stays small. The GPU's packed passes need none (layout.py)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# The embedding path pads each sequence to its own length rounded up to a multiple of this, not
# to its batch's longest: a vector then depends on its own tokens alone, never on the rows that
# share its batch, so a document embedded in an update, in a query or alone gets the bits a
# full run gives it. Rows of one padded shape come out the same whatever the batch's size; a
# different padded length moves a bf16 vector by up to ~3e-3 (the reductions over the padded
# positions block differently). Eight tokens cost ~4% of padding on the default corpus.
PAD_MULTIPLE = 8


def padded_length(n: int, multiple: int = PAD_MULTIPLE, limit: int | None = None) -> int:
    """n tokens padded up to a multiple of `multiple` (at least 1), at most `limit`."""
    width = -(-max(n, 1) // multiple) * multiple
    return min(width, limit) if limit is not None else width


def plan_batches(lengths: Sequence[int], max_batch_tokens: int,
                 max_batch_size: int = 1024, pad_multiple: int = 1,
                 limit: int | None = None) -> list[list[int]]:
    """Group indices into batches of similar length, longest first.

    Each batch is padded to its longest member, so its cost is size x longest; a batch is
    closed when that padded size would pass max_batch_tokens (a single over-long item still
    gets a batch of its own). Sorting by length keeps padding small. With pad_multiple > 1 a
    batch holds rows of one padded_length only (the embedding path's batch-free vectors).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        n = padded_length(lengths[i], pad_multiple, limit)
        longest_if_added = max(longest, n)
        if current and (longest_if_added * (len(current) + 1) > max_batch_tokens
                        or len(current) >= max_batch_size
                        or (pad_multiple > 1 and n != longest)):
            batches.append(current)
            current, longest_if_added = [], n
        current.append(i)
        longest = longest_if_added
    if current:
        batches.append(current)
    return batches


def pad_batch(token_lists: Sequence[Sequence[int]], pad_id: int = 0, length: int | None = None):
    """Right-pad to (B, T) int64 ids and mask (1 = real token); T = `length` or the longest."""
    T = length or max(max((len(t) for t in token_lists), default=1), 1)
    ids = np.full((len(token_lists), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(token_lists), T), dtype=np.int64)
    for row, toks in enumerate(token_lists):
        ids[row, : len(toks)] = toks
        mask[row, : len(toks)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)
