"""The model a run trains: where it starts (a preset, our checkpoint or a Hugging Face GPT-2
folder), the forward pass used for training, and its optimizer."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.config import PRESETS, GPT2Config
from pipeline.errors import TrainError
from pipeline.model.checkpoint import read_checkpoint
from pipeline.model.gpt2 import GPT2Model, pool
from pipeline.train.config import TrainConfig


def unknown_init(init: str) -> TrainError:
    return TrainError(f"--init {init!r} is neither a preset ({', '.join(PRESETS)}) nor a "
                      "checkpoint folder (config.json + model.safetensors)")


def build_model(init: str, seed: int = 0, **overrides) -> GPT2Model:
    """A model to train. Overrides replace config fields; a changed or new projection head
    starts random, a shorter context keeps the first position embeddings."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    torch.manual_seed(seed)
    if init in PRESETS:
        return GPT2Model(replace(PRESETS[init], **overrides))
    try:
        old, sd = read_checkpoint(init)
    except FileNotFoundError:
        raise unknown_init(init) from None
    cfg = replace(old, **overrides)
    if cfg.n_positions > old.n_positions:
        raise TrainError(f"--n-positions {cfg.n_positions} exceeds the checkpoint's "
                         f"{old.n_positions}")
    model = GPT2Model(cfg)
    sd["wpe.weight"] = sd["wpe.weight"][: cfg.n_positions]
    if cfg.projection_dim != old.projection_dim:
        sd = {k: v for k, v in sd.items() if not k.startswith("proj.")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("proj.")]
    if missing or unexpected:
        raise TrainError(f"{init}: weights do not fit its config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return model


def context_length(cfg: TrainConfig) -> int:
    """The context the model will have: --n-positions, else its init's (read before the
    weights, so that the data can be tokenized to it first)."""
    if cfg.n_positions:
        return cfg.n_positions
    if cfg.init in PRESETS:
        return PRESETS[cfg.init].n_positions
    config = Path(cfg.init) / "config.json"
    if not config.is_file():
        raise unknown_init(cfg.init)
    return GPT2Config.from_dict(json.loads(config.read_text())).n_positions


def embed_for_training(model: GPT2Model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GPT2Model.embed(ids, mask, normalize=False), minus its test for padding: that test reads
    a flag back from the GPU, which stalls the CPU once per forward pass; here the key mask is
    always applied (with no padding it masks nothing). tests/test_train_model.py checks both
    agree."""
    B, T = ids.shape
    x = model.wte(ids) + model.wpe(torch.arange(T, device=ids.device))  # (B, T, C)
    causal = model.config.attention == "causal"
    keys = mask.bool()[:, None, None, :]  # (B, 1, 1, T)
    if causal:
        keys = keys & torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
    attn_mask = keys | torch.eye(T, dtype=torch.bool, device=ids.device)  # pads see themselves
    for block in model.h:
        x = block(x, attn_mask, causal)
    pooled = pool(model.ln_f(x), mask, model.config.pooling)
    return model.proj(pooled) if model.proj is not None else pooled


def make_optimizer(model: GPT2Model, cfg: TrainConfig,
                   device: torch.device) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and LayerNorm gains (as nanoGPT)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8,
                             fused=device.type == "cuda")
