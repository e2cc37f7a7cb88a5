"""The dev set scored during a run: its Spearman picks the checkpoint a run keeps."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.analysis.evaluate import PairData, read_pairs
from pipeline.analysis.metrics import spearman
from pipeline.embed.encoder import plan_batches
from pipeline.errors import TrainError
from pipeline.model.gpt2 import GPT2Model
from pipeline.text.tokenizer import Tokenizer
from pipeline.train.data import to_batch

Autocast = Callable[[], AbstractContextManager]


@torch.no_grad()
def embed_tokens(model: GPT2Model, token_lists: Sequence[Sequence[int]], device: torch.device,
                 autocast: Autocast, max_batch_tokens: int = 32768) -> np.ndarray:
    was_training = model.training
    model.eval()
    out = np.zeros((len(token_lists), model.config.output_dim), dtype=np.float32)
    for batch in plan_batches([len(t) for t in token_lists], max_batch_tokens):
        ids, mask = to_batch([token_lists[i] for i in batch], device)
        with autocast():
            out[batch] = model.embed(ids, mask).float().cpu().numpy()
    model.train(was_training)
    return out


@dataclass
class DevSet:
    data: PairData
    tokens1: list[list[int]]
    tokens2: list[list[int]]

    @classmethod
    def load(cls, path: str, tokenizer: Tokenizer, max_tokens: int) -> DevSet:
        data = read_pairs(path)
        if not data.has_scores:
            raise TrainError(f"--dev {path} needs a score column")

        def tokens(texts: list[str]) -> list[list[int]]:
            return [t[:max_tokens] for t in tokenizer.encode_batch(texts)]

        return cls(data, tokens(data.sentence1), tokens(data.sentence2))

    def spearman(self, model: GPT2Model, device: torch.device, autocast: Autocast) -> float:
        a = embed_tokens(model, self.tokens1, device, autocast)
        b = embed_tokens(model, self.tokens2, device, autocast)
        return spearman((a * b).sum(1), self.data.score)
