"""Train the GPT-2 encoder: distillation, CoSENT and in-batch-negatives contrastive learning.

One `train()` call is one run with one schedule; a recipe chains runs (each starting from the
last one's output, see docs/training.md). Within a run every objective draws its own batch each
micro-step and the weighted losses are summed:

- distill: student(text) -> projection head -> cosine (or MSE) to a teacher's embedding of the
  same text; the teacher (any sentence-transformers folder, or one of our models) encodes the
  texts once and its vectors are cached on disk;
- cosent: CoSENT on scored pairs (STS-B train): every pair of pairs whose gold scores are
  ordered must have their cosines ordered the same way;
- mnrl: MultipleNegativesRanking / InfoNCE on the label-1 pairs of the same file, the other
  pairs of the batch being the negatives.

Reproducible and resumable by construction: the k-th batch of an objective is a pure function
of (seed, objective, k), and a checkpoint stores the weights, the optimizer and the step, so a
killed run picks up exactly where its last checkpoint left it (log lines after that step are
dropped and redone). On CPU, the same seed and data give the same loss curve.

Output folder:
    config.json, model.safetensors  the best model by dev Spearman (the last one without --dev)
    last/                           weights + optimizer state of the latest checkpoint
    train_log.jsonl                 loss, lr, tokens/s per log interval; dev metrics per eval
    train_config.json, summary.json what was asked and what came out
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import json
import logging
import lzma
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pipeline.analysis.evaluate import PairData, load_embedder, read_pairs, spearman
from pipeline.embed.encoder import pad_batch, pick_device, plan_batches
from pipeline.model.gpt2 import (
    PRESETS,
    GPT2Config,
    GPT2Model,
    from_hf_state_dict,
    pool,
    read_checkpoint,
    save_checkpoint,
    weights_sha256,
)
from pipeline.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)

OBJECTIVES = ("distill", "cosent", "mnrl")
MAX_CONSECUTIVE_SKIPS = 20  # non-finite gradients in a row that mean a diverged run
DISTILL_LOSSES = ("cosine", "mse")
# Batches are cut from length-sorted chunks of this many batches: little padding, and still
# a different mix of texts in every batch from epoch to epoch.
CHUNK_BATCHES = 32


class TrainError(ValueError):
    """A run that cannot start as asked (bad options, mismatched resume)."""


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class TrainConfig:
    out: str
    init: str = "gpt2-mini"  # a preset (random init), our checkpoint or a Hugging Face GPT-2
    # Model overrides (None = the init's own): attention, pooling, context, projection head.
    attention: str | None = None
    pooling: str | None = None
    n_positions: int | None = None
    projection_dim: int | None = None  # distillation defaults it to the teacher's width
    # Objectives and their data.
    distill_data: tuple[str, ...] = ()  # text files (one per line; .gz/.xz ok) or Parquet 'text'
    teacher: str | None = None
    distill_loss: str = "cosine"
    distill_weight: float = 1.0
    pairs: str | None = None  # TSV with sentence1, sentence2, label, score (STS-B train)
    cosent_weight: float = 1.0
    mnrl_weight: float = 0.0
    scale: float = 20.0  # inverse temperature of CoSENT and MNRL
    dev: str | None = None  # TSV with scores: dev Spearman picks the best checkpoint
    # Optimisation.
    steps: int | None = None
    epochs: float | None = None  # over the first objective's data, if steps is not given
    batch_size: int = 256  # texts per distillation micro-batch
    pair_batch_size: int = 64  # pairs per CoSENT / MNRL micro-batch
    accum: int = 1  # micro-batches per optimizer step
    max_tokens: int | None = None  # texts are cut to this many tokens (None: the context)
    lr: float = 1e-3
    min_lr_ratio: float = 0.0  # the cosine decays to lr * min_lr_ratio
    warmup: float = 0.05  # fraction of the steps
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    # Bookkeeping.
    eval_every: int = 500
    save_every: int = 500
    log_every: int = 50
    device: str | None = None
    bf16: bool = True  # autocast to bf16 on CUDA (CPU stays fp32, hence deterministic)
    teacher_cache: str = ".cache/teacher"

    # Fields that may change between a run and its resumption without changing its result.
    RESUME_FREE = ("device", "teacher_cache", "out", "log_every")

    def objective_weights(self) -> dict[str, float]:
        weights = {}
        if self.distill_data:
            weights["distill"] = self.distill_weight
        if self.pairs:
            weights["cosent"] = self.cosent_weight
            weights["mnrl"] = self.mnrl_weight
        return {k: w for k, w in weights.items() if w > 0}

    def check(self) -> None:
        """Reject impossible combinations before anything is loaded."""
        if self.distill_data and not self.teacher:
            raise TrainError("--distill-data needs --teacher")
        if not self.objective_weights():
            raise TrainError("nothing to train: give --distill-data/--teacher and/or --pairs "
                             "with a positive weight")
        if self.distill_loss not in DISTILL_LOSSES:
            raise TrainError(f"--distill-loss must be one of {', '.join(DISTILL_LOSSES)}")
        if (self.steps is None) == (self.epochs is None):
            raise TrainError("give exactly one of --steps and --epochs")
        if (self.steps is not None and self.steps < 1) or (self.epochs is not None
                                                           and self.epochs <= 0):
            raise TrainError("--steps / --epochs must be positive")
        for name in ("batch_size", "pair_batch_size", "accum", "max_tokens", "eval_every",
                     "save_every", "log_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0 <= self.warmup < 1:
            raise TrainError("--warmup is a fraction of the steps, in [0, 1)")
        if self.pairs and self.mnrl_weight > 0 and self.pair_batch_size < 2:
            raise TrainError("MNRL needs --pair-batch-size of at least 2 (in-batch negatives)")

    def to_json(self) -> dict:
        d = asdict(self)
        d["distill_data"] = list(self.distill_data)
        return d

    @classmethod
    def from_json(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["distill_data"] = tuple(d.get("distill_data", ()))
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# Losses (pure): a, b are (B, D) embeddings; rows of a and b are pairs.


def mnrl_loss(a: torch.Tensor, b: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """In-batch negatives: a_i must pick b_i out of all b (cross-entropy over scaled cosines)."""
    sims = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T * scale  # (B, B)
    return F.cross_entropy(sims, torch.arange(len(a), device=a.device))


def cosent_loss(a: torch.Tensor, b: torch.Tensor, scores: torch.Tensor,
                scale: float = 20.0) -> torch.Tensor:
    """CoSENT (Su, 2022): log(1 + sum over (i, j) with score_i > score_j of
    exp(scale * (cos_j - cos_i))), i.e. a soft count of wrongly ordered pairs of pairs."""
    cos = (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1) * scale  # (B,)
    diff = cos[None, :] - cos[:, None]  # diff[i, j] = cos_j - cos_i
    wrong_way = scores[:, None] > scores[None, :]
    diff = diff[wrong_way]
    return torch.logsumexp(torch.cat([diff.new_zeros(1), diff]), dim=0)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor,
                 kind: str = "cosine") -> torch.Tensor:
    """cosine: mean (1 - cos); mse: mean squared error against the (unit) teacher vectors."""
    if kind == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    if kind == "mse":
        return F.mse_loss(student, teacher)
    raise ValueError(f"unknown distillation loss {kind!r}")


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float = 0.0) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine decay."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return peak * (min_ratio + (1 - min_ratio) * cosine)


# ---------------------------------------------------------------------------------------------
# Data: texts, tokens, batch plans


def read_texts(path: str | Path) -> list[str]:
    """Texts of a file: one per line (plain, .gz, .xz or .bz2), or a Parquet 'text' column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cannot read {path}: no such file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise TrainError(f"{path} has no 'text' column")
        texts = table.column("text").to_pylist()
    else:
        opener = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}.get(path.suffix, open)
        with opener(path, "rt", encoding="utf-8") as fh:
            texts = fh.read().splitlines()
    return [t.strip() for t in texts if t and t.strip()]


def unique_texts(groups: Sequence[Sequence[str]]) -> list[str]:
    """Concatenate, dropping exact duplicates (first occurrence wins, order kept)."""
    return list(dict.fromkeys(t for group in groups for t in group))


@dataclass(frozen=True)
class TokenTable:
    """Many token sequences in one flat array: ids[offsets[i]:offsets[i+1]] is sequence i."""

    ids: np.ndarray  # (total,) int32
    offsets: np.ndarray  # (N + 1,) int64

    @classmethod
    def build(cls, token_lists: Sequence[Sequence[int]], max_tokens: int) -> TokenTable:
        lists = [t[:max_tokens] or [0] for t in token_lists]  # an empty text still gets a slot
        lengths = np.array([len(t) for t in lists], dtype=np.int64)
        offsets = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.fromiter((i for t in lists for i in t), dtype=np.int32, count=int(offsets[-1]))
        return cls(ids, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def rows(self, indices: Sequence[int]) -> list[np.ndarray]:
        return [self.ids[self.offsets[i]:self.offsets[i + 1]] for i in indices]


def plan_epoch(lengths: np.ndarray, batch_size: int, seed: int, stream: int,
               epoch: int) -> list[np.ndarray]:
    """The batches of one epoch: a seeded shuffle, cut into chunks sorted by length (less
    padding), cut into full batches (an epoch drops its remainder so every batch has the same
    size, which in-batch negatives want), in shuffled order. Fewer texts than one batch make one
    smaller batch."""
    n = len(lengths)
    rng = np.random.default_rng([seed, stream, epoch])
    perm = rng.permutation(n)
    if n < batch_size:
        return [perm]
    n_batches = n // batch_size
    perm = perm[: n_batches * batch_size]
    batches = []
    chunk = batch_size * CHUNK_BATCHES
    for start in range(0, len(perm), chunk):
        part = perm[start:start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


class BatchStream:
    """The k-th batch of an objective, for any k: epochs are planned on demand."""

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int, stream: int):
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed, self.stream = seed, stream
        self.per_epoch = max(1, len(lengths) // batch_size)
        self._epoch, self._plan = -1, []

    def batch(self, k: int) -> np.ndarray:
        epoch, i = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._plan = plan_epoch(self.lengths, self.batch_size, self.seed, self.stream, epoch)
        return self._plan[i]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Pinned, asynchronous copies to a GPU: the CPU prepares the next batch meanwhile
    (a copy from pageable memory would wait for all queued GPU work)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def to_batch(rows: Sequence[np.ndarray], device: torch.device):
    ids, mask = pad_batch(rows)
    return to_device(ids, device), to_device(mask, device)


# ---------------------------------------------------------------------------------------------
# Model: start from a preset, our checkpoint or a Hugging Face GPT-2 folder


def build_model(init: str, seed: int = 0, **overrides) -> GPT2Model:
    """A model to train. Overrides replace config fields; a changed or new projection head
    starts random, a shorter context keeps the first position embeddings."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    torch.manual_seed(seed)
    if init in PRESETS:
        return GPT2Model(replace(PRESETS[init], **overrides))
    try:
        old, sd = read_checkpoint(init)
    except FileNotFoundError:
        raise TrainError(f"--init {init!r} is neither a preset ({', '.join(PRESETS)}) nor a "
                         "checkpoint folder (config.json + model.safetensors)") from None
    cfg = replace(old, **overrides)
    if cfg.n_positions > old.n_positions:
        raise TrainError(f"--n-positions {cfg.n_positions} exceeds the checkpoint's "
                         f"{old.n_positions}")
    model = GPT2Model(cfg)
    sd["wpe.weight"] = sd["wpe.weight"][: cfg.n_positions]
    if cfg.projection_dim != old.projection_dim:
        sd = {k: v for k, v in sd.items() if not k.startswith("proj.")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("proj.")]
    if missing or unexpected:
        raise TrainError(f"{init}: weights do not fit its config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return model


# ---------------------------------------------------------------------------------------------
# Teacher targets, cached


def teacher_targets(texts: Sequence[str], teacher: str, device: str | None,
                    cache_dir: str | Path) -> np.ndarray:
    """(N, D) float16 unit vectors of the teacher for `texts`, computed once per
    (teacher, texts) and kept in cache_dir (a resumed or repeated run reuses them)."""
    digest = hashlib.sha256(teacher.encode())
    for t in texts:
        digest.update(t.encode())
        digest.update(b"\n")
    path = Path(cache_dir) / f"teacher-{digest.hexdigest()[:20]}.npy"
    if path.is_file():
        vectors = np.load(path)
        if len(vectors) == len(texts):
            log.info("teacher vectors from %s", path)
            return vectors
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


# ---------------------------------------------------------------------------------------------
# Dev evaluation inside the run


@torch.no_grad()
def embed_tokens(model: GPT2Model, token_lists: Sequence[Sequence[int]], device: torch.device,
                 autocast, max_batch_tokens: int = 32768) -> np.ndarray:
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
        cut = lambda lists: [t[:max_tokens] for t in lists]  # noqa: E731
        return cls(data, cut(tokenizer.encode_batch(data.sentence1)),
                   cut(tokenizer.encode_batch(data.sentence2)))

    def spearman(self, model: GPT2Model, device: torch.device, autocast) -> float:
        a = embed_tokens(model, self.tokens1, device, autocast)
        b = embed_tokens(model, self.tokens2, device, autocast)
        return spearman((a * b).sum(1), self.data.score)


# ---------------------------------------------------------------------------------------------
# Checkpoints of a run


def save_last(folder: Path, model: GPT2Model, optimizer: torch.optim.Optimizer, step: int,
              best: float | None) -> None:
    """Weights + optimizer + step, written to a temp folder and renamed into place."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(model, tmp)
    torch.save({"optimizer": optimizer.state_dict(), "step": step, "best": best},
               tmp / "state.pt")
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def find_last(out: Path) -> Path | None:
    """The latest complete checkpoint (a kill between the two renames leaves it as .old)."""
    for name in ("last", "last.old"):
        if (out / name / "state.pt").is_file():
            return out / name
    return None


def read_log(path: Path, upto_step: int) -> list[dict]:
    if not path.is_file():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [rec for rec in lines if rec.get("step", 0) <= upto_step]


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class Objective:
    name: str
    weight: float
    stream: BatchStream
    tokens: TokenTable | tuple[TokenTable, TokenTable]
    targets: np.ndarray | None = None  # distill: teacher vectors; cosent: scores


@lru_cache(maxsize=2)
def distill_corpus(paths: tuple[str, ...], max_tokens: int) -> tuple[list[str], TokenTable]:
    """The distillation texts (deduplicated) and their tokens. Cached: several runs in one
    process (benchmarks/train_gpu.py) read and tokenize 640k texts once."""
    texts = unique_texts([read_texts(p) for p in paths])
    if not texts:
        raise TrainError("--distill-data holds no text")
    return texts, TokenTable.build(Tokenizer.load().encode_batch(texts), max_tokens)


def context_length(cfg: TrainConfig) -> int:
    """The context the model will have: --n-positions, else its init's."""
    if cfg.n_positions:
        return cfg.n_positions
    if cfg.init in PRESETS:
        return PRESETS[cfg.init].n_positions
    config = Path(cfg.init) / "config.json"
    if not config.is_file():
        raise TrainError(f"--init {cfg.init!r} is neither a preset ({', '.join(PRESETS)}) nor "
                         "a checkpoint folder (config.json + model.safetensors)")
    return GPT2Config.from_dict(json.loads(config.read_text())).n_positions


def load_objectives(cfg: TrainConfig, tokenizer: Tokenizer, device: torch.device,
                    max_tokens: int) -> list[Objective]:
    weights = cfg.objective_weights()
    objectives = []
    if "distill" in weights:
        texts, table = distill_corpus(cfg.distill_data, max_tokens)
        targets = teacher_targets(texts, cfg.teacher, str(device), cfg.teacher_cache)
        log.info("distill: %d texts, %d tokens", len(texts), int(table.lengths.sum()))
        objectives.append(Objective("distill", weights["distill"],
                                    BatchStream(table.lengths, cfg.batch_size, cfg.seed, 0),
                                    table, targets))
    if cfg.pairs and ("cosent" in weights or "mnrl" in weights):
        pairs = read_pairs(cfg.pairs)
        for name, stream_id in (("cosent", 1), ("mnrl", 2)):
            if name not in weights:
                continue
            keep = np.arange(len(pairs)) if name == "cosent" else np.flatnonzero(pairs.label)
            if name == "cosent" and not pairs.has_scores:
                raise TrainError(f"CoSENT needs a score column in {cfg.pairs}")
            if len(keep) < 2:
                raise TrainError(f"{cfg.pairs}: too few pairs for {name}")
            t1 = TokenTable.build(tokenizer.encode_batch([pairs.sentence1[i] for i in keep]),
                                  max_tokens)
            t2 = TokenTable.build(tokenizer.encode_batch([pairs.sentence2[i] for i in keep]),
                                  max_tokens)
            lengths = np.maximum(t1.lengths, t2.lengths)
            objectives.append(Objective(
                name, weights[name], BatchStream(lengths, cfg.pair_batch_size, cfg.seed,
                                                 stream_id),
                (t1, t2), pairs.score[keep].astype(np.float32) if name == "cosent" else None))
    return objectives


def objective_loss(obj: Objective, k: int, model: GPT2Model, cfg: TrainConfig,
                   device: torch.device) -> tuple[torch.Tensor, int]:
    """(loss, real tokens) of objective `obj` on its k-th batch."""
    idx = obj.stream.batch(k)
    if obj.name == "distill":
        rows = obj.tokens.rows(idx)
        ids, mask = to_batch(rows, device)
        student = embed_for_training(model, ids, mask).float()
        teacher = to_device(torch.from_numpy(obj.targets[idx].astype(np.float32)), device)
        return distill_loss(student, teacher, cfg.distill_loss), sum(len(r) for r in rows)
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


def embed_for_training(model: GPT2Model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GPT2Model.embed(ids, mask, normalize=False), minus its test for padding: that test reads
    a flag back from the GPU, which stalls the CPU once per forward pass; here the key mask is
    always applied (with no padding it masks nothing). tests/test_train.py checks both agree."""
    B, T = ids.shape
    x = model.wte(ids) + model.wpe(torch.arange(T, device=ids.device))  # (B, T, C)
    causal = model.config.attention == "causal"
    keys = mask.bool()[:, None, None, :]  # (B, 1, 1, T)
    if causal:
        keys = keys & torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
    attn_mask = keys | torch.eye(T, dtype=torch.bool, device=ids.device)  # pads see themselves
    for block in model.h:
        x = block(x, attn_mask, causal)
    pooled = pool(model.ln_f(x), mask, model.config.pooling)
    return model.proj(pooled) if model.proj is not None else pooled


def total_steps(cfg: TrainConfig, objectives: Sequence[Objective]) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * objectives[0].stream.per_epoch / cfg.accum))


def make_optimizer(model: GPT2Model, cfg: TrainConfig, device: torch.device):
    """AdamW; no weight decay on biases and LayerNorm gains (as nanoGPT)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8,
                             fused=device.type == "cuda")


def prepare_out(cfg: TrainConfig, restart: bool) -> Path | None:
    """Create the output folder; return the checkpoint to resume from, if any."""
    out = Path(cfg.out)
    config_file = out / "train_config.json"
    last = find_last(out)
    if restart and out.exists():
        for name in ("last", "last.old", "last.tmp", "train_log.jsonl", "summary.json",
                     "model.safetensors", "config.json", "train_config.json"):
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        last = None
    if last is not None and config_file.is_file():
        saved = TrainConfig.from_json(json.loads(config_file.read_text()))
        diff = [f.name for f in fields(TrainConfig)
                if f.name not in TrainConfig.RESUME_FREE
                and getattr(saved, f.name) != getattr(cfg, f.name)]
        if diff:
            raise TrainError(f"{out} holds a run with other settings ({', '.join(diff)}); "
                             "use another --out or --restart")
    out.mkdir(parents=True, exist_ok=True)
    config_file.write_text(json.dumps(cfg.to_json(), indent=2) + "\n")
    return last


def train(cfg: TrainConfig, restart: bool = False, progress: bool = True,
          stop_after: int | None = None) -> dict:
    """Run (or resume) one training run; returns its summary.

    stop_after ends the process's work after that many optimizer steps without a final
    checkpoint, as a kill would (used by the tests to check resumption).
    """
    cfg.check()
    device = pick_device(cfg.device)
    resume_from = prepare_out(cfg, restart)
    out = Path(cfg.out)
    tokenizer = Tokenizer.load()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def autocast():
        if device.type == "cuda" and cfg.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    max_tokens = cfg.max_tokens or context_length(cfg)
    if max_tokens > context_length(cfg):
        raise TrainError(f"--max-tokens {max_tokens} exceeds the model's context "
                         f"{context_length(cfg)}")
    objectives = load_objectives(cfg, tokenizer, device, max_tokens)
    projection = cfg.projection_dim
    if projection is None and "distill" in cfg.objective_weights():
        projection = objectives[0].targets.shape[1]
    model = build_model(cfg.init, cfg.seed, attention=cfg.attention, pooling=cfg.pooling,
                        n_positions=cfg.n_positions, projection_dim=projection)
    if "distill" in cfg.objective_weights() and (
            model.config.output_dim != objectives[0].targets.shape[1]):
        raise TrainError(f"the model's output has {model.config.output_dim} dims, the "
                         f"teacher's {objectives[0].targets.shape[1]}: set --projection-dim")
    model.to(device).train()
    optimizer = make_optimizer(model, cfg, device)
    dev = DevSet.load(cfg.dev, tokenizer, max_tokens) if cfg.dev else None

    steps = total_steps(cfg, objectives)
    warmup = int(cfg.warmup * steps)
    start, best = 0, None
    log_path = out / "train_log.jsonl"
    if resume_from is not None:
        state = torch.load(resume_from / "state.pt", map_location=device, weights_only=False)
        weights = from_hf_state_dict(load_file(str(resume_from / "model.safetensors")))
        model.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        start, best = state["step"], state["best"]
        log.info("resuming %s from step %d", out, start)
    # Drop what a killed run logged after its last checkpoint: those steps are redone.
    kept = read_log(log_path, start)
    log_path.write_text("".join(json.dumps(rec) + "\n" for rec in kept))

    n_params = model.num_parameters()
    log.info("training %s (%d parameters) on %s for %d steps: %s", cfg.init, n_params, device,
             steps, ", ".join(f"{o.name}x{o.weight:g}" for o in objectives))
    from tqdm import tqdm

    bar = tqdm(total=steps, initial=start, desc="train", unit="step", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    window_loss = {o.name: torch.zeros((), device=device) for o in objectives}
    window_steps, window_tokens, window_grad_norm = 0, 0, 0.0
    skipped = consecutive_skips = window_skips = 0
    window_start = time.perf_counter()
    run_start = time.perf_counter()
    last_loss = float("nan")
    with open(log_path, "a") as log_file:
        for step in range(start, steps):
            lr = lr_at(step, steps, cfg.lr, warmup, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro in range(cfg.accum):
                k = step * cfg.accum + micro  # the batch index: a pure function of the step
                loss = torch.zeros((), device=device)
                for obj in objectives:
                    with autocast():
                        part, n_tokens = objective_loss(obj, k, model, cfg, device)
                    loss = loss + obj.weight * part
                    window_loss[obj.name] += part.detach() / cfg.accum
                    window_tokens += n_tokens
                (loss / cfg.accum).backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            if math.isfinite(grad_norm):
                optimizer.step()
                window_grad_norm += grad_norm
                consecutive_skips = 0
            else:
                # A non-finite gradient would turn every weight into NaN for good: skip the
                # update, and stop if it keeps happening (the run has diverged).
                skipped += 1
                window_skips += 1
                consecutive_skips += 1
                log.warning("step %d: gradient norm %s, update skipped", step + 1, grad_norm)
                if consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                    raise ValueError(
                        f"training diverged: {consecutive_skips} steps in a row with non-finite "
                        f"gradients (step {step + 1}, lr {lr:.2e}); try a lower --lr")
            optimizer.zero_grad(set_to_none=True)
            window_steps += 1
            done = step + 1
            if done % cfg.log_every == 0 or done == steps:
                losses = {name: float(v) / window_steps for name, v in window_loss.items()}
                elapsed = time.perf_counter() - window_start
                rec = {"step": done, "loss": sum(o.weight * losses[o.name] for o in objectives),
                       **{f"loss_{k}": v for k, v in losses.items()}, "lr": lr,
                       "grad_norm": round(window_grad_norm / max(window_steps - window_skips, 1),
                                          4),
                       "skipped_steps": skipped,
                       "tokens_per_s": round(window_tokens / max(elapsed, 1e-9), 1),
                       "elapsed_s": round(time.perf_counter() - run_start, 2)}
                log_file.write(json.dumps(rec) + "\n")
                log_file.flush()
                last_loss = rec["loss"]
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
                window_loss = {o.name: torch.zeros((), device=device) for o in objectives}
                window_steps, window_tokens, window_grad_norm, window_skips = 0, 0, 0.0, 0
                window_start = time.perf_counter()
            if dev is not None and (done % cfg.eval_every == 0 or done == steps):
                score = dev.spearman(model, device, autocast)
                log_file.write(json.dumps({"step": done, "dev_spearman": score}) + "\n")
                log_file.flush()
                if best is None or score > best:
                    best = score
                    save_checkpoint(model, out, extra={"trained_by": "pipeline train",
                                                       "step": done, "dev_spearman": score})
                bar.set_postfix(loss=f"{last_loss:.4f}", dev=f"{score:.4f}")
                window_start = time.perf_counter()  # tokens/s counts training time only
            if done % cfg.save_every == 0 or done == steps:
                if dev is None:
                    save_checkpoint(model, out, extra={"trained_by": "pipeline train",
                                                       "step": done})
                save_last(out / "last", model, optimizer, done, best)
            bar.update(1)
            if stop_after is not None and done - start >= stop_after and done < steps:
                bar.close()
                return {"stopped_at": done}
    bar.close()
    summary = {"steps": steps, "resumed_from": start, "best_dev_spearman": best,
               "parameters": n_params, "device": device_name(device),
               "seconds_this_process": round(time.perf_counter() - run_start, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


# ---------------------------------------------------------------------------------------------
# Moving checkpoints: fp16 copies, shards of at most N bytes (for transfers), and back


PIECE = ".piece"  # name suffix of a tensor cut into row pieces, e.g. wte.weight.piece1of2


def shard_state_dict(sd: dict[str, torch.Tensor], shard_bytes: int
                     ) -> list[dict[str, torch.Tensor]]:
    """Group tensors into shards of at most shard_bytes; a tensor larger than that (GPT-2's
    token embedding) is cut into row pieces first, which merge_shards puts back together."""
    items: list[tuple[str, torch.Tensor]] = []
    for name, t in sd.items():
        size = t.numel() * t.element_size()
        if size <= shard_bytes or t.dim() == 0:
            items.append((name, t))
            continue
        n = math.ceil(size / shard_bytes)
        for i, piece in enumerate(torch.tensor_split(t, n, dim=0)):
            items.append((f"{name}{PIECE}{i + 1}of{n}", piece.contiguous()))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in items:
        n_bytes = t.numel() * t.element_size()
        if shards[-1] and size + n_bytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n_bytes
    return shards


def join_pieces(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of the cutting in shard_state_dict."""
    out, pieces = {}, {}
    for name, t in sd.items():
        if PIECE in name:
            base, part = name.rsplit(PIECE, 1)
            i, n = (int(x) for x in part.split("of"))
            pieces.setdefault(base, [None] * n)[i - 1] = t
        else:
            out[name] = t
    for base, parts in pieces.items():
        if any(p is None for p in parts):
            raise ValueError(f"{base}: missing pieces")
        out[base] = torch.cat(parts, dim=0)
    return out


def export_checkpoint(src: str | Path, dst: str | Path, dtype: str = "float16",
                      shard_bytes: int | None = None) -> list[Path]:
    """Copy a checkpoint folder as `dtype` (model.safetensors + config.json + the run's logs),
    or, with shard_bytes, as files of at most that size (model-0000i-of-0000n.safetensors +
    model.safetensors.index.json, for transfers; merge_shards joins them)."""
    src, dst = Path(src), Path(dst)
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                   "float32": torch.float32}[dtype]
    sd = {k: v.to(torch_dtype).contiguous()
          for k, v in load_file(str(src / "model.safetensors")).items()}
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    written = []
    if shard_bytes is None:
        save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
        written.append(dst / "model.safetensors")
        config["weights_sha256"] = weights_sha256(dst / "model.safetensors")
    else:
        shards = shard_state_dict(sd, shard_bytes)
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(dst / name), metadata={"format": "pt"})
            written.append(dst / name)
            weight_map.update({k: name for k in shard})
        (dst / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1) + "\n")
        config.pop("weights_sha256", None)
    config["torch_dtype"] = dtype
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for extra in ("train_log.jsonl", "summary.json", "train_config.json"):
        if (src / extra).is_file():
            shutil.copyfile(src / extra, dst / extra)
    return written


def merge_shards(src: str | Path, dst: str | Path) -> Path:
    """Join a sharded checkpoint back into one model.safetensors (+ config.json)."""
    src, dst = Path(src), Path(dst)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    sd = {}
    for name in sorted(set(index["weight_map"].values())):
        sd.update(load_file(str(src / name)))
    dst.mkdir(parents=True, exist_ok=True)
    save_file(join_pieces(sd), str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["weights_sha256"] = weights_sha256(dst / "model.safetensors")
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for extra in ("train_log.jsonl", "summary.json", "train_config.json"):
        if (src / extra).is_file() and src.resolve() != dst.resolve():
            shutil.copyfile(src / extra, dst / extra)
    return dst


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.train.loop")
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="copy a checkpoint as fp16 (optionally sharded)")
    exp.add_argument("src")
    exp.add_argument("dst")
    exp.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    exp.add_argument("--shard-mb", type=float, default=None)
    merge = sub.add_parser("merge", help="join a sharded checkpoint into model.safetensors")
    merge.add_argument("src")
    merge.add_argument("dst")
    args = parser.parse_args(argv)
    if args.command == "export":
        shard = int(args.shard_mb * 1e6) if args.shard_mb else None
        for path in export_checkpoint(args.src, args.dst, args.dtype, shard):
            print(path)
    else:
        print(merge_shards(args.src, args.dst))
    return 0


if __name__ == "__main__":
    sys.exit(main())
