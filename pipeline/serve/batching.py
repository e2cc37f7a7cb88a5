"""Concurrent requests into batches: one forward pass and one FAISS search for many requests.

Requests wait in a bounded asyncio queue; one collector takes the first, gathers those that
were already waiting or arrive within a short window, up to a cost budget (tokens), and runs
the batch in the worker thread, so the event loop stays free while numpy or torch computes.
While a batch runs, the next one piles up in the queue: under load, batches grow on their own.
The window is skipped after a batch of one, so a lone caller waits for nobody. A full queue
is refused at once (QueueFull: the server answers 503) rather than waited on.

Nothing here knows about HTTP or indexes: `process` and `cost` are given.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


class QueueFull(Exception):
    """The queue holds as many requests as it may: try again later."""


@dataclass(frozen=True)
class Limits:
    window_s: float = 0.002  # how long a batch waits for company after its first request
    max_cost: int = 8192     # tokens in one batch (a request over it makes a batch alone)
    max_items: int = 256     # requests in one batch
    max_queue: int = 1024    # requests waiting, beyond which new ones are refused


# One request at a time, as it comes: the comparison point of the benchmark.
NO_BATCHING = Limits(window_s=0.0, max_items=1)


def joins(costs: Sequence[int], cost: int, limits: Limits) -> bool:
    """Whether a request of `cost` joins a batch whose requests cost `costs`: a batch always
    takes its first request, then others while it stays within both limits."""
    if not costs:
        return True
    return len(costs) < limits.max_items and sum(costs) + cost <= limits.max_cost


class Batcher:
    """Runs `process(items) -> results` (one result per item, in order) in a worker thread,
    on batches of submitted items. `cost(item)` is what `Limits.max_cost` bounds."""

    def __init__(self, process: Callable[[list], list], cost: Callable[[Any], int],
                 limits: Limits = Limits(), name: str = "batch",
                 observe: Callable[[list], None] | None = None):
        self.process = process
        self.cost = cost
        self.limits = limits
        self.observe = observe  # called with each batch's items, before it runs
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"serve-{name}")
        self.queue: asyncio.Queue | None = None
        self._held: tuple | None = None  # taken from the queue, too big for the last batch
        self._last_size = 0  # requests in the last batch
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        # Made here, in the loop that serves: a queue belongs to one event loop.
        self.queue = asyncio.Queue(self.limits.max_queue)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.executor.shutdown(wait=False, cancel_futures=True)

    @property
    def depth(self) -> int:
        """Requests waiting for a batch."""
        waiting = self.queue.qsize() if self.queue is not None else 0
        return waiting + (self._held is not None)

    async def submit(self, item) -> Any:
        """The result of `item`, once its batch has run; QueueFull when the queue is full,
        or the batch's exception if it failed."""
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((item, future))
        except asyncio.QueueFull:
            raise QueueFull(f"{self.depth} requests are waiting") from None
        return await future

    async def _run(self) -> None:
        while True:
            await self._dispatch(await self._collect())

    async def _collect(self) -> list[tuple]:
        """The next batch: the first request waiting, then those that fit, waiting at most
        the window for more."""
        entry = self._held or await self.queue.get()
        self._held = None
        batch, costs = [entry], [self.cost(entry[0])]
        loop = asyncio.get_running_loop()
        # After a batch of one, a lone caller's request is not kept waiting for company that
        # is not coming: the window opens again once requests come together.
        window = self.limits.window_s if self._last_size > 1 else 0.0
        deadline = loop.time() + window
        while len(batch) < self.limits.max_items:
            try:
                entry = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    entry = await asyncio.wait_for(self.queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            cost = self.cost(entry[0])
            if not joins(costs, cost, self.limits):
                self._held = entry
                break
            batch.append(entry)
            costs.append(cost)
        self._last_size = len(batch)
        return batch

    async def _dispatch(self, batch: list[tuple]) -> None:
        """Run a batch in the worker thread and hand each request its result."""
        live = [(item, future) for item, future in batch if not future.done()]  # not gone
        if not live:
            return
        items = [item for item, _ in live]
        if self.observe is not None:
            self.observe(items)
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self.executor, self.process, items)
        except Exception as err:  # the batch's requests all fail with it; the loop goes on
            for _, future in live:
                if not future.done():
                    future.set_exception(err)
            return
        for (_, future), result in zip(live, results, strict=True):
            if not future.done():
                future.set_result(result)
