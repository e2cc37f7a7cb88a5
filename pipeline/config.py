"""A GPT-2 encoder's shape and what makes an encoder of it: one schema, torch-free.

The torch model (model/gpt2.py), the numpy forward that embeds search queries without torch
(model/numpy_forward.py) and the CLI's option checks all read it from here, so a config.json
means the same thing to each of them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

POOLINGS = ("mean", "weighted-mean", "last", "max", "first")
ATTENTIONS = ("causal", "bidirectional")
# Hugging Face keeps these four GPT-2 weights as Conv1D, (in, out): the transpose of nn.Linear.
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                   "mlp.c_proj.weight")


@dataclass(frozen=True)
class GPT2Config:
    """Fields of our config.json, a superset-compatible reading of Hugging Face's; validated
    on construction (ValueError)."""

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_positions: int = 1024
    vocab_size: int = 50257
    layer_norm_epsilon: float = 1e-5
    # What makes an encoder of the decoder (recorded in every checkpoint):
    attention: str = "causal"  # "bidirectional" lets every token see the whole text (LLM2Vec)
    pooling: str = "mean"
    # Optional linear head after pooling (e.g. to a teacher's width during distillation); 0 = none.
    projection_dim: int = 0

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError("n_embd must be a multiple of n_head")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}")

    @classmethod
    def from_dict(cls, d: dict) -> GPT2Config:
        """Accepts our config.json and Hugging Face's (which has many extra keys)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def output_dim(self) -> int:
        return self.projection_dim or self.n_embd

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight (our names, Hugging Face layout) and its shape."""
        C, P = self.n_embd, self.projection_dim
        shapes = {"wte.weight": (self.vocab_size, C), "wpe.weight": (self.n_positions, C),
                  "ln_f.weight": (C,), "ln_f.bias": (C,)}
        for i in range(self.n_layer):
            for name, shape in (("ln_1.weight", (C,)), ("ln_1.bias", (C,)),
                                ("attn.c_attn.weight", (C, 3 * C)), ("attn.c_attn.bias", (3 * C,)),
                                ("attn.c_proj.weight", (C, C)), ("attn.c_proj.bias", (C,)),
                                ("ln_2.weight", (C,)), ("ln_2.bias", (C,)),
                                ("mlp.c_fc.weight", (C, 4 * C)), ("mlp.c_fc.bias", (4 * C,)),
                                ("mlp.c_proj.weight", (4 * C, C)), ("mlp.c_proj.bias", (C,))):
                shapes[f"h.{i}.{name}"] = shape
        if P:
            shapes.update({"proj.weight": (P, C), "proj.bias": (P,)})  # nn.Linear: (out, in)
        return shapes


PRESETS: dict[str, GPT2Config] = {
    "gpt2": GPT2Config(),  # 124M
    "gpt2-medium": GPT2Config(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": GPT2Config(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": GPT2Config(n_layer=48, n_head=25, n_embd=1600),  # 1.5B
    # CPU-friendly: the shape of the project's trained default model (16M parameters).
    "gpt2-mini": GPT2Config(n_layer=4, n_head=4, n_embd=256, n_positions=512),
    # For tests only.
    "gpt2-tiny": GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128),
}
