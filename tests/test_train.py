"""Training: losses against hand-written references, schedule, batch plans, model init,
CPU reproducibility, resumption after an interruption and after a real kill, export."""

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
from pipeline.model.gpt2 import PRESETS, GPT2Model, load_pretrained
from pipeline.train.loop import (
    TokenTable,
    TrainConfig,
    TrainError,
    build_model,
    cosent_loss,
    distill_loss,
    embed_for_training,
    export_checkpoint,
    lr_at,
    merge_shards,
    mnrl_loss,
    plan_epoch,
    read_texts,
    train,
)

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------
# Losses, written out element by element in plain Python


def cos(u, v):
    return sum(a * b for a, b in zip(u, v, strict=True)) / math.sqrt(sum(a * a for a in u) *
                                                       sum(b * b for b in v))


def vectors(seed, n=6, d=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(
        n, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(3))
def test_mnrl_matches_reference(seed):
    a, b = vectors(seed)
    A, B = a.tolist(), b.tolist()
    ref = 0.0
    for i in range(len(A)):
        logits = [20.0 * cos(A[i], B[j]) for j in range(len(B))]
        ref += -logits[i] + math.log(sum(math.exp(x) for x in logits))
    ref /= len(A)
    assert float(mnrl_loss(a, b, scale=20.0)) == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_cosent_matches_reference(seed):
    a, b = vectors(seed)
    scores = torch.tensor([4.0, 2.5, 2.5, 0.0, 5.0, 1.0], dtype=torch.float64)
    A, B, S = a.tolist(), b.tolist(), scores.tolist()
    c = [cos(x, y) for x, y in zip(A, B, strict=True)]
    total = 1.0  # the exp(0) term
    for i in range(6):
        for j in range(6):
            if S[i] > S[j]:  # pair i should be more similar than pair j
                total += math.exp(20.0 * (c[j] - c[i]))
    ref = math.log(total)
    assert float(cosent_loss(a, b, scores, scale=20.0)) == pytest.approx(ref, rel=1e-9)


def test_cosent_rewards_the_right_order():
    scores = torch.tensor([5.0, 0.0])
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    right = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # similar pair similar, other not
    wrong = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert cosent_loss(a, right, scores) < 1e-6 < cosent_loss(a, wrong, scores)


def test_distill_losses_match_reference():
    s, t = vectors(7)
    S, T = s.tolist(), t.tolist()
    ref_cos = sum(1 - cos(x, y) for x, y in zip(S, T, strict=True)) / len(S)
    ref_mse = sum((x - y) ** 2 for u, v in zip(S, T, strict=True)
                  for x, y in zip(u, v, strict=True)) / (6 * 5)
    assert float(distill_loss(s, t, "cosine")) == pytest.approx(ref_cos, rel=1e-9)
    assert float(distill_loss(s, t, "mse")) == pytest.approx(ref_mse, rel=1e-9)
    with pytest.raises(ValueError):
        distill_loss(s, t, "kl")


def test_lr_schedule():
    lrs = [lr_at(s, 100, 1e-3, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(x < y for x, y in zip(lrs[:9], lrs[1:10], strict=True))  # warm-up rises
    assert all(x >= y for x, y in zip(lrs[10:-1], lrs[11:], strict=True))  # cosine falls
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)  # down to min_ratio * peak
    assert lr_at(0, 10, 1.0, 0) == pytest.approx(1.0)  # no warm-up


# ---------------------------------------------------------------------------------------------
# Batch plans and token tables


@pytest.mark.parametrize("n, batch", [(1000, 32), (100, 7), (5, 8), (64, 64)])
def test_plan_epoch(n, batch):
    rng = np.random.default_rng(n)
    lengths = rng.integers(1, 200, size=n)
    plan = plan_epoch(lengths, batch, seed=3, stream=0, epoch=0)
    flat = np.concatenate(plan)
    assert len(set(flat.tolist())) == len(flat)  # nothing twice
    if n >= batch:
        assert all(len(b) == batch for b in plan) and len(plan) == n // batch
    else:
        assert len(plan) == 1 and len(plan[0]) == n
    again = plan_epoch(lengths, batch, seed=3, stream=0, epoch=0)
    assert all(np.array_equal(x, y) for x, y in zip(plan, again, strict=True))
    if n > 2 * batch:
        other = plan_epoch(lengths, batch, seed=3, stream=0, epoch=1)
        assert not all(np.array_equal(x, y) for x, y in zip(plan, other, strict=True))
        # Length-sorted chunks: batches are much more uniform than random ones.
        spread = np.mean([lengths[b].max() - lengths[b].min() for b in plan])
        assert spread < 0.5 * np.ptp(lengths)


def test_token_table():
    table = TokenTable.build([[1, 2, 3], [], [4, 5, 6, 7, 8]], max_tokens=4)
    assert table.lengths.tolist() == [3, 1, 4]
    assert [r.tolist() for r in table.rows([2, 0])] == [[4, 5, 6, 7], [1, 2, 3]]


def test_read_texts(tmp_path):
    import lzma

    (tmp_path / "a.txt").write_text("one\n\n  two  \n")
    with lzma.open(tmp_path / "b.txt.xz", "wt") as fh:
        fh.write("three\nfour\n")
    assert read_texts(tmp_path / "a.txt") == ["one", "two"]
    assert read_texts(tmp_path / "b.txt.xz") == ["three", "four"]


# ---------------------------------------------------------------------------------------------
# Starting points


def test_build_model_from_preset_and_checkpoints(tmp_path):
    m = build_model("gpt2-tiny", seed=1, attention="bidirectional", projection_dim=16)
    assert m.config.attention == "bidirectional" and m.config.output_dim == 16
    assert torch.equal(build_model("gpt2-tiny", seed=1).wte.weight,
                       build_model("gpt2-tiny", seed=1).wte.weight)

    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128,
                                     vocab_size=50257)
    torch.manual_seed(0)
    transformers.GPT2Model(hf_cfg).save_pretrained(tmp_path / "hf")
    # A Hugging Face folder, with a new projection head and a shorter context.
    m = build_model(str(tmp_path / "hf"), attention="bidirectional", projection_dim=8,
                    n_positions=64)
    ref = load_pretrained(tmp_path / "hf")
    assert torch.equal(m.h[1].attn.c_attn.weight, ref.h[1].attn.c_attn.weight)
    assert torch.equal(m.wpe.weight, ref.wpe.weight[:64])
    assert m.proj is not None and m.config.n_positions == 64
    with pytest.raises(TrainError, match="exceeds"):
        build_model(str(tmp_path / "hf"), n_positions=256)
    with pytest.raises(TrainError, match="neither a preset"):
        build_model(str(tmp_path / "nothing"))


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
@pytest.mark.parametrize("pooling", ["mean", "weighted-mean", "last"])
@pytest.mark.parametrize("padded", [False, True])
def test_training_forward_equals_embed(attention, pooling, padded):
    model = build_model("gpt2-tiny", seed=2, attention=attention, pooling=pooling,
                        projection_dim=8)
    from pipeline.embed.encoder import pad_batch

    rows = [[464, 3797, 318, 11029, 13], [40, 588, 22], [1, 2, 3, 4, 5]]
    ids, mask = pad_batch(rows if padded else [r[:3] for r in rows])
    expected = model.embed(ids, mask, normalize=False)
    torch.testing.assert_close(embed_for_training(model, ids, mask), expected)


# ---------------------------------------------------------------------------------------------
# Runs: reproducibility and resumption (tiny model, CPU)

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
                         (["--steps", "3", "--attention", "sideways"], "unknown attention")]:
        result = runner.invoke(app, ["train", "--out", str(data / "bad"), "--pairs",
                                     str(data / "pairs.tsv"), *bad, "--device", "cpu"])
        assert result.exit_code == 1 and message in result.output, result.output
        assert "Traceback" not in result.output


def test_export_shards_and_merge(tmp_path):
    torch.manual_seed(0)
    model = GPT2Model(replace(PRESETS["gpt2-tiny"], projection_dim=8)).eval()
    from pipeline.model.gpt2 import save_checkpoint

    save_checkpoint(model, tmp_path / "src")
    files = export_checkpoint(tmp_path / "src", tmp_path / "sharded", "float16",
                              shard_bytes=1_000_000)
    # The 3.2 MB token embedding is cut into pieces: no file passes the limit (+ its header).
    assert len(files) > 3 and all(f.stat().st_size < 1_010_000 for f in files)
    merge_shards(tmp_path / "sharded", tmp_path / "merged")
    merged = load_pretrained(tmp_path / "merged")
    ids = torch.tensor([[464, 3797, 318, 11029]])
    mask = torch.ones_like(ids)
    np.testing.assert_allclose(merged.embed(ids, mask).detach(), model.embed(ids, mask).detach(),
                               atol=2e-3)


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
    with pytest.raises(ValueError, match="diverged"):
        train(tiny_config(data, "diverged", steps=30), progress=False)
