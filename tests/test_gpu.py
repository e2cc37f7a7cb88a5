"""The GPU fast path (packed sequences: attention windows and flash attention's variable-length
kernel, bf16 weights, the fused bias+GELU matmul) against the plain padded forward in fp32.
Runs where CUDA is; `make bench` on a GPU machine measures its speed."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import POOLINGS
from pipeline.embed.encoder import Encoder, pad_batch
from pipeline.model.checkpoint import random_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def token_lists(seed, n=40, max_len=300):
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(30), 0.9, n).astype(int), 1, max_len)
    return [rng.integers(0, 50257, k).tolist() for k in lengths]


def test_fused_bias_gelu_is_gpt2s_tanh_gelu():
    mlp = random_model("gpt2-tiny").h[0].mlp.cuda()
    x = torch.randn(1000, mlp.c_fc.in_features, device="cuda")
    with torch.no_grad():
        fused = mlp(x)  # 2-D input, no grad: the epilogue path
        expected = mlp.c_proj(F.gelu(mlp.c_fc(x), approximate="tanh"))
    # cuBLASLt computes tanh with a fast approximation (and TF32 may be on): close, not equal.
    torch.testing.assert_close(fused, expected, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("window", [128, 0])  # 0: flash's variable-length kernel for all
@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
@pytest.mark.parametrize("pooling", POOLINGS)
def test_packed_bf16_path_matches_padded_fp32(attention, pooling, window):
    spec = "random:gpt2-mini:3"
    fast = Encoder.load(spec, "cuda", pooling, precision="bf16")
    fast.window = window
    ref = Encoder.load(spec, "cpu", pooling, precision="fp32")
    for enc in (fast, ref):
        enc.model.config = replace(enc.model.config, attention=attention)
    tokens = token_lists(7)
    values = np.concatenate([np.asarray(t, dtype=np.int32) for t in tokens])
    offsets = np.zeros(len(tokens) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in tokens], out=offsets[1:])
    got = fast.embed_flat(values, offsets, max_batch_tokens=1024)  # several packed batches
    with torch.inference_mode():
        ids, mask = pad_batch(tokens)
        expected = ref.model.embed(ids, mask, pooling).numpy()
    cosine = (got * expected).sum(1)
    assert cosine.min() > 0.999, cosine.min()
    half = fast.embed_flat(values, offsets, 1024, dtype=np.float16)
    assert half.dtype == np.float16
    np.testing.assert_allclose(half.astype(np.float32), got, atol=2e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_second_gpu_gives_the_vectors_of_the_first():
    """Work queued on cuda:1 from a thread whose current device is cuda:0 (as with
    --devices): each copy back must wait for cuda:1's kernels, not cuda:0's."""
    spec = "random:gpt2:0"
    first, second = (Encoder.load(spec, f"cuda:{i}", precision="bf16") for i in (0, 1))
    tokens = token_lists(3, n=3000, max_len=512)
    values = np.concatenate([np.asarray(t, dtype=np.int32) for t in tokens])
    offsets = np.zeros(len(tokens) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in tokens], out=offsets[1:])
    torch.cuda.set_device(0)
    pending = [second.start_embed_flat(values, offsets, 16384) for _ in range(3)]
    results = [p.result() for p in pending]  # before cuda:0 work could give cuda:1 time
    expected = first.embed_flat(values, offsets, 16384)
    for got in results:
        assert (got * expected).sum(1).min() > 0.999


def test_vectors_come_back_block_by_block_in_row_order():
    """`parts` hands a shard's vectors to the writer as passes finish: consecutive blocks
    of at least min_rows (the last may be smaller), together the vectors `result` gives."""
    encoder = Encoder.load("random:gpt2-mini:3", "cuda", precision="bf16")
    tokens = token_lists(5, n=2000)
    values = np.concatenate([np.asarray(t, dtype=np.int32) for t in tokens])
    offsets = np.zeros(len(tokens) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in tokens], out=offsets[1:])
    whole = encoder.embed_flat(values, offsets, 4096, dtype=np.float16)
    blocks = list(encoder.start_embed_flat(values, offsets, 4096, dtype=np.float16).parts(300))
    sizes = [len(vectors) for _, vectors in blocks]
    assert [first for first, _ in blocks] == np.cumsum([0] + sizes[:-1]).tolist()
    assert sum(sizes) == len(tokens) and len(blocks) > 2 and min(sizes[:-1]) >= 300
    np.testing.assert_allclose(np.concatenate([v for _, v in blocks]).astype(np.float32),
                               whole.astype(np.float32), atol=1e-3)


def test_embed_stage_on_the_gpu_matches_the_cpu(tmp_path, monkeypatch):
    """The whole stage (reader-thread layouts, queued passes, copies back, writers writing
    each shard block by block) on every GPU there is, against the same stage on the CPU in
    fp32."""
    import pyarrow.parquet as pq

    from pipeline.embed.engines import local
    from pipeline.embed.stage import run_embed
    from pipeline.folder import IndexFolder
    from pipeline.text.stage import TokenizeSettings, run_tokenize

    rng = np.random.default_rng(0)
    words = "bread oven flour kernel driver packet window photo resize audio".split()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(" ".join(rng.choice(words, int(rng.lognormal(3, 0.9)) + 1))
                              + "\n" for _ in range(3000)))
    settings = TokenizeSettings(max_tokens=512, overlap=32, shard_rows=500)
    devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    for name in ("cpu", "gpu"):
        run_tokenize(corpus, tmp_path / name, settings)
    run_embed(tmp_path / "cpu", "random:gpt2-mini:1", "cpu", precision="fp32")
    monkeypatch.setattr(local, "WRITE_ROWS", 100)  # several blocks (row groups) a shard
    run_embed(tmp_path / "gpu", "random:gpt2-mini:1", "cuda", devices=devices,
              batch_tokens=8192)
    assert pq.ParquetFile(next((tmp_path / "gpu" / "embeddings").glob("*.parquet"))
                          ).num_row_groups > 1
    cosine = (IndexFolder(tmp_path / "cpu").load_vectors()
              * IndexFolder(tmp_path / "gpu").load_vectors()).sum(1)
    assert len(cosine) >= 3000 and cosine.min() > 0.999, cosine.min()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.07)])
def test_fused_add_layer_norm_equals_the_two_torch_steps(dtype, tol):
    from pipeline.model.fused import add_layer_norm, fused_available

    norm = torch.nn.LayerNorm(768).cuda().to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x, delta = (torch.randn(5003, 768, device="cuda", dtype=dtype) for _ in range(2))
    assert fused_available(x)  # the Triton kernel, not the fallback, is under test
    total, out = add_layer_norm(x, delta, norm)
    with torch.no_grad():
        expected_total = x + delta
        expected_out = norm(expected_total)
    torch.testing.assert_close(total, expected_total, atol=tol, rtol=0.02)
    torch.testing.assert_close(out, expected_out, atol=tol, rtol=0.02)
