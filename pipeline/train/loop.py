"""The run: set it up (or resume it), then step, log, score on dev and checkpoint until its
last step. What a run trains and writes: see the package docstring."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch
from tqdm import tqdm

from pipeline.config import PRESETS
from pipeline.embed.encoder import pick_device
from pipeline.errors import TrainError
from pipeline.model.checkpoint import save_checkpoint
from pipeline.model.gpt2 import GPT2Model
from pipeline.text.tokenizer import Tokenizer
from pipeline.train.checkpoints import LOG, load_last, prepare_out, save_last, trim_log
from pipeline.train.config import TrainConfig
from pipeline.train.dev import Autocast, DevSet
from pipeline.train.losses import lr_at
from pipeline.train.model import build_model, context_length, make_optimizer
from pipeline.train.objectives import Objective, load_objectives, objective_loss

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_SKIPS = 20  # non-finite gradients in a row that mean a diverged run
TRAINED_BY = "pipeline train"


@dataclass
class Run:
    """A run once set up: what it trains on what, and where it stands."""

    cfg: TrainConfig
    device: torch.device
    model: GPT2Model
    optimizer: torch.optim.Optimizer
    objectives: list[Objective]
    dev: DevSet | None
    autocast: Autocast
    steps: int
    start: int = 0  # the step it resumes at
    best: float | None = None  # the best dev Spearman so far
    skipped: int = 0  # updates skipped for a non-finite gradient
    consecutive_skips: int = 0
    started_at: float = field(default_factory=time.perf_counter)

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def warmup(self) -> int:
        return int(self.cfg.warmup * self.steps)


@dataclass
class Window:
    """What one log line averages: the steps since the previous line."""

    loss: dict[str, torch.Tensor]  # summed on the device: no sync per step
    steps: int = 0
    tokens: int = 0
    grad_norm: float = 0.0  # summed over the steps that were not skipped
    skips: int = 0
    start: float = field(default_factory=time.perf_counter)

    @classmethod
    def empty(cls, run: Run) -> Window:
        return cls({o.name: torch.zeros((), device=run.device) for o in run.objectives})


def train(cfg: TrainConfig, restart: bool = False, progress: bool = True,
          stop_after: int | None = None) -> dict:
    """Run (or resume) one training run; returns its summary.

    stop_after ends the process's work after that many optimizer steps without a final
    checkpoint, as a kill would (used by the tests to check resumption).
    """
    run = set_up(cfg, restart)
    bar = tqdm(total=run.steps, initial=run.start, desc="train", unit="step", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    window = Window.empty(run)
    run.started_at = time.perf_counter()
    last_loss = float("nan")
    with open(run.out / LOG, "a") as log_file, bar:
        if run.start == 0 and run.dev is not None and cfg.init not in PRESETS:
            # A trained start is a candidate too: a fine-tuning that never beats it on dev
            # leaves it as the run's model instead of a worse one.
            evaluate(run, 0, log_file)
        for step in range(run.start, run.steps):
            lr = lr_at(step, run.steps, cfg.lr, run.warmup, cfg.min_lr_ratio)
            train_step(run, step, lr, window)
            done = step + 1
            if done % cfg.log_every == 0 or done == run.steps:
                last_loss = write_log_line(run, window, done, lr, log_file)
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
                window = Window.empty(run)
            if run.dev is not None and (done % cfg.eval_every == 0 or done == run.steps):
                score = evaluate(run, done, log_file)
                bar.set_postfix(loss=f"{last_loss:.4f}", dev=f"{score:.4f}")
                window.start = time.perf_counter()  # tokens/s counts training time only
            if done % cfg.save_every == 0 or done == run.steps:
                save(run, done)
            bar.update(1)
            if stop_after is not None and done - run.start >= stop_after and done < run.steps:
                return {"stopped_at": done}
    return write_summary(run)


def set_up(cfg: TrainConfig, restart: bool) -> Run:
    """Check the options, load the data and the model, and resume from the last checkpoint."""
    cfg.check()
    device = pick_device(cfg.device)
    resume_from = prepare_out(cfg, restart)
    tokenizer = Tokenizer.load()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    max_tokens = cfg.max_tokens or context_length(cfg)
    if max_tokens > context_length(cfg):
        raise TrainError(f"--max-tokens {max_tokens} exceeds the model's context "
                         f"{context_length(cfg)}")
    objectives = load_objectives(cfg, tokenizer, device, max_tokens)
    model = model_for(cfg, objectives)
    model.to(device).train()
    run = Run(cfg, device, model, make_optimizer(model, cfg, device), objectives,
              DevSet.load(cfg.dev, tokenizer, max_tokens) if cfg.dev else None,
              autocast_for(device, cfg.bf16), total_steps(cfg, objectives))
    if resume_from is not None:
        run.start, run.best = load_last(resume_from, model, run.optimizer, device)
        log.info("resuming %s from step %d", run.out, run.start)
    trim_log(run.out / LOG, run.start)
    log.info("training %s (%d parameters) on %s for %d steps: %s", cfg.init,
             model.num_parameters(), device, run.steps,
             ", ".join(f"{o.name}x{o.weight:g}" for o in objectives))
    return run


def model_for(cfg: TrainConfig, objectives: list[Objective]) -> GPT2Model:
    """The model to train; distillation sizes its projection head to the teacher's vectors."""
    teacher_dim = next((o.targets.shape[1] for o in objectives if o.name == "distill"), None)
    projection = cfg.projection_dim if cfg.projection_dim is not None else teacher_dim
    model = build_model(cfg.init, cfg.seed, attention=cfg.attention, pooling=cfg.pooling,
                        n_positions=cfg.n_positions, projection_dim=projection)
    # The pointwise term compares vectors; the relational one only cosines (any widths).
    if (teacher_dim is not None and cfg.distill_weight > 0
            and model.config.output_dim != teacher_dim):
        raise TrainError(f"the model's output has {model.config.output_dim} dims, the "
                         f"teacher's {teacher_dim}: set --projection-dim or --teacher-dim")
    return model


def autocast_for(device: torch.device, bf16: bool) -> Autocast:
    if device.type == "cuda" and bf16:
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def total_steps(cfg: TrainConfig, objectives: list[Objective]) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * objectives[0].stream.per_epoch / cfg.accum))


def train_step(run: Run, step: int, lr: float, window: Window) -> None:
    """One optimizer step over cfg.accum micro-batches, each drawing every objective's batch."""
    cfg = run.cfg
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    for micro in range(cfg.accum):
        k = step * cfg.accum + micro  # the batch index: a pure function of the step
        loss = torch.zeros((), device=run.device)
        for obj in run.objectives:
            with run.autocast():
                part, n_tokens = objective_loss(obj, k, run.model, cfg, run.device)
            loss = loss + obj.weight * part
            window.loss[obj.name] += part.detach() / cfg.accum
            window.tokens += n_tokens
        (loss / cfg.accum).backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip))
    if math.isfinite(grad_norm):
        run.optimizer.step()
        window.grad_norm += grad_norm
        run.consecutive_skips = 0
    else:
        # A non-finite gradient would turn every weight into NaN for good: skip the update,
        # and stop if it keeps happening (the run has diverged).
        run.skipped += 1
        window.skips += 1
        run.consecutive_skips += 1
        log.warning("step %d: gradient norm %s, update skipped", step + 1, grad_norm)
        if run.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
            raise TrainError(
                f"training diverged: {run.consecutive_skips} steps in a row with non-finite "
                f"gradients (step {step + 1}, lr {lr:.2e}); try a lower --lr")
    run.optimizer.zero_grad(set_to_none=True)
    window.steps += 1


def append_record(log_file: TextIO, rec: dict) -> None:
    log_file.write(json.dumps(rec) + "\n")
    log_file.flush()  # a kill loses no line of a finished step


def write_log_line(run: Run, window: Window, done: int, lr: float, log_file: TextIO) -> float:
    """Log the window's means after step `done`; returns its weighted loss."""
    losses = {name: float(v) / window.steps for name, v in window.loss.items()}
    elapsed = time.perf_counter() - window.start
    rec = {"step": done, "loss": sum(o.weight * losses[o.name] for o in run.objectives),
           **{f"loss_{k}": v for k, v in losses.items()}, "lr": lr,
           "grad_norm": round(window.grad_norm / max(window.steps - window.skips, 1), 4),
           "skipped_steps": run.skipped,
           "tokens_per_s": round(window.tokens / max(elapsed, 1e-9), 1),
           "elapsed_s": round(time.perf_counter() - run.started_at, 2)}
    append_record(log_file, rec)
    return rec["loss"]


def evaluate(run: Run, done: int, log_file: TextIO) -> float:
    """Dev Spearman after step `done`; a new best becomes the run's model."""
    score = run.dev.spearman(run.model, run.device, run.autocast)
    append_record(log_file, {"step": done, "dev_spearman": score})
    if run.best is None or score > run.best:
        run.best = score
        save_checkpoint(run.model, run.out, extra={"trained_by": TRAINED_BY, "step": done,
                                                   "dev_spearman": score})
    return score


def save(run: Run, done: int) -> None:
    """The checkpoint to resume from; without a dev set the latest model is the run's model."""
    if run.dev is None:
        save_checkpoint(run.model, run.out, extra={"trained_by": TRAINED_BY, "step": done})
    save_last(run.out / "last", run.model, run.optimizer, done, run.best)


def write_summary(run: Run) -> dict:
    summary = {"steps": run.steps, "resumed_from": run.start, "best_dev_spearman": run.best,
               "parameters": run.model.num_parameters(), "device": device_name(run.device),
               "seconds_this_process": round(time.perf_counter() - run.started_at, 1)}
    (run.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"
