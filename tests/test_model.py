"""The encoder against Hugging Face transformers' GPT-2, pooling, model specs and the GPU
path's packed layout, on the CPU. Checkpoint folders: test_checkpoint.py."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.config import ATTENTIONS, POOLINGS, GPT2Config
from pipeline.embed.encoder import ModelSpecError, load_model, pad_batch
from pipeline.errors import ChildFailed
from pipeline.model.checkpoint import load_pretrained, random_model, save_checkpoint
from pipeline.model.gpt2 import GPT2Model, pool

transformers = pytest.importorskip("transformers")


def random_token_lists(seed, n=6, vocab=50257, max_len=40):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len, (n,), generator=g).tolist()
    lengths[0] = max_len  # one row without padding
    return [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lengths]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A random transformers.GPT2Model saved the standard way (config.json + model.safetensors)."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=3, n_head=4, n_embd=64, n_positions=96,
                                  resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    hf = transformers.GPT2Model(cfg).eval()
    # Random init leaves LayerNorms at 1/0 and biases at 0; perturb them so they are tested.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(folder, safe_serialization=True)
    return folder, hf


def test_last_hidden_states_match_transformers(hf_folder):
    folder, hf = hf_folder
    ours = load_pretrained(folder)
    tokens = random_token_lists(1, n=5, max_len=50)
    ids, mask = pad_batch(tokens)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    real = mask.bool()
    assert got.shape == ref.shape
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
@pytest.mark.parametrize("pooling", POOLINGS)
def test_pooling_on_padded_batch_equals_alone(pooling, attention):
    model = random_model("gpt2-tiny", seed=3, attention=attention, pooling=pooling)
    tokens = random_token_lists(4, n=7, max_len=30)
    ids, mask = pad_batch(tokens)
    with torch.no_grad():
        batched = model.embed(ids, mask)
        for row, toks in enumerate(tokens):
            alone = model.embed(*pad_batch([toks]))
            torch.testing.assert_close(batched[row], alone[0], atol=1e-5, rtol=1e-5)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(len(tokens)), atol=1e-5)


def test_pooling_definitions():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]]])  # last position is a pad
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(pool(hidden, mask, "mean"), torch.tensor([[2.0, 1.0]]))
    # weights 1 and 2 over the two real tokens
    torch.testing.assert_close(pool(hidden, mask, "weighted-mean"),
                               torch.tensor([[7 / 3, 4 / 3]]))
    torch.testing.assert_close(pool(hidden, mask, "last"), torch.tensor([[3.0, 2.0]]))
    torch.testing.assert_close(pool(hidden, mask, "max"), torch.tensor([[3.0, 2.0]]))
    torch.testing.assert_close(pool(hidden, mask, "first"), torch.tensor([[1.0, 0.0]]))


def test_bidirectional_differs_from_causal_and_sees_the_future():
    causal = random_model("gpt2-tiny", seed=5)
    bidir = random_model("gpt2-tiny", seed=5, attention="bidirectional")
    ids, mask = pad_batch([[10, 20, 30], [10, 20, 31]])
    with torch.no_grad():
        hc, hb = causal(ids, mask), bidir(ids, mask)
    # Changing the last token leaves the first token's causal state alone, not its bidirectional.
    torch.testing.assert_close(hc[0, 0], hc[1, 0])
    assert not torch.allclose(hb[0, 0], hb[1, 0])


def test_model_specs():
    a, spec, sha_a = load_model("random:gpt2-tiny:1")
    b, _, sha_b = load_model("random:gpt2-tiny:1")
    _, _, sha_c = load_model("random:gpt2-tiny:2")
    assert spec == "random:gpt2-tiny:1" and sha_a == sha_b != sha_c
    for bad in ["nonsense", "random:gpt5", "random:gpt2-tiny:x", "/no/such/folder"]:
        with pytest.raises(ModelSpecError):
            load_model(bad)


def test_model_width_is_read_without_the_weights(tmp_path):
    """The GPU path compiles its fused kernel for the model's width while the weights load:
    the width must be the one the loaded model has."""
    from pipeline.embed.encoder import compile_ahead, model_width

    save_checkpoint(random_model("gpt2-tiny", seed=1), tmp_path)
    for spec in ("random:gpt2-mini:3", "random:gpt2", str(tmp_path), None):
        assert model_width(spec) == load_model(spec)[0].config.n_embd, spec
    for bad in ("nonsense", "random:gpt5", "/no/such/folder"):
        assert model_width(bad) is None
    assert compile_ahead("random:gpt2-tiny", "cpu") is None  # nothing to compile on a CPU


def test_presets_have_gpt2_shapes():
    assert GPT2Model(GPT2Config(n_layer=1)).config.vocab_size == 50257
    # 124M parameters for gpt2 (without the LM head, which shares wte)
    n = sum(p.numel() for p in random_model("gpt2").parameters())
    assert 124_000_000 < n < 124_600_000
    with pytest.raises(ValueError, match="context"):
        random_model("gpt2-tiny")(torch.zeros(1, 129, dtype=torch.long))


@pytest.mark.parametrize("pooling", POOLINGS)
def test_packed_pooling_equals_padded_pooling(pooling):
    """The GPU path pools packed (N, C) states; it must equal pooling the padded batch."""
    from pipeline.model.gpt2 import pool_packed

    tokens = random_token_lists(11, n=6, max_len=25)
    lengths = torch.tensor([len(t) for t in tokens])
    hidden_padded = torch.randn(len(tokens), int(lengths.max()), 8)
    _, mask = pad_batch(tokens)
    packed = hidden_padded[mask.bool()]  # (N, C), sequences back to back
    cu = torch.zeros(len(tokens) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    seq_of_token = torch.repeat_interleave(torch.arange(len(tokens)), lengths)
    positions = torch.arange(packed.shape[0]) - cu[:-1].long()[seq_of_token]
    got = pool_packed(packed, seq_of_token, positions, cu[:-1], lengths, pooling)
    torch.testing.assert_close(got, pool(hidden_padded, mask, pooling))


@pytest.mark.parametrize("seed", range(5))
def test_pack_windows_fits_every_sequence_once(seed):
    from pipeline.embed.encoder import pack_windows

    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 129, 500)
    which, first, n_windows = pack_windows(lengths, 128)
    taken = np.zeros((n_windows, 128), dtype=int)
    for w, a, n in zip(which, first, lengths, strict=True):
        assert 0 <= a and a + n <= 128
        taken[w, a:a + n] += 1
    assert taken.max() == 1  # no slot holds two tokens
    assert n_windows <= int(np.ceil(lengths.sum() / 128 * 1.1))  # near-full windows


@pytest.mark.parametrize("max_len", [60, 16])  # windows and long sequences; windows only
@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("pooling", POOLINGS)
def test_windowed_layout_forward_equals_padded_forward(attention, pooling, max_len):
    """The GPU path's layout (short sequences sharing attention windows under a
    block-diagonal mask, the sequences of part-filled windows and the long ones back to
    back) gives each sequence the vector of the plain padded forward. On CPU in fp32, with
    16-slot windows."""
    from pipeline.embed.encoder import layout_on_device, plan_layout

    model = random_model("gpt2-tiny", seed=2).eval()
    model.config = replace(model.config, attention=attention)
    with torch.no_grad():  # LayerNorms told apart (their init is all ones and zeros)
        for name, p in model.named_parameters():
            if ".ln_" in name or name.startswith("ln_f"):
                p.add_(torch.randn_like(p) * 0.3)
    tokens = random_token_lists(5, n=30, max_len=max_len)
    lengths = np.array([len(t) for t in tokens])
    assert (lengths <= 16).sum() > 5 and ((lengths > 16).sum() > 5) == (max_len > 16)
    values = np.concatenate([np.asarray(t, dtype=np.int32) for t in tokens])
    plan = plan_layout(values, lengths, window=16, step=2)
    assert plan["window_tokens"] > 0 and plan["window_tokens"] % (16 * 2) == 0
    # Windows in steps of 2: the sequences of the windows past that join the long part.
    assert len(plan["long_cu"]) - 1 > (lengths > 16).sum()
    (layout,) = layout_on_device([plan], torch.device("cpu"))
    with torch.inference_mode():
        got = model.embed_packed(layout, pooling)
        ids, mask = pad_batch(tokens)
        expected = model.embed(ids, mask, pooling)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("seed", range(10))
def test_packed_batches_cover_rows_within_budget(seed):
    from pipeline.embed.layout import plan_packed_batches

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 300, (int(torch.randint(0, 200, (1,), generator=g)),),
                            generator=g).tolist()
    budget = 1000
    ranges = plan_packed_batches(lengths, budget)
    assert [i for a, b in ranges for i in range(a, b)] == list(range(len(lengths)))
    for a, b in ranges:
        assert sum(lengths[a:b]) <= budget or b - a == 1


def test_planner_process_plans_like_this_process_and_reports_its_death():
    """The embed stage plans layouts in a child process (layout.Planner): the same plans as
    in-process; a child that dies gives a one-line error instead of a hang."""
    from pipeline.embed.layout import Planner, plan_passes

    rng = np.random.default_rng(3)
    lengths = np.clip(rng.lognormal(np.log(30), 0.9, 12000), 1, 400).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = rng.integers(0, 50257, offsets[-1]).astype(np.int32)
    planner = Planner()
    try:
        got_batches, got = planner.plan_passes(values, offsets, 65536, 128)
        batches, expected = plan_passes(values, offsets, 65536, 128)
        assert got_batches == batches and len(got) == len(expected) > 5
        for a, b in zip(got, expected, strict=True):
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
        assert got[0]["window_tokens"] > 0 and got[-1]["window_tokens"] == 0  # full; last
        planner.process.kill()
        planner.process.wait()
        with pytest.raises(ChildFailed, match="planning process ended unexpectedly"):
            planner.plan_passes(values, offsets, 65536, 128)
    finally:
        planner.close()
    assert planner.process.poll() is not None
    dead_at_start = Planner()  # one that dies before it is up
    dead_at_start.process.kill()
    dead_at_start.process.wait()
    with pytest.raises(ChildFailed, match="planning process ended unexpectedly"):
        while not dead_at_start.started():
            pass
    dead_at_start.close()
