"""The numpy query encoder against the torch encoder (the reference), and `pipeline search` on it:
same vectors, same identity and weights hash, same hits, and no torch import."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import ATTENTIONS, POOLINGS
from pipeline.embed.encoder import DEFAULT_MODEL_DIR, Encoder, pad_batch
from pipeline.model.checkpoint import random_model, save_checkpoint, to_hf_state_dict
from pipeline.model.numpy_forward import NotSupported, QueryEncoder
from pipeline.search import search

runner = CliRunner()
TEXTS = ["tool to resize photos", "a", "The quick brown fox jumps over the lazy dog. " * 80,
         "x y z", "image viewer for the terminal with sixel support"]


def random_token_lists(seed, n=7, max_len=40, vocab=50257):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len, n).tolist()
    lengths[0] = max_len  # one row without padding
    return [rng.integers(0, vocab, k).tolist() for k in lengths]


def perturbed_model(seed=0, **overrides):
    """A random gpt2-tiny with LayerNorms and biases moved off 1/0, so they are tested too."""
    model = random_model("gpt2-tiny", seed=seed, **overrides)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").is_file(), reason="no default model")
@pytest.mark.parametrize("pooling", [None, *POOLINGS])
def test_default_model_equals_torch(pooling):
    ref = Encoder.load(str(DEFAULT_MODEL_DIR), device="cpu", pooling=pooling, precision="fp32")
    ours = QueryEncoder.load(str(DEFAULT_MODEL_DIR), pooling)
    assert ours.identity() == ref.identity() and ours.sha256 == ref.sha256
    # different lengths in one batch, and one text past the 256-token context (truncated)
    np.testing.assert_allclose(ours.embed_texts(TEXTS), ref.embed_texts(TEXTS), atol=1e-5)


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("projection_dim", [0, 24])
def test_random_checkpoints_equal_torch(tmp_path, attention, pooling, projection_dim):
    model = perturbed_model(seed=3, attention=attention, pooling=pooling,
                            projection_dim=projection_dim)
    save_checkpoint(model, tmp_path)
    ref = Encoder.load(str(tmp_path), device="cpu", precision="fp32")
    ours = QueryEncoder.load(str(tmp_path))
    assert ours.identity() == ref.identity()
    tokens = random_token_lists(4, max_len=model.config.n_positions + 20)  # one truncated
    np.testing.assert_allclose(ours.embed_token_lists(tokens), ref.embed_token_lists(tokens),
                               atol=1e-5)
    # The hidden states of every real token of a padded batch, too.
    short = random_token_lists(5, max_len=30)
    ids, mask = pad_batch(short)
    with torch.no_grad():
        want = model(ids, mask).numpy()
    got = ours.hidden_states(ids.numpy(), mask.numpy().astype(bool))
    real = mask.numpy().astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-5)


def test_small_batches_give_the_same_vectors(tmp_path):
    save_checkpoint(perturbed_model(seed=1, attention="bidirectional"), tmp_path)
    enc = QueryEncoder.load(str(tmp_path))
    tokens = random_token_lists(6, n=20, max_len=50)
    np.testing.assert_allclose(enc.embed_token_lists(tokens, max_batch_tokens=60),
                               enc.embed_token_lists(tokens), atol=1e-5)


def test_fp16_checkpoint_and_hash_without_recorded_sha(tmp_path):
    """fp16 weights (the default model's) convert exactly; a folder without weights_sha256
    gets encoder.state_sha256's hash of the fp32 weights."""
    save_checkpoint(perturbed_model(seed=2, projection_dim=8), tmp_path, dtype=torch.float16)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["weights_sha256"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    ref = Encoder.load(str(tmp_path), device="cpu", precision="fp32")
    ours = QueryEncoder.load(str(tmp_path))
    assert ours.sha256 == ref.sha256 and len(ours.sha256) == 64
    tokens = random_token_lists(7)
    np.testing.assert_allclose(ours.embed_token_lists(tokens), ref.embed_token_lists(tokens),
                               atol=1e-5)


def test_hugging_face_lm_head_folder(tmp_path):
    """A transformers GPT2LMHeadModel folder ('transformer.' prefix, masked-bias buffers)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=64)
    transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(tmp_path, safe_serialization=True)
    ref = Encoder.load(str(tmp_path), device="cpu", precision="fp32")
    ours = QueryEncoder.load(str(tmp_path))
    assert ours.sha256 == ref.sha256
    tokens = random_token_lists(8, max_len=60)
    np.testing.assert_allclose(ours.embed_token_lists(tokens), ref.embed_token_lists(tokens),
                               atol=1e-5)


def test_what_it_leaves_to_torch(tmp_path):
    with pytest.raises(NotSupported):
        QueryEncoder.load("random:gpt2-tiny")
    with pytest.raises(NotSupported):
        QueryEncoder.load(tmp_path / "missing")
    model = perturbed_model()
    save_checkpoint(model, tmp_path)
    sd = {k: v.to(torch.bfloat16) for k, v in to_hf_state_dict(model).items()}
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(NotSupported):
        QueryEncoder.load(tmp_path)
    # weights that do not fit the config: torch reports it, so numpy steps aside
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    with pytest.raises(NotSupported):
        QueryEncoder.load(tmp_path)


# ---------------------------------------------------------------------------------------------
# `pipeline search` on the numpy path

TOPICS = ["recipe for baking bread with flour yeast and butter in the oven",
          "rocket launch to orbit the moon with astronauts and satellites",
          "guitar and piano concert with a singer and a drum solo"]


def ok(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def checkpoint_index(tmp_path_factory):
    """An index embedded (by torch, fp32) with a checkpoint folder, and that folder."""
    tmp = tmp_path_factory.mktemp("search")
    model_dir = tmp / "model"
    save_checkpoint(perturbed_model(seed=4, attention="bidirectional", projection_dim=16),
                    model_dir)
    rng = np.random.default_rng(0)
    corpus = tmp / "corpus.jsonl"
    with open(corpus, "w") as fh:
        for i in range(200):
            words = TOPICS[i % 3].split()
            text = " ".join(rng.choice(words, size=int(rng.integers(4, 14))))
            if i % 20 == 0:
                text = " ".join([text] * 30)  # several windows
            fh.write(json.dumps({"id": f"doc-{i}", "text": text}) + "\n")
    index = tmp / "idx"
    ok("tokenize", corpus, "--index", index, "--max-tokens", 64, "--overlap", 8)
    ok("embed", "--index", index, "--model", model_dir, "--device", "cpu", "--precision", "fp32")
    ok("build-index", "--index", index)
    return index, model_dir


def test_search_hits_equal_on_numpy_and_torch(checkpoint_index, monkeypatch):
    index, _ = checkpoint_index
    # the torch reference in fp32 (auto would pick bf16 on CPUs with AMX)
    monkeypatch.setattr("pipeline.embed.encoder.cpu_has_fast_bf16", lambda: False)
    queries = ["bread in the oven", "moon rocket", "a drum solo at the concert"]
    by_numpy = search(index, queries, k=5, engine="numpy")
    by_torch = search(index, queries, k=5, device="cpu", engine="torch")
    for a, b in zip(by_numpy, by_torch, strict=True):
        assert [(h.row, h.doc_id) for h in a] == [(h.row, h.doc_id) for h in b]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-5)
    cli_hits = json.loads(ok("search", "moon rocket", "--index", index, "-k", 5, "--json")
                          .stdout)["hits"]
    assert [h["row"] for h in cli_hits] == [h.row for h in by_numpy[1]]


def test_search_refuses_another_checkpoint(checkpoint_index, tmp_path):
    index, _ = checkpoint_index
    save_checkpoint(perturbed_model(seed=5, attention="bidirectional", projection_dim=16),
                    tmp_path)
    result = runner.invoke(app, ["search", "bread", "--index", str(index),
                                 "--model", str(tmp_path)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "another model" in lines[0], result.stderr


def test_search_does_not_import_torch(checkpoint_index):
    index, _ = checkpoint_index
    code = (
        "import sys\n"
        "from pipeline.cli import app\n"
        "try:\n"
        f"    app(['search', 'moon rocket', '--index', {str(index)!r}, '--json'])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers'})\n"
        "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert '"hits"' in out
    assert out.strip().splitlines()[-1] == "HEAVY []"
