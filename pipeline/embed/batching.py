"""Padded batches, the CPU path (and training's): length-sorted, within a token budget, so
that padding stays small. The GPU's packed passes need none (layout.py)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def plan_batches(lengths: Sequence[int], max_batch_tokens: int,
                 max_batch_size: int = 1024) -> list[list[int]]:
    """Group indices into batches of similar length, longest first.

    Each batch is padded to its longest member, so its cost is size x longest; a batch is
    closed when that padded size would pass max_batch_tokens (a single over-long item still
    gets a batch of its own). Sorting by length keeps padding small.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        n = max(lengths[i], 1)
        longest_if_added = max(longest, n)
        if current and (longest_if_added * (len(current) + 1) > max_batch_tokens
                        or len(current) >= max_batch_size):
            batches.append(current)
            current, longest_if_added = [], n
        current.append(i)
        longest = longest_if_added
    if current:
        batches.append(current)
    return batches


def pad_batch(token_lists: Sequence[Sequence[int]], pad_id: int = 0):
    """Right-pad to (B, T) int64 ids and mask (1 = real token)."""
    T = max(max((len(t) for t in token_lists), default=1), 1)
    ids = np.full((len(token_lists), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(token_lists), T), dtype=np.int64)
    for row, toks in enumerate(token_lists):
        ids[row, : len(toks)] = toks
        mask[row, : len(toks)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)
