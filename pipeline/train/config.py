"""The options of one training run, and which of their combinations can work."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from pipeline.errors import TrainError
from pipeline.train.losses import DISTILL_LOSSES


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
    # One teacher spec, or an ensemble "SPEC*W+SPEC*W" (weights normalised to sum to 1).
    teacher: str | None = None
    teacher_dim: int | None = None  # PCA of the teacher's vectors for the pointwise term
    distill_loss: str = "cosine"
    distill_weight: float = 1.0  # the pointwise term (cosine or MSE to the teacher's vector)
    relational_weight: float = 0.0  # the in-batch similarity distribution term (KL)
    relational_temperature: float = 0.05
    pairs: str | None = None  # TSV with sentence1, sentence2, label, score (STS-B train)
    mnrl_pairs: str | None = None  # label-1 pairs for MNRL (default: those of --pairs)
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
            # Its two terms carry their own weights (objectives.objective_loss).
            weights["distill"] = float(self.distill_weight > 0 or self.relational_weight > 0)
        if self.pairs:
            weights["cosent"] = self.cosent_weight
        if self.pairs or self.mnrl_pairs:
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
        if self.relational_temperature <= 0:
            raise TrainError("--relational-temperature must be positive")
        if self.teacher_dim is not None and self.teacher_dim < 1:
            raise TrainError("--teacher-dim must be at least 1")
        if self.teacher:
            from pipeline.train.ensemble import parse_teacher

            parse_teacher(self.teacher)  # a malformed spec fails before anything loads
        if "mnrl" in self.objective_weights() and self.pair_batch_size < 2:
            raise TrainError("MNRL needs --pair-batch-size of at least 2 (in-batch negatives)")

    def resume_conflicts(self, saved: TrainConfig) -> list[str]:
        """The fields in which a saved run differs from this one in a way that changes it."""
        return [f.name for f in fields(self) if f.name not in self.RESUME_FREE
                and getattr(saved, f.name) != getattr(self, f.name)]

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
