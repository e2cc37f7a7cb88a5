"""Moving a trained model: dtype copies, shards and their merge, as functions and as
`pipeline export-model` / `pipeline merge-model`."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import PRESETS
from pipeline.model.checkpoint import load_pretrained, save_checkpoint
from pipeline.model.gpt2 import GPT2Model
from pipeline.train.export import export_checkpoint, merge_shards

IDS = torch.tensor([[464, 3797, 318, 11029]])


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny random model saved as a run would leave it (with a log beside it)."""
    torch.manual_seed(0)
    model = GPT2Model(replace(PRESETS["gpt2-tiny"], projection_dim=8)).eval()
    save_checkpoint(model, tmp_path / "src")
    (tmp_path / "src" / "train_log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    return model, tmp_path / "src"


def same_embeddings(a: GPT2Model, b: GPT2Model, atol: float) -> None:
    mask = torch.ones_like(IDS)
    np.testing.assert_allclose(a.embed(IDS, mask).detach(), b.embed(IDS, mask).detach(),
                               atol=atol)


def test_export_shards_and_merge(tmp_path, checkpoint):
    model, src = checkpoint
    files = export_checkpoint(src, tmp_path / "sharded", "float16", shard_bytes=1_000_000)
    # The 3.2 MB token embedding is cut into pieces: no file passes the limit (+ its header).
    assert len(files) > 3 and all(f.stat().st_size < 1_010_000 for f in files)
    merge_shards(tmp_path / "sharded", tmp_path / "merged")
    same_embeddings(load_pretrained(tmp_path / "merged"), model, atol=2e-3)


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def test_cli_export_model(tmp_path, checkpoint):
    model, src = checkpoint
    dst = tmp_path / "fp16"
    result = run("export-model", str(src), str(dst))
    assert result.exit_code == 0, result.output
    assert result.output.split() == [str(dst / "model.safetensors")]
    assert all(t.dtype == torch.float16 for t in load_file(str(dst / "model.safetensors")).values())
    config = json.loads((dst / "config.json").read_text())
    assert config["torch_dtype"] == "float16" and "weights_sha256" in config
    assert (dst / "train_log.jsonl").read_text() == (src / "train_log.jsonl").read_text()
    same_embeddings(load_pretrained(dst), model, atol=2e-3)

    result = run("export-model", str(src), str(tmp_path / "bf16"), "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_cli_export_sharded_then_merge_model(tmp_path, checkpoint):
    model, src = checkpoint
    sharded, merged = tmp_path / "sharded", tmp_path / "merged"
    result = run("export-model", str(src), str(sharded), "--dtype", "float32", "--shard-mb", "1")
    assert result.exit_code == 0, result.output
    files = result.output.split()
    assert len(files) > 3 and (sharded / "model.safetensors.index.json").is_file()
    assert not (sharded / "model.safetensors").exists()

    result = run("merge-model", str(sharded), str(merged))
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(merged)
    assert (merged / "train_log.jsonl").is_file()
    same_embeddings(load_pretrained(merged), model, atol=1e-6)  # float32: exact


def test_cli_export_and_merge_user_errors(tmp_path, checkpoint):
    _, src = checkpoint
    for args, message in [
        (["export-model", str(tmp_path / "nothing"), str(tmp_path / "x")], "not a checkpoint"),
        (["export-model", str(src), str(tmp_path / "x"), "--dtype", "int8"], "unknown --dtype"),
        (["export-model", str(src), str(tmp_path / "x"), "--shard-mb", "0"], "positive"),
        (["merge-model", str(src), str(tmp_path / "x")], "not a sharded checkpoint"),
    ]:
        result = run(*args)
        assert result.exit_code == 1 and message in result.output, result.output
        assert "Traceback" not in result.output
