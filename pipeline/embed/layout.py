"""Where each token of a forward pass sits: the host side of the packed GPU path.

Pure numpy, no torch: `plan_passes` cuts a shard into forward passes and lays each out
(`plan_layout`: short sequences packed into attention windows, the rest back to back); the
encoder copies the layouts to the GPU as `model.gpt2.PackedLayout`s (`gpu.layout_on_device`).
Packing is a Python loop, and Python work in a thread beside the ones launching GPU work holds
the GIL they wait for at every op, so the embed stage plans in a process of its own
(`Planner`), which this torch-free module keeps quick to start.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Sequence
from multiprocessing.connection import Connection

import numpy as np

from pipeline.children import die_with_parent, start_function
from pipeline.errors import ChildFailed


def plan_packed_batches(lengths: Sequence[int], max_batch_tokens: int) -> list[tuple[int, int]]:
    """Consecutive [a, b) row ranges of at most max_batch_tokens real tokens each (no padding
    when packed, so order does not matter); a longer single row gets a range of its own."""
    ranges, start, total = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and total + n > max_batch_tokens:
            ranges.append((start, i))
            start, total = i, 0
        total += int(n)
    if len(lengths) > start:
        ranges.append((start, len(lengths)))
    return ranges


WINDOW = 128  # slots of an attention window for short sequences (PackedLayout)
WINDOW_STEP = 64  # window counts are multiples of this: few shapes (see plan_layout)

# A pass's layout, as `plan_layout` makes it and `model.gpt2.PackedLayout` holds it on the GPU:
# its int32 arrays (copied to the device together) and its ints.
LAYOUT_ARRAYS = ("ids", "positions", "seq", "starts", "lengths", "long_cu")
LAYOUT_INTS = ("window_tokens", "window", "long_max")


def pack_windows(lengths: np.ndarray, window: int = WINDOW) -> tuple[np.ndarray, np.ndarray,
                                                                      int]:
    """Best-fit decreasing: sequences of at most `window` tokens into as few windows as it
    finds. Returns each sequence's window and its first slot there, and the window count."""
    windows_by_room: list[list[int]] = [[] for _ in range(window + 1)]
    used: list[int] = []  # slots taken, per window
    which = np.empty(len(lengths), dtype=np.int64)
    first = np.empty(len(lengths), dtype=np.int64)
    for i in np.argsort(-np.asarray(lengths), kind="stable").tolist():
        n = int(lengths[i])
        for room in range(n, window + 1):  # the fullest window it fits in
            if windows_by_room[room]:
                w = windows_by_room[room].pop()
                break
        else:
            w = len(used)
            used.append(0)
        which[i], first[i] = w, used[w]
        used[w] += n
        windows_by_room[window - used[w]].append(w)
    return which, first, len(used)


def plan_layout(values: np.ndarray, lengths: np.ndarray, window: int = WINDOW,
                step: int = WINDOW_STEP) -> dict:
    """Host side of a `PackedLayout` for one forward pass over sequences given as flat ids
    `values` and their `lengths`: the LAYOUT_ARRAYS (int32) ids, positions, seq (slot -> token
    id, position, sequence), starts, lengths, long_cu; and the LAYOUT_INTS.
    window 0 puts every sequence in the variable-length part. Window counts are multiples of
    `step`: the sequences of the last, part-filled windows join the variable-length part.
    """
    n = len(lengths)
    is_short = lengths <= window if window else np.zeros(n, dtype=bool)
    short, long = np.flatnonzero(is_short), np.flatnonzero(~is_short)
    which, first_in_window, n_windows = pack_windows(lengths[short], window)
    # Few distinct window counts: cuDNN's attention builds a plan for each new shape, the GPU
    # idle meanwhile (docs/performance.md). Rounded down, not up: no pad windows.
    kept = n_windows // step * step
    overflow = which >= kept
    long = np.concatenate([long, short[overflow]])
    short, which, first_in_window = (a[~overflow] for a in (short, which, first_in_window))
    window_tokens = kept * window
    long_cu = np.zeros(len(long) + 1, dtype=np.int64)
    np.cumsum(lengths[long], out=long_cu[1:])
    starts = np.empty(n, dtype=np.int64)
    starts[short] = which * window + first_in_window
    starts[long] = window_tokens + long_cu[:-1]
    n_slots = window_tokens + int(long_cu[-1])
    seq_of_token = np.repeat(np.arange(n), lengths)
    position = np.arange(len(values)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    slot = starts[seq_of_token] + position
    ids = np.zeros(n_slots, dtype=np.int32)
    ids[slot] = values
    positions = np.zeros(n_slots, dtype=np.int32)
    positions[slot] = position
    seq = np.full(n_slots, n, dtype=np.int32)
    seq[slot] = seq_of_token
    return {"ids": ids, "positions": positions, "seq": seq, "starts": starts.astype(np.int32),
            "lengths": lengths.astype(np.int32), "long_cu": long_cu.astype(np.int32),
            "window_tokens": window_tokens, "window": window,
            "long_max": int(lengths[long].max()) if len(long) else 0}


FULL_PASS = 0.9  # share of its token budget that makes a pass full (see plan_passes)


def plan_passes(values: np.ndarray, offsets: np.ndarray, max_batch_tokens: int, window: int
                ) -> tuple[list[tuple[int, int]], list[dict]]:
    """Row ranges of the forward passes over sequences given Arrow-style (flat ids, offsets),
    and their layouts.

    Passes less than FULL_PASS full (a shard's last, say) get no windows: their window
    counts would be new ones, and cuDNN builds a plan for each, which stalls the GPU
    (docs/performance.md); the variable-length kernel needs none."""
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    batches = plan_packed_batches(lengths, max_batch_tokens)
    plans = []
    for a, b in batches:
        full = offsets[b] - offsets[a] >= FULL_PASS * max_batch_tokens
        plans.append(plan_layout(values[offsets[a]:offsets[b]], lengths[a:b],
                                 window if full else 0))
    return batches, plans


# ---------------------------------------------------------------------------------------------
# The planning process


class Planner:
    """`plan_passes` in a child process (children.py; the parent ends it by closing the
    pipe). One call at a time: a thread of its own each."""

    def __init__(self):
        to_child, self._requests = os.pipe()
        self._results, from_child = os.pipe()
        self.process = start_function(planner_child,
                                      [str(to_child), str(from_child), str(os.getpid())],
                                      pass_fds=[to_child, from_child])
        os.close(to_child)
        os.close(from_child)
        self._send = Connection(self._requests, readable=False)
        self._receive = Connection(self._results, writable=False)
        self._started = False

    def started(self) -> bool:
        """Whether the child is up (it says so once its imports are done), without waiting."""
        if not self._started and self._receive.poll(0):
            self._await_start()
        return self._started

    def plan_passes(self, *args) -> tuple[list[tuple[int, int]], list[dict]]:
        """`plan_passes(*args)`, computed in the child (once it is up)."""
        self._await_start()
        try:
            self._send.send(args)
            ok, result = self._receive.recv()
        except (EOFError, OSError):
            raise self._died() from None
        if not ok:
            raise result
        return result

    def _await_start(self) -> None:
        try:
            self._started = self._started or self._receive.recv() == "ready"
        except (EOFError, OSError):
            raise self._died() from None

    def _died(self) -> ChildFailed:
        return ChildFailed("the layout planning process ended unexpectedly "
                                 f"(exit code {self.process.poll()})")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._send.close()  # the child sees the end of its input, and exits
        with contextlib.suppress(OSError):
            self._receive.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def planner_child(requests_fd: str, results_fd: str, parent: str) -> None:
    """The loop of a `Planner`'s process (its arguments: numbers, as the command line gives
    them): plan_passes(*request) for each request, until the parent closes the pipe."""
    die_with_parent(int(parent))
    requests = Connection(int(requests_fd), writable=False)
    results = Connection(int(results_fd), readable=False)
    results.send("ready")
    while True:
        try:
            args = requests.recv()
        except (EOFError, OSError):
            return
        try:
            reply = (True, plan_passes(*args))
        except Exception as err:  # the parent raises it
            reply = (False, err)
        try:
            results.send(reply)
        except OSError:  # the parent is gone
            return
