"""Checkpoint folders: model.safetensors in Hugging Face's GPT-2 layout + config.json.

Hugging Face stores GPT-2's four projection matrices as ``Conv1D`` (in, out); the model
(gpt2.py) uses ``nn.Linear`` (out, in), so they are transposed on the way in and out. A
standard GPT-2 folder (``GPT2Model`` or ``GPT2LMHeadModel``) loads with ``load_pretrained``,
and our own checkpoints are valid Hugging Face folders too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.config import CONV1D_SUFFIXES, PRESETS, GPT2Config
from pipeline.errors import ModelSpecError
from pipeline.hashing import file_sha256
from pipeline.model.gpt2 import GPT2Model


def to_hf_state_dict(model: GPT2Model) -> dict[str, torch.Tensor]:
    """Our state dict in Hugging Face's layout: the Conv1D weights transposed, on the CPU."""
    out = {}
    for name, t in model.state_dict().items():
        t = t.t() if name.endswith(CONV1D_SUFFIXES) else t
        out[name] = t.detach().contiguous().cpu()
    return out


def from_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face GPT-2 names -> ours: drop the 'transformer.' prefix of LM-head checkpoints,
    the causal-mask buffers and the LM head, and transpose the Conv1D weights."""
    out = {}
    for name, t in sd.items():
        name = name.removeprefix("transformer.")
        if name.startswith("lm_head") or name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        out[name] = t.t() if name.endswith(CONV1D_SUFFIXES) else t
    return out


def save_checkpoint(model: GPT2Model, folder: str | Path, dtype: torch.dtype | None = None,
                    extra: dict | None = None) -> Path:
    """Write model.safetensors + config.json; config.json records the weights' sha256."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = to_hf_state_dict(model)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    weights = folder / "model.safetensors"
    tmp = weights.with_suffix(".tmp")
    save_file(sd, str(tmp), metadata={"format": "pt"})
    tmp.replace(weights)
    config = {"model_type": "gpt2", **asdict(model.config),
              "tokenizer": "gpt2 (tiktoken r50k_base)",
              "weights_sha256": file_sha256(weights), **(extra or {})}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def read_checkpoint(folder: str | Path) -> tuple[GPT2Config, dict[str, torch.Tensor]]:
    """The config and fp32 weights (our names) of a checkpoint folder: ours, or a Hugging Face
    GPT-2 (config.json + model.safetensors). FileNotFoundError if it is not one."""
    folder = Path(folder)
    config_path, weights = folder / "config.json", folder / "model.safetensors"
    if not config_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{folder} is not a checkpoint folder "
                                "(config.json and model.safetensors expected)")
    try:
        cfg = GPT2Config.from_dict(json.loads(config_path.read_text()))
    except ValueError as err:  # JSONDecodeError is one too
        raise ModelSpecError(f"{config_path}: {err}") from None
    sd = {k: v.float() for k, v in from_hf_state_dict(load_file(str(weights))).items()}
    return cfg, sd


def load_pretrained(folder: str | Path, **overrides) -> GPT2Model:
    """Load a checkpoint folder (see read_checkpoint).

    overrides replace config fields (e.g. attention="bidirectional") before building.
    """
    cfg, sd = read_checkpoint(folder)
    cfg = replace(cfg, **overrides)
    with torch.device("meta"):  # no memory, no init (torch's own took ~0.6 s for 124M, CPU)
        model = GPT2Model(cfg, init_weights=False)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise ModelSpecError(f"{folder}: weights do not fit the config "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()


def random_model(preset: str, seed: int = 0, **overrides) -> GPT2Model:
    """A preset with seeded random weights: the same (preset, seed) gives the same model."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    torch.manual_seed(seed)
    return GPT2Model(replace(PRESETS[preset], **overrides)).eval()
