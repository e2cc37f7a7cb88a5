import pytest

from pipeline.embed.encoder import Encoder
from pipeline.text.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.load()


@pytest.fixture(scope="session")
def tiny_encoder() -> Encoder:
    """A seeded random tiny GPT-2 on the CPU: fast, deterministic."""
    return Encoder.load("random:gpt2-tiny", device="cpu")
