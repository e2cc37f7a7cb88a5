"""Checkpoint folders: ours round-trip and are Hugging Face GPT-2 folders; Hugging Face's
GPT2Model and GPT2LMHeadModel folders load; folders that are not checkpoints say so."""

import json

import pytest
import torch

from pipeline.embed.encoder import load_model, pad_batch
from pipeline.errors import ModelSpecError
from pipeline.model.checkpoint import (
    from_hf_state_dict,
    load_pretrained,
    random_model,
    read_checkpoint,
    save_checkpoint,
    to_hf_state_dict,
)

# Rows of different lengths, so the padded positions are exercised too.
IDS, MASK = pad_batch([[464, 3797, 318, 11029, 13], [15496, 995], [10, 20, 30]])


def real_states(model, hf=None):
    """Last hidden states of the real tokens: ours, or a transformers model's."""
    with torch.no_grad():
        if hf is None:
            return model(IDS, MASK)[MASK.bool()]
        return hf(input_ids=IDS, attention_mask=MASK).last_hidden_state[MASK.bool()]


def test_hf_names_round_trip():
    model = random_model("gpt2-tiny", seed=4, projection_dim=8)
    back = from_hf_state_dict(to_hf_state_dict(model))
    ours = model.state_dict()
    assert back.keys() == ours.keys()
    for name, t in ours.items():
        torch.testing.assert_close(back[name], t, rtol=0, atol=0, msg=name)


def test_checkpoint_round_trip(tmp_path):
    model = random_model("gpt2-tiny", seed=7, pooling="weighted-mean", projection_dim=16)
    save_checkpoint(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["pooling"] == "weighted-mean" and len(config["weights_sha256"]) == 64
    loaded = load_pretrained(tmp_path)
    assert loaded.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed(IDS, MASK), model.embed(IDS, MASK))
    _, _, sha = load_model(str(tmp_path))
    assert sha == config["weights_sha256"]


def test_half_precision_checkpoint_reads_as_float32(tmp_path):
    model = random_model("gpt2-tiny", seed=8)
    save_checkpoint(model, tmp_path, dtype=torch.float16, extra={"step": 3})
    assert json.loads((tmp_path / "config.json").read_text())["step"] == 3
    cfg, sd = read_checkpoint(tmp_path)
    assert cfg == model.config and {t.dtype for t in sd.values()} == {torch.float32}
    torch.testing.assert_close(sd["wte.weight"], model.wte.weight.detach(), atol=1e-3, rtol=1e-3)


def test_random_model_is_seeded():
    a, b, c = (random_model("gpt2-tiny", seed=s) for s in (1, 1, 2))
    assert torch.equal(a.wte.weight, b.wte.weight) and not torch.equal(a.wte.weight, c.wte.weight)
    with pytest.raises(ValueError, match="unknown preset"):
        random_model("gpt5")


def test_our_checkpoint_is_a_transformers_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = random_model("gpt2-tiny", seed=9)
    save_checkpoint(model, tmp_path)
    hf = transformers.GPT2Model.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(real_states(model), real_states(model, hf), atol=1e-5, rtol=1e-5)


def test_lm_head_checkpoint_loads(tmp_path):
    """GPT2LMHeadModel folders (prefix 'transformer.', tied lm_head) load too."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64)
    lm = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # LayerNorms and biases start at 1/0: moved so their mapping is tested
        for name, p in lm.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    lm.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_pretrained(tmp_path)
    torch.testing.assert_close(real_states(ours), real_states(ours, lm.transformer),
                               atol=1e-5, rtol=1e-5)


def test_folders_that_are_not_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        read_checkpoint(tmp_path)
    save_checkpoint(random_model("gpt2-tiny"), tmp_path)
    config = tmp_path / "config.json"
    good = config.read_text()
    config.write_text("{not json")
    with pytest.raises(ModelSpecError, match="config.json"):
        read_checkpoint(tmp_path)
    config.write_text(good.replace('"n_layer": 2', '"n_layer": 3'))  # a layer without weights
    with pytest.raises(ModelSpecError, match="do not fit the config"):
        load_pretrained(tmp_path)
