"""Text -> vectors: the `Encoder`, a loaded model on its device with its tokenizer and
pooling.

The stage that turns token shards into embedding shards (stage.py) and the one-off commands
(`pipeline embed --sentence`, `pipeline similarity`, `pipeline search`) all go through
``Encoder``, so a query is embedded exactly as the corpus was. Its parts: models.py (what
`--model` names), device.py (device and precision), batching.py (the CPU's padded batches),
layout.py and gpu.py (the GPU's packed passes).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.embed import gpu
from pipeline.embed.batching import PAD_MULTIPLE, pad_batch, padded_length, plan_batches
from pipeline.embed.device import cpu_has_fast_bf16, pick_device, resolve_precision
from pipeline.embed.gpu import PendingVectors, compile_ahead, layout_on_device
from pipeline.embed.layout import WINDOW, pack_windows, plan_layout, plan_passes
from pipeline.embed.models import DEFAULT_MODEL_DIR, default_model_spec, load_model, model_width
from pipeline.errors import ModelSpecError
from pipeline.model import fp8
from pipeline.model.gpt2 import GPT2Model
from pipeline.text.tokenizer import Tokenizer

# Besides Encoder, names that code outside embed/ (train/, tests) imports from here; each
# lives in the module it is imported from above.
__all__ = ["DEFAULT_MODEL_DIR", "Encoder", "ModelSpecError", "PendingVectors", "compile_ahead",
           "cpu_has_fast_bf16", "default_model_spec", "layout_on_device", "load_model",
           "model_width", "pack_windows", "pad_batch", "pick_device", "plan_batches",
           "plan_layout"]


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
    # With precision fp8: each block's linear layers in e4m3 (model/fp8.py).
    fp8_blocks: list | None = field(default=None, repr=False)

    @classmethod
    def load(cls, spec: str | None = None, device: str | None = None,
             pooling: str | None = None, precision: str = "auto") -> Encoder:
        model, canonical, sha = load_model(spec)
        dev = pick_device(device)
        # This module's cpu_has_fast_bf16, looked up at each load: a test patches it here to
        # get an fp32 reference on a CPU with bf16 units.
        precision = resolve_precision(precision, dev, cpu_has_fast_bf16)
        model = model.to(dev).eval()
        if precision in ("bf16", "fp8"):
            # bf16 weights, on a GPU and on a CPU alike: no per-op casts (autocast's cost
            # 10% of a CPU pass), half the weight traffic; pooling and normalisation still
            # accumulate in fp32 (GPT2Model.embed). On this 2-core AMD: 25.8k -> 29.9k
            # tokens/s, min cosine to fp32 0.99998 (docs/performance.md). fp8 keeps them
            # for everything but the four linear layers of each block.
            model = model.to(torch.bfloat16)
        encoder = cls(model, Tokenizer.load(), dev, canonical, sha,
                      pooling or model.config.pooling, precision)
        if precision == "fp8":
            encoder.fp8_blocks = fp8.prepare(model)
        return encoder

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

    @torch.inference_mode()
    def embed_batch(self, token_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """One padded forward pass; returns (B, dim) float32 L2-normalised vectors. Padded to
        the longest row's padded_length, so a row of that length gets the vector it gets in
        any batch (batching.PAD_MULTIPLE)."""
        longest = max((len(t) for t in token_lists), default=1)
        ids, mask = pad_batch(token_lists,
                              length=padded_length(longest, PAD_MULTIPLE, self.max_tokens))
        ids, mask = ids.to(self.device), mask.to(self.device)
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
            return gpu.queue_packed(self, values, offsets, max_batch_tokens, progress, dtype,
                                    plan)
        return self._embed_padded(values, offsets, max_batch_tokens, progress, dtype)

    def _embed_padded(self, values: np.ndarray, offsets: np.ndarray, max_batch_tokens: int,
                      progress=None, dtype: type = np.float32) -> PendingVectors:
        token_lists = [values[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
        out = np.zeros((len(token_lists), self.dim), dtype=np.float32)
        for batch in self.plan_batches([len(t) for t in token_lists], max_batch_tokens):
            out[batch] = self.embed_batch([token_lists[i] for i in batch])
            if progress is not None:
                progress.update(len(batch))
        return PendingVectors(host=out.astype(dtype, copy=False))

    def plan_batches(self, lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
        """The padded path's batches: rows of one padded length each (batching.PAD_MULTIPLE)."""
        return plan_batches(lengths, max_batch_tokens, pad_multiple=PAD_MULTIPLE,
                            limit=self.max_tokens)

    @property
    def packs(self) -> bool:
        """Whether this encoder runs the packed GPU path (`plan_passes`, PackedLayout)."""
        return self.device.type == "cuda" and self.precision in ("bf16", "fp8")

    def embed_packed(self, layout) -> torch.Tensor:
        """One packed pass (PackedLayout) -> (B, dim) unit vectors on the device."""
        if self.fp8_blocks is not None:
            return fp8.embed_packed(self.model, self.fp8_blocks, layout, self.pooling)
        return self.model.embed_packed(layout, self.pooling)

    def plan_passes(self, values: np.ndarray, offsets: np.ndarray, max_batch_tokens: int
                    ) -> tuple[list[tuple[int, int]], list[dict]]:
        """The host's share of the packed path (`layout.plan_passes`) for this encoder."""
        return plan_passes(values, offsets, max_batch_tokens, self.window)

    def warm_up(self, compiling: threading.Thread | None = None) -> None:
        """The packed path's kernel compile and cuDNN and cuBLAS's first calls, done before
        the first shard (`gpu.warm_up`); nothing to do elsewhere."""
        if not self.packs:
            return
        gpu.warm_up(self, compiling)

    def embed_texts(self, texts: Sequence[str], max_batch_tokens: int | None = None
                    ) -> np.ndarray:
        return self.embed_token_lists(self.tokenizer.encode_batch(texts), max_batch_tokens)
