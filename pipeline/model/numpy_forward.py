"""The GPT-2 encoder's forward pass in numpy, for embedding search queries without torch.

`pipeline search` embeds one query (or a file of them) and exits. Importing torch was ~1.05 s
of its 2.3 s cold start, while the forward of a 10-token query through the default model takes
milliseconds in numpy. This module computes what `model.GPT2Model.embed` computes, in fp32
(the tests hold it to 1e-5 against torch for every pooling and both attentions), and the same
identity and weights hash as `encoder.Encoder`, so an index's model check works unchanged.

It reads checkpoint folders (config.json + model.safetensors, fp32 or fp16 weights, ours or
Hugging Face GPT-2). Anything else raises NotSupported and is the torch encoder's job:
`random:PRESET` models (torch's generator makes their weights) and bf16 files (numpy has no
bf16; safetensors.numpy refuses them).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import CONV1D_SUFFIXES, POOLINGS, GPT2Config
from pipeline.errors import PipelineError
from pipeline.hashing import file_sha256
from pipeline.text.tokenizer import Tokenizer


class NotSupported(PipelineError):
    """A model this module does not load; the caller falls back to the torch encoder."""


def read_weights(path: Path, cfg: GPT2Config) -> dict[str, np.ndarray]:
    """model.safetensors -> our names (as checkpoint.from_hf_state_dict), Hugging Face layout.

    Every weight is fp32 except the token embeddings, kept as stored (fp16 halves them) and
    converted by the rows a query uses. NotSupported if the names or shapes do not fit cfg.
    """
    from safetensors.numpy import load_file

    try:
        raw = load_file(str(path))
    except (TypeError, KeyError, ValueError, OSError) as err:  # e.g. bf16: no numpy dtype
        raise NotSupported(f"{path}: {err}") from None
    weights = {}
    for name, array in raw.items():
        name = name.removeprefix("transformer.")
        if name.startswith("lm_head") or name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        weights[name] = array if name == "wte.weight" else array.astype(np.float32)
    expected = cfg.weight_shapes()
    if {k: tuple(v.shape) for k, v in weights.items()} != expected:
        raise NotSupported(f"{path}: weights do not fit the config")
    if weights["wte.weight"].dtype not in (np.float32, np.float16):
        raise NotSupported(f"{path}: token embeddings are {weights['wte.weight'].dtype}")
    return weights


def state_sha256(weights: dict[str, np.ndarray]) -> str:
    """encoder.state_sha256 over the same bytes: names sorted, shapes, fp32 in torch's layout."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].T if name.endswith(CONV1D_SUFFIXES) else weights[name]
        t = np.ascontiguousarray(t, dtype=np.float32)
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# The forward: model/gpt2.py's, op for op


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = np.square(x - mu).mean(-1, keepdims=True)  # biased, as torch's LayerNorm
    return (x - mu) / np.sqrt(var + eps) * w + b


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def pool(hidden: np.ndarray, mask: np.ndarray, method: str) -> np.ndarray:
    """model.pool: (B, T, C) states over real tokens (mask (B, T), right-padded) -> (B, C)."""
    m = mask.astype(hidden.dtype)[..., None]  # (B, T, 1)
    if method == "mean":
        return (hidden * m).sum(1) / np.maximum(m.sum(1), 1)
    if method == "weighted-mean":
        w = m * np.arange(1, hidden.shape[1] + 1, dtype=hidden.dtype)[None, :, None]
        return (hidden * w).sum(1) / np.maximum(w.sum(1), 1)
    if method == "last":
        last = np.maximum(mask.sum(1), 1) - 1
        return hidden[np.arange(hidden.shape[0]), last]
    if method == "max":
        return np.where(m == 0, -np.inf, hidden).max(1)
    if method == "first":
        return hidden[:, 0]
    raise ValueError(f"unknown pooling {method!r}; choose from {', '.join(POOLINGS)}")


@dataclass
class QueryEncoder:
    """A checkpoint's weights as numpy arrays, with the tokenizer and pooling it embeds with:
    the part of encoder.Encoder that search uses (embed_texts, identity, sha256)."""

    config: GPT2Config
    weights: dict[str, np.ndarray]
    tokenizer: Tokenizer
    spec: str
    sha256: str
    pooling: str

    @classmethod
    def load(cls, spec: str | Path, pooling: str | None = None) -> QueryEncoder:
        """A checkpoint folder, as encoder.load_model reads it; NotSupported otherwise."""
        folder = Path(spec)
        config_path, weights_path = folder / "config.json", folder / "model.safetensors"
        if str(spec).startswith("random:") or not config_path.is_file() \
                or not weights_path.is_file():
            raise NotSupported(f"{spec} is not a checkpoint folder")
        try:
            config = json.loads(config_path.read_text())
            cfg = GPT2Config.from_dict(config)
        except (OSError, ValueError, TypeError) as err:  # JSONDecodeError is a ValueError
            raise NotSupported(f"{config_path}: {err}") from None
        if pooling is not None and pooling not in POOLINGS:
            raise NotSupported(f"unknown pooling {pooling!r}")
        weights = read_weights(weights_path, cfg)
        # Computed, never read: other weights beside this config.json are another model.
        sha = (file_sha256(weights_path) if config.get("weights_sha256")
               else state_sha256(weights))
        return cls(cfg, weights, Tokenizer.load(), str(folder), sha, pooling or cfg.pooling)

    @property
    def dim(self) -> int:
        return self.config.output_dim

    @property
    def max_tokens(self) -> int:
        return self.config.n_positions

    def identity(self) -> dict:
        """encoder.Encoder.identity: what made a vector."""
        c = self.config
        return {"model": self.spec, "model_sha256": self.sha256, "pooling": self.pooling,
                "attention": c.attention, "dim": self.dim, "n_positions": c.n_positions,
                "tokenizer": self.tokenizer.name}

    def hidden_states(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """model.GPT2Model.forward: ids (B, T) right-padded, mask (B, T) bool -> (B, T, C)."""
        cfg, w = self.config, self.weights
        B, T = ids.shape
        if T > cfg.n_positions:
            raise ValueError(f"sequence of {T} tokens exceeds the context of {cfg.n_positions}")
        C, nh = cfg.n_embd, cfg.n_head
        hs = C // nh
        x = w["wte.weight"][ids].astype(np.float32) + w["wpe.weight"][:T]  # (B, T, C)
        # Keys a query may attend to: real tokens (and earlier ones, if causal); a pad query
        # sees itself, so no softmax row is empty (as the torch forward's mask).
        allowed = mask[:, None, None, :]  # (B, 1, 1, T)
        if cfg.attention == "causal":
            allowed = allowed & np.tri(T, dtype=bool)
        allowed = allowed | np.eye(T, dtype=bool)
        eps = cfg.layer_norm_epsilon
        for i in range(cfg.n_layer):
            p = f"h.{i}."
            h = layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps)
            qkv = h @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]  # (B, T, 3C)
            q, k, v = (t.reshape(B, T, nh, hs).transpose(0, 2, 1, 3)  # each (B, nh, T, hs)
                       for t in np.split(qkv, 3, axis=-1))
            scores = (q @ k.transpose(0, 1, 3, 2)) / math.sqrt(hs)  # (B, nh, T, T)
            y = softmax(np.where(allowed, scores, -np.inf)) @ v  # (B, nh, T, hs)
            y = y.transpose(0, 2, 1, 3).reshape(B, T, C)
            x = x + (y @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"])
            h = layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"], eps)
            h = gelu_tanh(h @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"])
            x = x + (h @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"])
        return layer_norm(x, w["ln_f.weight"], w["ln_f.bias"], eps)

    def embed_batch(self, token_lists: Sequence[Sequence[int]]) -> np.ndarray:
        """One padded forward pass -> (B, dim) float32 unit vectors (model.GPT2Model.embed)."""
        T = max(max((len(t) for t in token_lists), default=1), 1)
        ids = np.zeros((len(token_lists), T), dtype=np.int64)
        mask = np.zeros((len(token_lists), T), dtype=bool)
        for row, toks in enumerate(token_lists):
            ids[row, :len(toks)] = toks
            mask[row, :len(toks)] = True
        pooled = pool(self.hidden_states(ids, mask), mask, self.pooling)
        if self.config.projection_dim:
            pooled = pooled @ self.weights["proj.weight"].T + self.weights["proj.bias"]
        norm = np.linalg.norm(pooled, axis=-1, keepdims=True)
        return (pooled / np.maximum(norm, 1e-12)).astype(np.float32)  # F.normalize's eps

    def embed_token_lists(self, token_lists: Sequence[Sequence[int]],
                          max_batch_tokens: int = 4096) -> np.ndarray:
        """Vectors in input order; lists longer than the context are truncated. Batches of
        similar length (longest first) keep padding and the (B, heads, T, T) scores small."""
        lists = [list(t[:self.max_tokens]) for t in token_lists]
        order = sorted(range(len(lists)), key=lambda i: -len(lists[i]))
        out = np.zeros((len(lists), self.dim), dtype=np.float32)
        start = 0
        while start < len(order):
            size = max(1, max_batch_tokens // max(len(lists[order[start]]), 1))
            batch = order[start:start + size]
            out[batch] = self.embed_batch([lists[i] for i in batch])
            start += size
        return out

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.embed_token_lists(self.tokenizer.encode_batch(texts))
