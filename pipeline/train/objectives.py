"""The objectives of a run: each one's data (distillation texts and their teacher vectors,
scored or positive pairs), its own batch stream, and its loss on the k-th batch."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from pipeline.analysis.evaluate import PairData, load_embedder, read_pairs
from pipeline.errors import TrainError
from pipeline.model.gpt2 import GPT2Model
from pipeline.text.tokenizer import Tokenizer
from pipeline.train.config import TrainConfig
from pipeline.train.data import (
    BatchStream,
    TokenTable,
    read_texts,
    to_batch,
    to_device,
    unique_texts,
)
from pipeline.train.ensemble import combine, parse_teacher, pca_basis, project
from pipeline.train.losses import cosent_loss, distill_loss, mnrl_loss, relational_loss
from pipeline.train.model import embed_for_training

log = logging.getLogger(__name__)

# The seed stream of each objective's batch order: part of what makes a run reproducible, so
# changing a number changes every later run's batches.
STREAMS = {"distill": 0, "cosent": 1, "mnrl": 2}


@dataclass
class Objective:
    name: str
    weight: float
    stream: BatchStream
    tokens: TokenTable | tuple[TokenTable, TokenTable]
    targets: np.ndarray | None = None  # distill: teacher vectors; cosent: scores
    relations: np.ndarray | None = None  # distill: the full-width vectors the KL term compares


def teacher_targets(texts: Sequence[str], teacher: str, device: str | None,
                    cache_dir: str | Path) -> np.ndarray:
    """(N, D) float16 unit vectors of the teacher for `texts`, computed once per
    (teacher, texts) and kept in cache_dir (a resumed or repeated run reuses them)."""
    digest = hashlib.sha256(teacher.encode())
    for t in texts:
        digest.update(t.encode())
        digest.update(b"\n")
    path = Path(cache_dir) / f"teacher-{digest.hexdigest()[:20]}.npy"
    cached = read_cached_vectors(path, len(texts))
    if cached is not None:
        log.info("teacher vectors from %s", path)
        return cached
    embed, name = load_embedder(teacher, device)
    start = time.perf_counter()
    vectors = embed(list(texts)).astype(np.float16)
    log.info("teacher %s encoded %d texts in %.1f s", name, len(texts),
             time.perf_counter() - start)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npy")
    np.save(tmp, vectors)
    tmp.replace(path)
    return vectors


def ensemble_targets(texts: Sequence[str], teacher: str, device: str | None,
                     cache_dir: str | Path) -> np.ndarray:
    """(N, sum D_i) float16 unit vectors of a teacher or an ensemble spec ("A*0.7+B*0.3"):
    each member's cached vectors, combined (ensemble.combine)."""
    members = parse_teacher(teacher)
    return combine([teacher_targets(texts, spec, device, cache_dir) for spec, _ in members],
                   [w for _, w in members])


def read_cached_vectors(path: Path, rows: int) -> np.ndarray | None:
    """The cached (rows, D) vectors, or None where the cache lacks them. allow_pickle=False:
    the cache folder is the user's, and a crafted .npy must not run code; one that does not
    load (damaged, or object arrays) is recomputed, like a missing one."""
    if not path.is_file():
        return None
    try:
        vectors = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return None
    if vectors.ndim != 2 or len(vectors) != rows:
        return None
    return vectors


@lru_cache(maxsize=2)
def distill_corpus(paths: tuple[str, ...], max_tokens: int) -> tuple[list[str], TokenTable]:
    """The distillation texts (deduplicated) and their tokens. Cached: several runs in one
    process (the tests; a notebook's sweep) read and tokenize the corpus once."""
    texts = unique_texts([read_texts(p) for p in paths])
    if not texts:
        raise TrainError("--distill-data holds no text")
    return texts, TokenTable.build(Tokenizer.load().encode_batch(texts), max_tokens)


def distill_objective(cfg: TrainConfig, weight: float, device: torch.device,
                      max_tokens: int) -> Objective:
    """The texts, the (ensemble of) teachers' vectors for the KL term, and those vectors
    reduced to --teacher-dim for the pointwise term."""
    texts, table = distill_corpus(cfg.distill_data, max_tokens)
    full = ensemble_targets(texts, cfg.teacher, str(device), cfg.teacher_cache)
    targets = full
    if cfg.teacher_dim is not None and cfg.teacher_dim != full.shape[1]:
        targets = project(full, pca_basis(full, cfg.teacher_dim, seed=cfg.seed))
    log.info("distill: %d texts, %d tokens, teacher vectors %d dims (pointwise %d)",
             len(texts), int(table.lengths.sum()), full.shape[1], targets.shape[1])
    stream = BatchStream(table.lengths, cfg.batch_size, cfg.seed, STREAMS["distill"])
    relations = full if cfg.relational_weight > 0 else None
    return Objective("distill", weight, stream, table, targets, relations)


def pair_objective(name: str, weight: float, source: str, pairs: PairData, cfg: TrainConfig,
                   tokenizer: Tokenizer, max_tokens: int) -> Objective:
    """CoSENT on every scored pair, or MNRL on the label-1 pairs (`pairs`, read from
    `source`)."""
    if name == "cosent" and not pairs.has_scores:
        raise TrainError(f"CoSENT needs a score column in {source}")
    keep = np.arange(len(pairs)) if name == "cosent" else np.flatnonzero(pairs.label)
    if len(keep) < 2:
        raise TrainError(f"{source}: too few pairs for {name}")
    t1 = TokenTable.build(tokenizer.encode_batch([pairs.sentence1[i] for i in keep]), max_tokens)
    t2 = TokenTable.build(tokenizer.encode_batch([pairs.sentence2[i] for i in keep]), max_tokens)
    stream = BatchStream(np.maximum(t1.lengths, t2.lengths), cfg.pair_batch_size, cfg.seed,
                         STREAMS[name])
    scores = pairs.score[keep].astype(np.float32) if name == "cosent" else None
    return Objective(name, weight, stream, (t1, t2), scores)


def load_objectives(cfg: TrainConfig, tokenizer: Tokenizer, device: torch.device,
                    max_tokens: int) -> list[Objective]:
    """The objectives of positive weight, distillation first: the first one's data is what
    --epochs counts."""
    weights = cfg.objective_weights()
    objectives = []
    if "distill" in weights:
        objectives.append(distill_objective(cfg, weights["distill"], device, max_tokens))
    read: dict[str, PairData] = {}  # CoSENT and MNRL on --pairs read the file once
    for name in ("cosent", "mnrl"):
        if name in weights:
            path = cfg.mnrl_pairs if name == "mnrl" and cfg.mnrl_pairs else cfg.pairs
            if path not in read:
                read[path] = read_pairs(path)
            objectives.append(pair_objective(name, weights[name], path, read[path], cfg,
                                             tokenizer, max_tokens))
    return objectives


def objective_loss(obj: Objective, k: int, model: GPT2Model, cfg: TrainConfig,
                   device: torch.device) -> tuple[torch.Tensor, int]:
    """(loss, real tokens) of objective `obj` on its k-th batch."""
    idx = obj.stream.batch(k)
    if obj.name == "distill":
        rows = obj.tokens.rows(idx)
        ids, mask = to_batch(rows, device)
        student = embed_for_training(model, ids, mask).float()
        loss = student.new_zeros(())
        if cfg.distill_weight > 0:
            teacher = to_device(torch.from_numpy(obj.targets[idx].astype(np.float32)), device)
            loss = loss + cfg.distill_weight * distill_loss(student, teacher, cfg.distill_loss)
        if cfg.relational_weight > 0:
            full = to_device(torch.from_numpy(obj.relations[idx].astype(np.float32)), device)
            loss = loss + cfg.relational_weight * relational_loss(
                student, full, cfg.relational_temperature)
        return loss, sum(len(r) for r in rows)
    t1, t2 = obj.tokens
    rows = t1.rows(idx) + t2.rows(idx)
    ids, mask = to_batch(rows, device)
    emb = embed_for_training(model, ids, mask).float()
    a, b = emb[: len(idx)], emb[len(idx):]
    if obj.name == "cosent":
        scores = to_device(torch.from_numpy(obj.targets[idx]), device)
        loss = cosent_loss(a, b, scores, cfg.scale)
    else:
        loss = mnrl_loss(a, b, cfg.scale)
    return loss, sum(len(r) for r in rows)
