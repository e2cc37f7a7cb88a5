"""The model a run trains: its starting points and its training forward pass."""

import pytest
import torch

from pipeline.errors import TrainError
from pipeline.model.checkpoint import load_pretrained
from pipeline.train.model import build_model, embed_for_training


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
