"""Train the GPT-2 encoder: distillation, CoSENT and in-batch-negatives contrastive learning.

One `loop.train()` call is one run with one schedule; a recipe chains runs (each starting from
the last one's output, see docs/training.md). Within a run every objective draws its own batch
each micro-step and the weighted losses are summed:

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

Modules: config (the options), losses (losses and lr schedule), data (texts, tokens, batch
plans), objectives (each objective's data and loss), model (the model to train, its optimizer),
dev (the dev score that picks the best checkpoint), checkpoints (the run folder), loop (the
run), export (fp16 copies and shards of a finished model).
"""
