"""Training runs (tiny model, CPU): reproducibility, resumption after an interruption and
after a real kill, skipped non-finite updates, and the `pipeline train` command."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from test_evaluate import PAIRS, write_pairs  # tests/ is on sys.path under pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import TrainError
from pipeline.model.checkpoint import load_pretrained
from pipeline.train.config import TrainConfig
from pipeline.train.loop import train

ROOT = Path(__file__).resolve().parent.parent

SENTENCES = [f"{who} {does} {what}." for who in ("A man", "The woman", "A child", "Two dogs")
             for does in ("is eating", "likes", "looks at", "carries")
             for what in ("an apple", "the red ball", "a book about ships", "some bread")]


@pytest.fixture
def data(tmp_path):
    (tmp_path / "texts.txt").write_text("\n".join(SENTENCES) + "\n")
    write_pairs(tmp_path / "pairs.tsv", PAIRS * 3)
    write_pairs(tmp_path / "dev.tsv", PAIRS)
    return tmp_path


def tiny_config(data, out="run", **kw) -> TrainConfig:
    cfg = TrainConfig(out=str(data / out), init="gpt2-tiny", attention="bidirectional",
                      distill_data=(str(data / "texts.txt"),), teacher="random:gpt2-tiny:7",
                      pairs=str(data / "pairs.tsv"), mnrl_weight=0.5, dev=str(data / "dev.tsv"),
                      steps=12, batch_size=8, pair_batch_size=6, max_tokens=32, lr=3e-3,
                      eval_every=4, save_every=4, log_every=1, device="cpu",
                      teacher_cache=str(data / "cache"))
    return replace(cfg, **kw)


def losses(out) -> list[tuple]:
    recs = [json.loads(x) for x in (Path(out) / "train_log.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("dev_spearman")) for r in recs]


def test_training_is_reproducible_on_cpu(data):
    a = tiny_config(data, "a")
    train(a, progress=False)
    train(tiny_config(data, "b"), progress=False)
    curve = losses(a.out)
    assert len(curve) == 12 + 3  # a line per step, a dev line per 4 steps
    assert curve == losses(data / "b")  # same seed, same data: the same numbers
    first, last = curve[0][1], [c[1] for c in curve if c[1] is not None][-1]
    assert last < first  # it learns
    train(tiny_config(data, "c", seed=1), progress=False)
    assert losses(data / "c") != curve
    # The best checkpoint is a loadable model folder with the objective's projection head.
    best = load_pretrained(a.out)
    assert best.config.attention == "bidirectional" and best.config.projection_dim == 32
    summary = json.loads((Path(a.out) / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["best_dev_spearman"] == max(
        c[2] for c in curve if c[2] is not None)


def test_interrupted_run_resumes_to_the_same_curve(data):
    train(tiny_config(data, "whole"), progress=False)
    cfg = tiny_config(data, "broken")
    # Stops after step 6 without a checkpoint there, as a kill would: the last one is step 4.
    assert train(cfg, progress=False, stop_after=6) == {"stopped_at": 6}
    assert max(c[0] for c in losses(cfg.out)) == 6
    summary = train(cfg, progress=False)
    assert summary["resumed_from"] == 4
    assert losses(cfg.out) == losses(data / "whole")


def test_resume_refuses_other_settings(data):
    cfg = tiny_config(data, "r")
    train(cfg, progress=False, stop_after=5)
    with pytest.raises(TrainError, match="lr"):
        train(replace(cfg, lr=1e-2), progress=False)
    # --restart discards it; a changed device is no reason to refuse.
    assert train(replace(cfg, lr=1e-2), restart=True, progress=False)["resumed_from"] == 0


def test_killed_process_resumes(data):
    """A real `pipeline train` process, SIGKILLed after a checkpoint, then resumed."""
    out = data / "killed"
    args = [sys.executable, "-m", "pipeline.cli", "train", "--out", str(out),
            "--init", "gpt2-tiny", "--distill-data", str(data / "texts.txt"),
            "--teacher", "random:gpt2-tiny:7", "--teacher-cache", str(data / "cache"),
            "--steps", "100000", "--batch-size", "8", "--max-tokens", "32",
            "--save-every", "5", "--log-every", "1", "--device", "cpu", "--no-progress"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    state = out / "last" / "state.pt"
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # let it run on past the checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    logged = [c[0] for c in losses(out)]
    cfg = TrainConfig.from_json(json.loads((out / "train_config.json").read_text()))
    result = train(cfg, progress=False, stop_after=3)
    checkpoint = result["stopped_at"] - 3
    assert checkpoint >= 5 and checkpoint % 5 == 0 and checkpoint <= max(logged)
    steps = [c[0] for c in losses(out)]
    assert steps == list(range(1, result["stopped_at"] + 1))  # each step once, none lost


def test_cli_train_and_user_errors(data):
    runner = CliRunner()
    out = data / "cli"
    result = runner.invoke(app, ["train", "--out", str(out), "--init", "gpt2-tiny",
                                 "--pairs", str(data / "pairs.tsv"), "--dev",
                                 str(data / "dev.tsv"), "--steps", "3", "--pair-batch-size",
                                 "4", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "best dev Spearman" in result.output
    assert (out / "model.safetensors").is_file() and (out / "last" / "state.pt").is_file()
    for bad, message in [(["--steps", "3", "--epochs", "1"], "exactly one of"),
                         (["--steps", "3", "--distill-data", "x.txt"], "needs --teacher"),
                         (["--steps", "3", "--attention", "sideways"], "unknown attention"),
                         (["--steps", "3", "--distill-data", str(data / "missing.txt"),
                           "--teacher", "random:gpt2-tiny:7"], "no such file")]:
        result = runner.invoke(app, ["train", "--out", str(data / "bad"), "--pairs",
                                     str(data / "pairs.tsv"), *bad, "--device", "cpu"])
        assert result.exit_code == 1 and message in result.output, result.output
        assert "Traceback" not in result.output


def test_non_finite_gradient_skips_the_update(data, monkeypatch):
    import pipeline.train.loop as train_module

    real = train_module.objective_loss

    def nan_at_batch_3(obj, k, *args):
        part, n_tokens = real(obj, k, *args)
        return (part * float("nan") if k == 3 else part), n_tokens

    monkeypatch.setattr(train_module, "objective_loss", nan_at_batch_3)
    cfg = tiny_config(data, "nan")
    train(cfg, progress=False)
    recs = [json.loads(x) for x in (Path(cfg.out) / "train_log.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in recs if "loss" in r}
    assert steps[3]["skipped_steps"] == 0 and steps[4]["skipped_steps"] == 1
    assert steps[12]["skipped_steps"] == 1 and math.isfinite(steps[12]["loss"])
    model = load_pretrained(cfg.out)  # the kept checkpoint has no NaN in it
    assert all(torch.isfinite(p).all() for p in model.parameters())

    # A run whose every gradient is NaN stops with a one-line reason instead of training on.
    monkeypatch.setattr(train_module, "objective_loss",
                        lambda obj, k, *a: (real(obj, k, *a)[0] * float("nan"), 1))
    with pytest.raises(TrainError, match="diverged"):
        train(tiny_config(data, "diverged", steps=30), progress=False)


class TouchOnUnpickle:
    """Unpickling this creates a file: what a crafted checkpoint could do instead."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (Path(self.path),)


def test_resume_refuses_a_checkpoint_that_would_run_code(data):
    runner = CliRunner()
    out, marker = data / "crafted", data / "pwned"
    args = ["train", "--out", str(out), "--init", "gpt2-tiny", "--pairs",
            str(data / "pairs.tsv"), "--steps", "2", "--pair-batch-size", "4", "--device",
            "cpu", "--no-progress"]
    assert runner.invoke(app, args).exit_code == 0
    state = out / "last" / "state.pt"
    torch.save({"optimizer": TouchOnUnpickle(marker), "step": 2, "best": None}, state)
    result = runner.invoke(app, args)
    assert not marker.exists()
    assert_one_error_line(result, "state.pt")
    state.write_bytes(b"not a checkpoint")  # a damaged one is refused the same way
    assert_one_error_line(runner.invoke(app, args), "state.pt")


def assert_one_error_line(result, needle):
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines


def test_teacher_cache_is_never_unpickled(data):
    from pipeline.train.objectives import teacher_targets

    cache, marker = data / "cache", data / "pwned"
    vectors = teacher_targets(SENTENCES, "random:gpt2-tiny:7", "cpu", cache)
    (cached,) = cache.glob("teacher-*.npy")
    # An object array unpickles its items; a damaged cache file is no better.
    np.save(cached, np.array([TouchOnUnpickle(marker)], dtype=object), allow_pickle=True)
    assert np.array_equal(teacher_targets(SENTENCES, "random:gpt2-tiny:7", "cpu", cache),
                          vectors)  # recomputed, as if there were no cache
    assert not marker.exists()
    cached.write_bytes(b"damaged")
    assert np.array_equal(teacher_targets(SENTENCES, "random:gpt2-tiny:7", "cpu", cache),
                          vectors)


def test_ensemble_teacher_with_relational_term_and_separate_mnrl_pairs(data):
    """Two teachers averaged, PCA'd to 16 dims for the pointwise term, the KL term on their
    full 64-dim concatenation, MNRL on a pairs file of its own: it trains, learns, and makes
    a 16-dim model; a relational-only run needs no matching width."""
    write_pairs(data / "silver.tsv", [p for p in PAIRS if p[2] == 1] * 2)
    cfg = tiny_config(data, "ens", teacher="random:gpt2-tiny:7*0.7+random:gpt2-tiny:8*0.3",
                      teacher_dim=16, relational_weight=1.0, relational_temperature=0.1,
                      pairs=None, mnrl_pairs=str(data / "silver.tsv"), steps=10)
    train(cfg, progress=False)
    curve = [c[1] for c in losses(cfg.out) if c[1] is not None]
    assert curve[-1] < curve[0]
    rec = json.loads((Path(cfg.out) / "train_log.jsonl").read_text().splitlines()[0])
    assert {"loss_distill", "loss_mnrl"} <= set(rec) and "loss_cosent" not in rec
    assert load_pretrained(cfg.out).config.projection_dim == 16
    only_kl = tiny_config(data, "kl", distill_weight=0.0, relational_weight=1.0,
                          projection_dim=8, steps=3)
    train(only_kl, progress=False)
    assert load_pretrained(only_kl.out).config.projection_dim == 8
    # A pointwise term against vectors of another width is refused, in one line.
    with pytest.raises(TrainError, match="--teacher-dim"):
        train(tiny_config(data, "bad", projection_dim=8, steps=3), progress=False)


def test_fine_tuning_a_trained_model_counts_its_start_as_a_candidate(data):
    """From a checkpoint, dev is measured before the first step: the run's model is the start
    unless a step beats it on dev. Here lr 0 leaves the weights as they were, so every step
    ties the start, and a tie does not replace it."""
    first = tiny_config(data, "first", pairs=None, mnrl_weight=0.0, steps=6)
    train(first, progress=False)
    tuned = tiny_config(data, "tuned", init=first.out, distill_data=(), teacher=None,
                        mnrl_weight=0.0, steps=4, lr=0.0, warmup=0.0)
    train(tuned, progress=False)
    dev = [c for c in losses(tuned.out) if c[2] is not None]
    assert dev[0][0] == 0  # measured at step 0
    start_score = dev[0][2]
    summary = json.loads((Path(tuned.out) / "summary.json").read_text())
    assert summary["best_dev_spearman"] == max(c[2] for c in dev) >= start_score
    best_step = max(dev, key=lambda c: c[2])[0]
    saved = json.loads((Path(tuned.out) / "config.json").read_text())
    assert saved["step"] == best_step == 0
