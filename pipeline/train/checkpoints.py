"""The run folder: created or checked against the run it already holds, its last checkpoint
(weights, optimizer, step) written so that a kill at any moment leaves one complete, and read
back to resume. Nothing read back is unpickled: the weights are safetensors, state.pt is
loaded with weights_only=True."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from pipeline.errors import TrainError
from pipeline.model.checkpoint import from_hf_state_dict, save_checkpoint
from pipeline.model.gpt2 import GPT2Model
from pipeline.train.config import TrainConfig

LOG = "train_log.jsonl"
# What a run writes beside its model: copied along when the model is exported.
RUN_RECORDS = (LOG, "summary.json", "train_config.json")


def save_last(folder: Path, model: GPT2Model, optimizer: torch.optim.Optimizer, step: int,
              best: float | None) -> None:
    """Weights + optimizer + step, written to a temp folder and renamed into place."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(model, tmp)
    # Plain types only (tensors, numbers, strings, lists, dicts): read_state loads it with
    # weights_only=True.
    torch.save({"optimizer": optimizer.state_dict(), "step": int(step),
                "best": None if best is None else float(best)}, tmp / "state.pt")
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def find_last(out: Path) -> Path | None:
    """The latest complete checkpoint (a kill between the two renames leaves it as .old)."""
    for name in ("last", "last.old"):
        if (out / name / "state.pt").is_file():
            return out / name
    return None


def read_state(path: Path, device: torch.device) -> dict:
    """The optimizer state, step and best score saved beside a checkpoint's weights.

    The file lies in a folder the user gave: weights_only=True, so that it can hold tensors
    and plain values only and a crafted one cannot run code while it is unpickled.
    """
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError):
        # Objects other than tensors and plain values, or a damaged or foreign file.
        raise TrainError(f"{path} is not a checkpoint that can be resumed safely (only "
                         "tensors and plain values are loaded, so that a crafted file cannot "
                         "run code): use --restart or another --out") from None
    if (not isinstance(state, dict) or not isinstance(state.get("optimizer"), dict)
            or type(state.get("step")) is not int
            or not isinstance(state.get("best"), float | None)):
        raise TrainError(f"{path} is not a checkpoint of `pipeline train` (it lacks the "
                         "optimizer state, step or best score); use --restart or another --out")
    return state


def one_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def load_last(folder: Path, model: GPT2Model, optimizer: torch.optim.Optimizer,
              device: torch.device) -> tuple[int, float | None]:
    """Put a checkpoint's weights and optimizer state back; returns (step, best dev score)."""
    state = read_state(folder / "state.pt", device)
    weights = folder / "model.safetensors"
    try:
        model.load_state_dict(from_hf_state_dict(load_file(str(weights))))
    except (OSError, SafetensorError, RuntimeError) as err:  # missing, damaged, other model
        raise TrainError(f"{weights} cannot be resumed from ({one_line(err)}); use --restart "
                         "or another --out") from None
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError, TypeError) as err:  # saved for other parameters
        raise TrainError(f"{folder / 'state.pt'}: the optimizer state does not fit this model "
                         f"({one_line(err)}); use --restart or another --out") from None
    return state["step"], state["best"]


def trim_log(path: Path, upto_step: int) -> None:
    """Drop the log lines after a step: a killed run logged steps that its resumption redoes."""
    lines = []
    if path.is_file():
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    path.write_text("".join(json.dumps(rec) + "\n" for rec in lines
                            if rec.get("step", 0) <= upto_step))


def prepare_out(cfg: TrainConfig, restart: bool) -> Path | None:
    """Create the output folder; return the checkpoint to resume from, if any."""
    out = Path(cfg.out)
    config_file = out / "train_config.json"
    last = find_last(out)
    if restart and out.exists():
        for name in ("last", "last.old", "last.tmp", *RUN_RECORDS, "model.safetensors",
                     "config.json"):
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        last = None
    if last is not None and config_file.is_file():
        saved = TrainConfig.from_json(json.loads(config_file.read_text()))
        diff = cfg.resume_conflicts(saved)
        if diff:
            raise TrainError(f"{out} holds a run with other settings ({', '.join(diff)}); "
                             "use another --out or --restart")
    out.mkdir(parents=True, exist_ok=True)
    config_file.write_text(json.dumps(cfg.to_json(), indent=2) + "\n")
    return last
