"""What `--model` names, and loading it: the shipped default, `random:PRESET[:SEED]`, or a
checkpoint folder (ours or Hugging Face's); its width without its weights; the sha256 that
identifies the weights in every manifest, computed from the weights loaded.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

from pipeline.config import PRESETS
from pipeline.errors import ModelSpecError
from pipeline.hashing import file_sha256
from pipeline.model.checkpoint import load_pretrained, random_model
from pipeline.model.gpt2 import GPT2Model

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
        return load_random(spec)
    return load_checkpoint(spec)


def load_random(spec: str) -> tuple[GPT2Model, str, str]:
    """`random:PRESET[:SEED]` (seed 0 by default): seeded random weights of a preset."""
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


def load_checkpoint(spec: str) -> tuple[GPT2Model, str, str]:
    """A checkpoint folder, with the sha256 of its weights as they are now (`checkpoint_sha256`)."""
    folder = Path(spec)
    if not folder.is_dir():
        raise ModelSpecError(f"unknown model {spec!r}: expected a checkpoint folder or "
                             "random:PRESET (" + ", ".join(PRESETS) + ")")
    try:
        model = load_pretrained(folder)
    except (FileNotFoundError, ValueError, json.JSONDecodeError, OSError) as err:
        raise ModelSpecError(str(err).splitlines()[0]) from None
    config = json.loads((folder / "config.json").read_text())
    return model, str(folder), checkpoint_sha256(folder, config, model)


def checkpoint_sha256(folder: Path, config: dict, model: GPT2Model) -> str:
    """The sha256 that identifies a checkpoint's weights, computed, never read: config.json's
    `weights_sha256` says what was saved, and other weights put beside it must not pass as
    that model. Where one is recorded (our checkpoints), the hash of model.safetensors: the
    value recorded, so indexes made before keep their identity, and 3x cheaper than
    `state_sha256` (24 vs 83 ms for the default model). Elsewhere (Hugging Face folders),
    `state_sha256`, as before."""
    if config.get("weights_sha256"):
        return file_sha256(folder / "model.safetensors")
    return state_sha256(model)
