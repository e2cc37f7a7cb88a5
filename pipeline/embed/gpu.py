"""The GPU side of the packed path: layouts copied to the device, forward passes queued on
its stream without waiting for results, vectors handed back as each pass finishes, and the
warm-up (kernel compile, cuDNN and cuBLAS) done before the first shard.

The host never blocks in a launch: it keeps at most AHEAD_BATCHES passes queued and waits on
CUDA events (which release the GIL) for the rest, so the threads that read and write shards
keep running while a device thread feeds its GPU.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.embed.device import pick_device, quiet, resolve_precision
from pipeline.embed.layout import LAYOUT_ARRAYS, LAYOUT_INTS, WINDOW, WINDOW_STEP, plan_layout
from pipeline.embed.models import model_width
from pipeline.errors import PipelineError
from pipeline.model import fp8, fused
from pipeline.model.gpt2 import PackedLayout

if TYPE_CHECKING:
    from pipeline.embed.encoder import Encoder

AHEAD_BATCHES = 3  # forward passes queued on a GPU, the running one included
TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}


def recorded_event(timing: bool = False) -> torch.cuda.Event:
    """An event recorded now on the current stream."""
    event = torch.cuda.Event(enable_timing=timing)
    event.record()
    return event


class PendingVectors:
    """Vectors that may still be on their way from the GPU: `.result()` waits for all of
    them, `.parts()` hands them over block by block as the GPU finishes each."""

    def __init__(self, host: np.ndarray | None = None, device_tensor: torch.Tensor | None = None,
                 started: torch.cuda.Event | None = None,
                 done: Sequence[tuple[int, torch.cuda.Event]] = ()):
        self.host, self.device_tensor = host, device_tensor
        # (rows, event) per forward pass: rows [0, rows) are final once the event is done;
        # the last covers them all. `started` and the last event time the GPU's work.
        self.started, self.done = started, list(done)
        self.gpu_seconds = 0.0  # from the first kernel to the last, once the result is in

    def result(self) -> np.ndarray:
        whole = len(self.device_tensor) if self.host is None else 0
        for _ in self.parts(min_rows=whole):  # one copy, once the last pass is done
            pass
        return self.host

    def parts(self, min_rows: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, vectors) of consecutive blocks of at least `min_rows` rows (the last
        may be smaller), in order, each as soon as the GPU has made it: a writer can write a
        shard's first rows while the GPU is still on its last."""
        if self.host is not None:
            yield 0, self.host
            return
        gpu = self.device_tensor
        host = torch.empty(gpu.shape, dtype=gpu.dtype, pin_memory=True)
        # Copied on a side stream once the block's kernels are done, so that waiting here
        # does not wait for kernels queued later (the next shard's) on the main stream.
        stream = torch.cuda.Stream(gpu.device)
        first = 0
        for rows, event in self.done:
            if rows - first < min_rows and rows < len(gpu):
                continue
            with torch.cuda.device(gpu.device), torch.cuda.stream(stream):
                stream.wait_event(event)
                host[first:rows].copy_(gpu[first:rows], non_blocking=True)
            stream.synchronize()
            yield first, host[first:rows].numpy()
            first = rows
        self.host, self.device_tensor = host.numpy(), None
        self.gpu_seconds = self.started.elapsed_time(self.done[-1][1]) / 1e3


def layout_on_device(plans: list[dict], device: torch.device) -> list[PackedLayout]:
    """The layouts of several passes in one pinned host-to-device copy (no host sync)."""
    pieces = [plan[name] for plan in plans for name in LAYOUT_ARRAYS]
    flat = torch.from_numpy(np.concatenate(pieces))
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    views = iter(torch.split(flat, [len(p) for p in pieces]))
    layouts = []
    for plan in plans:
        arrays = {name: next(views) for name in LAYOUT_ARRAYS}
        layouts.append(PackedLayout(**arrays, **{name: plan[name] for name in LAYOUT_INTS}))
    return layouts


def compile_ahead(spec: str | None, device: str | None, precision: str = "auto"
                  ) -> threading.Thread | None:
    """Start compiling the packed path's fused kernel for `spec` on `device` in a thread, so
    that it overlaps the loading of the weights (the compile takes longer, even from
    Triton's cache: docs/performance.md); `Encoder.warm_up` waits for it. None where there
    is nothing to compile."""
    # Bad names: Encoder.load says why.
    with contextlib.suppress(ValueError, RuntimeError, PipelineError):
        device_ = pick_device(device)
        width = model_width(spec)
        resolved = resolve_precision(precision, device_, notice=quiet)
        if device_.type == "cuda" and resolved in ("bf16", "fp8") and width:
            return start_compile(device_, resolved, width)
    return None


def start_compile(device: torch.device, precision: str, width: int) -> threading.Thread:
    """The packed path's Triton kernels for `precision` compiling in a thread of its own."""
    def compile_all():
        fused.compile_for(device, torch.bfloat16, width)
        if precision == "fp8":
            fp8.compile_for(device, width)

    thread = threading.Thread(target=compile_all)
    thread.start()
    return thread


def warm_up(encoder: Encoder, compiling: threading.Thread | None = None) -> None:
    """Do now what the first passes would otherwise stall the GPU on, while the first shard
    is read or tokenized: the fused kernel's compile (`compiling`, if `compile_ahead` started
    it already) in one thread, the first calls into cuDNN and cuBLAS (loading their kernels)
    in this one, at the same time (torch's ops release the GIL)."""
    model, causal = encoder.model, encoder.model.config.attention == "causal"
    compiling = compiling or start_compile(encoder.device, encoder.precision,
                                           model.config.n_embd)
    # Enough short sequences for WINDOW_STEP windows, and two long ones.
    lengths = np.array([WINDOW // 2] * (2 * WINDOW_STEP) + [2 * WINDOW + 1] * 2)
    values = np.zeros(lengths.sum(), dtype=np.int32)
    with torch.cuda.device(encoder.device), torch.inference_mode():
        layouts = [layout_on_device([plan_layout(values, lengths, window)], encoder.device)[0]
                   for window in {encoder.window, 0}]
        for layout in layouts:  # the first block's attention and MLP: no fused kernel
            x = model.h[0].ln_1(model.wte(layout.ids) + model.wpe(layout.positions.long()))
            layout.build_window_mask(causal)
            model.h[0].mlp(model.h[0].attn.forward_packed(x, layout, causal))
        compiling.join()
        for layout in layouts:
            encoder.embed_packed(layout)
        torch.cuda.synchronize()


def queue_packed(encoder: Encoder, values: np.ndarray, offsets: np.ndarray,
                 max_batch_tokens: int, progress=None, dtype: type = np.float32,
                 plan=None) -> PendingVectors:
    """Queue the packed passes over sequences given Arrow-style on `encoder`'s GPU; returns
    at once (`plan`: `Encoder.plan_passes`'s result, if already made)."""
    # Events record on the current device's stream: make that this encoder's GPU (not
    # cuda:0), or the copy back would not wait for this GPU's kernels.
    with torch.cuda.device(encoder.device), torch.inference_mode():
        return _queue_passes(encoder, values, offsets, max_batch_tokens, progress, dtype, plan)


def _queue_passes(encoder: Encoder, values: np.ndarray, offsets: np.ndarray,
                  max_batch_tokens: int, progress=None, dtype: type = np.float32,
                  plan=None) -> PendingVectors:
    n = len(offsets) - 1
    if n == 0:
        return PendingVectors(host=np.zeros((0, encoder.dim), dtype=dtype))
    batches, plans = plan or encoder.plan_passes(values, offsets, max_batch_tokens)
    log = encoder.pass_log
    started = recorded_event(timing=True)
    # One host-to-device copy per call; the host waits for the GPU only to keep
    # AHEAD_BATCHES passes queued, never for results.
    layouts = layout_on_device(plans, encoder.device)
    # Written in the output dtype pass by pass (float16: half the bytes to copy back),
    # so each pass's rows can go back to the host as soon as it is done.
    out = torch.empty((n, encoder.dim), device=encoder.device,
                      dtype=TORCH_DTYPES[np.dtype(dtype)])
    done = []
    for (a, b), layout in zip(batches, layouts, strict=True):
        waited = time.perf_counter()
        wait_for_gpu(encoder.queued)
        launched = time.perf_counter()
        begin = recorded_event(timing=True) if log is not None else None
        out[a:b] = encoder.embed_packed(layout)
        last = b == n  # its event also times the whole call
        encoder.queued.append(recorded_event(timing=log is not None or last))
        done.append((b, encoder.queued[-1]))
        if log is not None:
            log.append({"first_of_call": a == 0, "at": waited,
                        "window_tokens": layout.window_tokens,
                        "wait_s": launched - waited,
                        "launch_s": time.perf_counter() - launched,
                        "begin": begin, "end": encoder.queued[-1]})
        if progress is not None:
            progress.update(b - a)
    return PendingVectors(device_tensor=out, started=started, done=done)


def wait_for_gpu(queued) -> None:
    """Keep at most AHEAD_BATCHES forward passes queued on the GPU (`queued`: their events,
    oldest first). Waiting on an event releases the GIL; a launch into a full CUDA queue
    would block holding it, and stall every other Python thread (the tokenizer's, the
    writers')."""
    while len(queued) >= AHEAD_BATCHES:
        queued.popleft().synchronize()
