"""Text -> vectors: resolve `--model`, pick the device, plan batches, run the model.

The stage that turns token shards into embedding shards (embed.py) and the one-off commands
(`pipeline embed --sentence`, `pipeline similarity`, `pipeline search`) all go through
``Encoder``, so a query is embedded exactly as the corpus was.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pipeline.embed.layout import (  # noqa: F401 (the layout's names, for callers)
    WINDOW,
    WINDOW_STEP,
    pack_windows,
    plan_layout,
    plan_passes,
)
from pipeline.errors import ModelSpecError, UsageError
from pipeline.model import fused
from pipeline.model.gpt2 import PRESETS, GPT2Model, PackedLayout, load_pretrained, random_model
from pipeline.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# The trained default model ships inside the package; until it exists, a seeded random preset.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "default"
FALLBACK_MODEL = "random:gpt2-mini"


RANDOM_INIT = threading.Lock()


def default_model_spec() -> str:
    if (DEFAULT_MODEL_DIR / "config.json").is_file():
        return str(DEFAULT_MODEL_DIR)
    return FALLBACK_MODEL


def model_width(spec: str | None) -> int | None:
    """n_embd of a model spec, from its config alone (no weights read); None where the spec
    is not a model (`load_model` says why)."""
    spec = spec or default_model_spec()
    if spec.startswith("random:"):
        config = PRESETS.get(spec.split(":")[1])
        return config.n_embd if config else None
    try:
        return int(json.loads((Path(spec) / "config.json").read_text()).get("n_embd", 768))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def compile_ahead(spec: str | None, device: str | None, precision: str = "auto"
                  ) -> threading.Thread | None:
    """Start compiling the packed path's fused kernel for `spec` on `device` in a thread, so
    that it overlaps the loading of the weights (it takes ~0.6 s even from Triton's cache;
    the weights ~0.2 s); `Encoder.warm_up` waits for it. None where there is nothing to
    compile."""
    with contextlib.suppress(ValueError, RuntimeError):  # bad names: Encoder.load says why
        device_ = pick_device(device)
        width = model_width(spec)
        if device_.type == "cuda" and resolve_precision(precision, device_) == "bf16" and width:
            return fused.start_compile(device_, torch.bfloat16, width)
    return None


def state_sha256(model: GPT2Model) -> str:
    """Hash of the weights themselves (names, shapes, fp32 bytes) for models without a file."""
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_model(spec: str | None) -> tuple[GPT2Model, str, str]:
    """(model, canonical spec, weights sha256) for a checkpoint folder or `random:PRESET[:SEED]`."""
    spec = spec or default_model_spec()
    if spec.startswith("random:"):
        parts = spec.split(":")
        preset = parts[1] if len(parts) > 1 else ""
        if preset not in PRESETS or len(parts) > 3:
            raise ModelSpecError(f"unknown model {spec!r}: presets are "
                                 + ", ".join(f"random:{p}" for p in PRESETS))
        try:
            seed = int(parts[2]) if len(parts) == 3 else 0
        except ValueError:
            raise ModelSpecError(f"bad seed in {spec!r}: expected random:PRESET[:SEED]") from None
        with RANDOM_INIT:  # it seeds torch's global generator: one thread at a time
            model = random_model(preset, seed)
        return model, f"random:{preset}:{seed}", state_sha256(model)
    folder = Path(spec)
    if not folder.is_dir():
        raise ModelSpecError(f"unknown model {spec!r}: expected a checkpoint folder or "
                             "random:PRESET (" + ", ".join(PRESETS) + ")")
    try:
        model = load_pretrained(folder)
    except (FileNotFoundError, ValueError, json.JSONDecodeError, OSError) as err:
        raise ModelSpecError(str(err).splitlines()[0]) from None
    config = json.loads((folder / "config.json").read_text())
    sha = config.get("weights_sha256") or state_sha256(model)
    return model, str(folder), sha


def pick_device(name: str | None = None) -> torch.device:
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:  # "cuda": the current GPU, by number
        device = torch.device("cuda", torch.cuda.current_device())
    return device


PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX-512 BF16: bf16 matmuls then run 1.5-3x faster than fp32 on the CPU."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 on CUDA and on CPUs with bf16 units, else fp32 (cosine to fp32 >= 0.999)."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" or cpu_has_fast_bf16() else "fp32"


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


LAYOUT_ARRAYS = ("ids", "positions", "seq", "starts", "lengths", "long_cu")


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
        layouts.append(PackedLayout(**arrays, window_tokens=plan["window_tokens"],
                                    window=plan["window"], long_max=plan["long_max"]))
    return layouts


def pad_batch(token_lists: Sequence[Sequence[int]], pad_id: int = 0):
    """Right-pad to (B, T) int64 ids and mask (1 = real token)."""
    T = max(max((len(t) for t in token_lists), default=1), 1)
    ids = np.full((len(token_lists), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(token_lists), T), dtype=np.int64)
    for row, toks in enumerate(token_lists):
        ids[row, : len(toks)] = toks
        mask[row, : len(toks)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


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


@dataclass
class Encoder:
    """A loaded model on its device, with the tokenizer and pooling it embeds with."""

    model: GPT2Model
    tokenizer: Tokenizer
    device: torch.device
    spec: str
    sha256: str
    pooling: str
    precision: str = "fp32"
    window: int = WINDOW  # of PackedLayout; 0: flash's variable-length kernel for all
    queued: collections.deque = field(default_factory=collections.deque, repr=False)
    # A list to have each packed pass's host timings and GPU events appended to
    # (benchmarks/gpu_timeline.py finds why the GPU waited); None: not recorded.
    pass_log: list | None = field(default=None, repr=False)

    @classmethod
    def load(cls, spec: str | None = None, device: str | None = None,
             pooling: str | None = None, precision: str = "auto") -> Encoder:
        model, canonical, sha = load_model(spec)
        dev = pick_device(device)
        precision = resolve_precision(precision, dev)
        model = model.to(dev).eval()
        if dev.type == "cuda" and precision == "bf16":
            # bf16 weights: no per-op casts (autocast's), half the weight traffic; pooling and
            # normalisation still accumulate in fp32.
            model = model.to(torch.bfloat16)
        return cls(model, Tokenizer.load(), dev, canonical, sha,
                   pooling or model.config.pooling, precision)

    @property
    def dim(self) -> int:
        return self.model.config.output_dim

    @property
    def max_tokens(self) -> int:
        return self.model.config.n_positions

    def identity(self) -> dict:
        """What made a vector: recorded in manifests, checked by later stages."""
        c = self.model.config
        return {"model": self.spec, "model_sha256": self.sha256, "pooling": self.pooling,
                "attention": c.attention, "dim": self.dim, "n_positions": c.n_positions,
                "tokenizer": self.tokenizer.name}

    @property
    def default_batch_tokens(self) -> int:
        """Tokens per forward pass: large on a GPU to fill it, modest on a CPU for cache."""
        return 65536 if self.device.type == "cuda" else 16384

    def _autocast(self):
        if self.precision == "bf16" and self.device.type == "cpu":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def embed_batch(self, token_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """One padded forward pass; returns (B, dim) float32 L2-normalised vectors."""
        ids, mask = pad_batch(token_lists)
        ids, mask = ids.to(self.device), mask.to(self.device)
        with self._autocast():
            vectors = self.model.embed(ids, mask, self.pooling)
        return vectors.float().cpu().numpy()

    def embed_token_lists(self, token_lists: Sequence[Sequence[int]],
                          max_batch_tokens: int | None = None,
                          progress: Iterable | None = None) -> np.ndarray:
        """Vectors in input order; lists longer than the context are truncated."""
        lengths = np.array([min(len(t), self.max_tokens) for t in token_lists], dtype=np.int64)
        offsets = np.zeros(len(token_lists) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.fromiter((x for t, n in zip(token_lists, lengths, strict=True)
                              for x in t[:n]), dtype=np.int32, count=int(offsets[-1]))
        return self.embed_flat(values, offsets, max_batch_tokens, progress)

    def embed_flat(self, values: np.ndarray, offsets: np.ndarray,
                   max_batch_tokens: int | None = None, progress=None,
                   dtype: type = np.float32) -> np.ndarray:
        """Sequences given Arrow-style (flat token ids, offsets) -> (n, dim) vectors."""
        return self.start_embed_flat(values, offsets, max_batch_tokens, progress, dtype).result()

    def start_embed_flat(self, values: np.ndarray, offsets: np.ndarray,
                         max_batch_tokens: int | None = None, progress=None,
                         dtype: type = np.float32, plan=None) -> PendingVectors:
        """`embed_flat` without waiting: on CUDA the work is queued on the GPU and this returns
        at once, so the caller can queue the next shard while another thread collects these
        vectors (`.result()`); elsewhere the vectors are computed before it returns.

        On CUDA in bf16, sequences are packed without padding (`PackedLayout`; `plan` is
        `plan_passes`'s result, if already made); elsewhere they are padded in length-sorted
        batches.
        """
        max_batch_tokens = max_batch_tokens or self.default_batch_tokens
        if self.packs:
            return self._embed_packed(values, offsets, max_batch_tokens, progress, dtype, plan)
        token_lists = [values[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
        out = np.zeros((len(token_lists), self.dim), dtype=np.float32)
        for batch in plan_batches([len(t) for t in token_lists], max_batch_tokens):
            out[batch] = self.embed_batch([token_lists[i] for i in batch])
            if progress is not None:
                progress.update(len(batch))
        return PendingVectors(host=out.astype(dtype, copy=False))

    @property
    def packs(self) -> bool:
        """Whether this encoder runs the packed GPU path (`plan_passes`, PackedLayout)."""
        return self.device.type == "cuda" and self.precision == "bf16"

    def plan_passes(self, values: np.ndarray, offsets: np.ndarray, max_batch_tokens: int
                    ) -> tuple[list[tuple[int, int]], list[dict]]:
        """The host's share of the packed path (`layout.plan_passes`) for this encoder."""
        return plan_passes(values, offsets, max_batch_tokens, self.window)

    def warm_up(self, compiling: threading.Thread | None = None) -> None:
        """Do now what the first passes would otherwise stall the GPU on, while the first
        shard is read or tokenized: the fused kernel's compile (~0.5-2 s; `compiling`, if
        `compile_ahead` started it already) in one thread, the first calls into cuDNN and
        cuBLAS (loading their kernels, ~1.5 s cold) in this one, at the same time (torch's
        ops release the GIL)."""
        if not self.packs:
            return
        model, causal = self.model, self.model.config.attention == "causal"
        compiling = compiling or fused.start_compile(self.device, model.wte.weight.dtype,
                                                     model.config.n_embd)
        # Enough short sequences for WINDOW_STEP windows, and two long ones.
        lengths = np.array([WINDOW // 2] * (2 * WINDOW_STEP) + [2 * WINDOW + 1] * 2)
        values = np.zeros(lengths.sum(), dtype=np.int32)
        with torch.cuda.device(self.device), torch.inference_mode():
            layouts = [layout_on_device([plan_layout(values, lengths, window)], self.device)[0]
                       for window in {self.window, 0}]
            for layout in layouts:  # the first block's attention and MLP: no fused kernel
                x = model.h[0].ln_1(model.wte(layout.ids) + model.wpe(layout.positions.long()))
                layout.build_window_mask(causal)
                model.h[0].mlp(model.h[0].attn.forward_packed(x, layout, causal))
            compiling.join()
            for layout in layouts:
                model.embed_packed(layout, self.pooling)
            torch.cuda.synchronize()

    def _embed_packed(self, values: np.ndarray, offsets: np.ndarray, max_batch_tokens: int,
                      progress=None, dtype: type = np.float32, plan=None) -> PendingVectors:
        # Events record on the current device's stream: make that this encoder's GPU (not
        # cuda:0), or the copy back would not wait for this GPU's kernels.
        with torch.cuda.device(self.device), torch.inference_mode():
            return self._queue_packed(values, offsets, max_batch_tokens, progress, dtype, plan)

    def _queue_packed(self, values: np.ndarray, offsets: np.ndarray, max_batch_tokens: int,
                      progress=None, dtype: type = np.float32, plan=None) -> PendingVectors:
        n = len(offsets) - 1
        if n == 0:
            return PendingVectors(host=np.zeros((0, self.dim), dtype=dtype))
        batches, plans = plan or self.plan_passes(values, offsets, max_batch_tokens)
        log = self.pass_log
        started = recorded_event(timing=True)
        # One host-to-device copy per call; the host waits for the GPU only to keep
        # AHEAD_BATCHES passes queued, never for results.
        layouts = layout_on_device(plans, self.device)
        # Written in the output dtype pass by pass (float16: half the bytes to copy back),
        # so each pass's rows can go back to the host as soon as it is done.
        out = torch.empty((n, self.dim), device=self.device, dtype=TORCH_DTYPES[np.dtype(dtype)])
        done = []
        with self._autocast():
            for (a, b), layout in zip(batches, layouts, strict=True):
                waited = time.perf_counter()
                self._wait_for_gpu()
                launched = time.perf_counter()
                begin = recorded_event(timing=True) if log is not None else None
                out[a:b] = self.model.embed_packed(layout, self.pooling)
                last = b == n  # its event also times the whole call
                self.queued.append(recorded_event(timing=log is not None or last))
                done.append((b, self.queued[-1]))
                if log is not None:
                    log.append({"first_of_call": a == 0, "at": waited,
                                "window_tokens": layout.window_tokens,
                                "wait_s": launched - waited,
                                "launch_s": time.perf_counter() - launched,
                                "begin": begin, "end": self.queued[-1]})
                if progress is not None:
                    progress.update(b - a)
        return PendingVectors(device_tensor=out, started=started, done=done)

    def _wait_for_gpu(self) -> None:
        """Keep at most AHEAD_BATCHES forward passes queued on the GPU. Waiting on an event
        releases the GIL; a launch into a full CUDA queue would block holding it, and stall
        every other Python thread (the tokenizer's, the writers')."""
        while len(self.queued) >= AHEAD_BATCHES:
            self.queued.popleft().synchronize()

    def embed_texts(self, texts: Sequence[str], max_batch_tokens: int | None = None
                    ) -> np.ndarray:
        return self.embed_token_lists(self.tokenizer.encode_batch(texts), max_batch_tokens)
