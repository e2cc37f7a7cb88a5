"""Training experiments on a lent GPU, in one call: teacher vectors once, then runs in order
until a deadline, each result (dev and test Spearman, steps, time) written as it comes.

    PYTHONPATH=. python3 benchmarks/train_gpu.py --out $OUT --plan explore --deadline 540

Carried from here (see benchmarks/train_gpu.sh): .cache/gpu/ (packed teacher + xz corpus,
made by benchmarks/train_pack.py) and .cache/gpt2.tiktoken. Model selection uses dev only;
test numbers are reported, never used to choose. The best gpt2-mini model comes back as fp16
shards in $OUT/default/ (the device returns files of at most 16 MB).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.train_pack import unpack_teacher
from pipeline.analysis.evaluate import evaluate_embedder, read_pairs
from pipeline.embed.encoder import Encoder
from pipeline.train.checkpoints import RUN_RECORDS
from pipeline.train.config import TrainConfig
from pipeline.train.data import read_texts, unique_texts
from pipeline.train.export import export_checkpoint
from pipeline.train.loop import train
from pipeline.train.objectives import teacher_targets

log = logging.getLogger("train_gpu")
RUNS = Path("/tmp/runs")
TEACHER_DIR = Path("/tmp/teacher")
DISTILL_DATA = (".cache/gpu/distill_sentences.txt.xz", "data_sets/debian_packages.parquet")
# --dry-run (CPU, minutes): a slice of the corpus, the tiny preset, budgets / 20.
DRY = {"on": False, "device": "cuda", "init": "gpt2-mini", "scale": 1.0}


def env_info() -> dict:
    def sh(cmd: str) -> str:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"gpu": gpu, "torch": torch.__version__,
            "nvidia_smi": sh("nvidia-smi --query-gpu=name,memory.total,driver_version "
                             "--format=csv,noheader"),
            "make": sh("command -v make"), "cpus": sh("nproc")}


def distill_config(name: str, **kw) -> TrainConfig:
    base = TrainConfig(out=str(RUNS / name), init=DRY["init"], attention="bidirectional",
                       pooling="mean", n_positions=256, max_tokens=256,
                       distill_data=DISTILL_DATA, teacher=f"st:{TEACHER_DIR}",
                       dev="data_sets/dev.tsv", steps=100, batch_size=256, lr=1e-3,
                       eval_every=1000, save_every=1000, log_every=100, device=DRY["device"])
    return replace(base, **kw)


def cosent_config(name: str, init: str, **kw) -> TrainConfig:
    base = TrainConfig(out=str(RUNS / name), init=init, pairs="data_sets/train.tsv",
                       dev="data_sets/dev.tsv", epochs=4, pair_batch_size=32, lr=1e-4,
                       warmup=0.1, eval_every=45, save_every=10_000, log_every=45,
                       device=DRY["device"])
    cfg = replace(base, **kw)
    return replace(cfg, epochs=None, steps=30, eval_every=10) if DRY["on"] else cfg


def steps_per_second(cfg: TrainConfig, probe_steps: int = 60) -> float:
    """Solo speed of a configuration, from a short throw-away run (first 20 steps warm up)."""
    probe = replace(cfg, out=cfg.out + "-probe", steps=probe_steps, log_every=20,
                    eval_every=10**9, save_every=10**9, dev=None)
    train(probe, restart=True, progress=False)
    recs = [json.loads(x) for x in Path(probe.out, "train_log.jsonl").read_text().splitlines()]
    first, last = recs[0], recs[-1]
    return (last["step"] - first["step"]) / (last["elapsed_s"] - first["elapsed_s"])


class Session:
    def __init__(self, out: Path, deadline: float):
        self.out, self.deadline, self.start = out, deadline, time.time()
        self.results: dict = {"env": env_info(), "runs": []}
        self.test = read_pairs("data_sets/test.tsv")
        self.dev = read_pairs("data_sets/dev.tsv")

    def left(self) -> float:
        return self.deadline - (time.time() - self.start)

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1) + "\n")

    def run(self, cfg: TrainConfig, note: str = "") -> dict:
        t = time.time()
        summary = train(cfg, restart=True, progress=False)
        seconds = time.time() - t
        enc = Encoder.load(cfg.out, DRY["device"], precision="fp32")  # the padded path
        embed = lambda texts: enc.embed_texts(texts, 32768)  # noqa: E731
        test = evaluate_embedder(embed, self.test, self.dev)
        rec = {"name": Path(cfg.out).name, "note": note, "init": cfg.init,
               "attention": enc.model.config.attention, "pooling": enc.pooling,
               "steps": summary["steps"], "seconds": round(seconds, 1),
               "dev_spearman": summary["best_dev_spearman"],
               "test_spearman": test["spearman"], "test_pearson": test["pearson"],
               "test": test, "out": cfg.out, "elapsed_total": round(time.time() - self.start)}
        self.results["runs"].append(rec)
        self.save()
        log.info("%s: dev %.4f test %.4f (%d steps, %.0f s)", rec["name"], rec["dev_spearman"],
                 rec["test_spearman"], rec["steps"], seconds)
        return rec

    def distill_then_cosent(self, name: str, seconds: float, cosent_variants: dict,
                            **kw) -> list[dict]:
        cfg = distill_config(name, **kw)
        rate = steps_per_second(cfg)
        steps = max(20, int(rate * seconds * DRY["scale"]))
        self.results.setdefault("rates", {})[name] = rate
        cfg = replace(cfg, steps=steps, eval_every=max(1, steps // 4),
                      save_every=max(1, steps // 4), log_every=max(1, steps // 100))
        recs = [self.run(cfg, f"distill {seconds:.0f}s at {rate:.1f} steps/s")]
        for suffix, ckw in cosent_variants.items():
            if self.left() < 20:
                break
            recs.append(self.run(cosent_config(f"{name}+{suffix}", cfg.out, **ckw), suffix))
        return recs


def plan_explore(s: Session) -> None:
    # CUDA kernels load lazily, one per new tensor shape, so the first steps of a process are
    # slow: a throw-away probe first, or the next probe underestimates the speed (see
    # docs/training.md, call 1).
    steps_per_second(distill_config("warm-up"))
    # 220 s of distillation, less if the teacher took long: the export must come back.
    main = s.distill_then_cosent("mini-bi-mean", max(60, min(220, s.left() - 170)), {
        "cosent": {},
        "cosent-lr5e-5": {"lr": 5e-5},
        "cosent-lr2e-4-bs64": {"lr": 2e-4, "pair_batch_size": 64},
        "cosent+mnrl": {"mnrl_weight": 0.5},
        # CoSENT's 4 epochs of 32 pairs (716 steps), each step also distilling 256 texts
        "cosent+distill": {"distill_data": DISTILL_DATA, "teacher": f"st:{TEACHER_DIR}",
                           "batch_size": 256, "max_tokens": 256, "epochs": None,
                           "steps": 716},
    })
    best = max((r for r in main if "+" in r["name"]), key=lambda r: r["dev_spearman"])
    export_checkpoint(best["out"], s.out / "default", "float16", shard_bytes=15_000_000)
    for extra in RUN_RECORDS:
        (s.out / "default" / extra).unlink()  # in logs.tar.gz: at most 8 files come back
    s.results["exported"] = best["name"]
    s.save()
    if s.left() > 60:
        big = distill_config("gpt2-probe", init="gpt2" if not DRY["on"] else "gpt2-tiny",
                             lr=5e-4, batch_size=256)
        s.results.setdefault("rates", {})["gpt2-124M"] = steps_per_second(big, 30)
        s.save()
    short = {"cosent": {}}
    for name, kw in [("mini-bi-mean-45s", {}),
                     ("mini-bi-wmean-45s", {"pooling": "weighted-mean"}),
                     ("mini-causal-wmean-45s", {"attention": "causal",
                                                "pooling": "weighted-mean"})]:
        if s.left() < 75:
            break
        s.distill_then_cosent(name, 45, short, **kw)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plan", default="explore", choices=["explore"])
    parser.add_argument("--deadline", type=float, default=540)
    parser.add_argument("--dry-run", action="store_true", help="CPU rehearsal, tiny model")
    args = parser.parse_args(argv)
    if args.dry_run:
        global DISTILL_DATA
        DRY.update(on=True, device="cpu", init="gpt2-tiny", scale=0.05)
        small = Path("/tmp/dry_corpus.txt")
        small.write_text("\n".join(read_texts(DISTILL_DATA[0])[:3000]) + "\n")
        DISTILL_DATA = (str(small),)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    s = Session(args.out, args.deadline)
    t = time.time()
    unpack_teacher(Path(".cache/gpu/teacher"), TEACHER_DIR)
    texts = unique_texts([read_texts(p) for p in DISTILL_DATA])
    teacher_targets(texts, f"st:{TEACHER_DIR}", DRY["device"], ".cache/teacher")
    s.results["teacher_seconds"] = round(time.time() - t, 1)
    s.results["distill_texts"] = len(texts)
    s.save()
    try:
        {"explore": plan_explore}[args.plan](s)
    finally:
        s.results["total_seconds"] = round(time.time() - s.start, 1)
        s.save()
        with tarfile.open(args.out / "logs.tar.gz", "w:gz") as tar:
            for path in sorted(RUNS.glob("*/*.json*")):
                tar.add(path, arcname=str(path.relative_to(RUNS)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
