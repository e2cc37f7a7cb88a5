"""End-to-end embedding benchmark: raw text -> token shards -> embedding shards on disk, against
the baseline a user would otherwise write (Hugging Face GPT2Model), in the same run.

    python benchmarks/embed_bench.py [--docs 500000] [--preset gpt2] [--out DIR]

Reports tokens/s and docs/s of both, their ratio, model FLOP utilisation against a bf16 matmul
measured in the same run, the packed fixed-shape forward (the practical ceiling of stock
kernels), peak GPU memory, the card, the share of time in each part, and the cosine of our
vectors to an fp32 reference. Runs on CPU too (smaller --docs), where the baseline is
transformers in fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline.embed.encoder import Encoder
from pipeline.embed.overlap import run_tokenize_and_embed
from pipeline.embed.stage import run_embed
from pipeline.folder import IndexFolder
from pipeline.model.checkpoint import random_model, save_checkpoint
from pipeline.text.stage import TokenizeSettings, run_tokenize

DEBIAN = Path(__file__).resolve().parent.parent / "data_sets" / "debian_packages.parquet"


def make_corpus(path: Path, n_docs: int, seed: int = 0) -> None:
    """Real English words (Debian descriptions) cut into documents of lognormal length: mean
    ~30 words (~40 tokens), a tail past 400 words (>512 tokens, split into windows)."""
    words = " ".join(pq.read_table(DEBIAN, columns=["text"])["text"].to_pylist()).split()
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(22), 0.8, n_docs).astype(int), 2, 600)
    starts = rng.integers(0, len(words) - 600, n_docs)
    with open(path, "w") as fh:
        for start, n in zip(starts, lengths, strict=True):
            fh.write(" ".join(words[start:start + n]) + "\n")


# The CPU's matrix and vector units that decide which precision is fast, best first.
ISA_FLAGS = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"), ("avx512_vnni", "VNNI"),
             ("avx_vnni", "AVX-VNNI"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))


def cpu_isa(flags: set[str]) -> str:
    """The units of ISA_FLAGS that /proc/cpuinfo's flags name, e.g. 'AVX-512 BF16, VNNI'."""
    return ", ".join(name for flag, name in ISA_FLAGS if flag in flags) or "no AVX2"


def cpu_name() -> str:
    """/proc/cpuinfo's model name, the core count and the ISA (every CPU figure carries it)."""
    name, flags = platform.processor(), set()
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else ():
        if line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
    return f"{name} ({os.cpu_count()} cores; {cpu_isa(flags)})"


def fill_kernel_cache(spec: str, device: torch.device, precision: str = "auto") -> float:
    """Compile the fused Triton kernel once in a separate process, as any earlier run on this
    machine would have: Triton keeps compiled kernels on disk, and the timed run (a process
    of its own for a user) then loads it from there (~0.6 s, still timed) instead of
    compiling cold (~2 s, once per machine). Returns the seconds it took."""
    import subprocess

    t = time.perf_counter()
    code = ("import sys, torch; from pipeline.embed.encoder import compile_ahead; "
            "thread = compile_ahead(*sys.argv[1:]); thread and thread.join()")
    subprocess.run([sys.executable, "-c", code, spec, str(device), precision], check=True)
    return time.perf_counter() - t


def cuda_sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_tflops(device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / float(np.median(times)) / 1e12


def fp8_matmul_tflops(device: torch.device, m: int = 65536, k: int = 768, n: int = 3072
                      ) -> float | None:
    """FP8 e4m3 `_scaled_mm` TFLOP/s on one of GPT-2's layer shapes (c_fc: M x 768 x 3072),
    rowwise scales and bf16 out as model/fp8.py calls it; None where FP8 does not run."""
    from pipeline.model.fp8 import FP8, unsupported_reason

    if device.type != "cuda" or unsupported_reason(device) is not None:
        return None
    a = torch.randn(m, k, device=device).to(FP8)
    b = torch.randn(n, k, device=device).to(FP8).t()
    sa = torch.ones(m, 1, device=device)
    sb = torch.ones(1, n, device=device)
    run = lambda: torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)  # noqa: E731
    for _ in range(3):
        run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        run()
    end.record()
    torch.cuda.synchronize()
    return 2 * m * k * n * 20 / (start.elapsed_time(end) / 1e3) / 1e12


def flops_per_token(cfg, mean_len: float) -> float:
    """Matmul FLOPs of one token's forward: 2 x weights it meets + attention scores/values."""
    per_layer = 2 * 12 * cfg.n_embd**2 + 2 * 2 * mean_len * cfg.n_embd
    return cfg.n_layer * per_layer


def packed_ceiling(encoder: Encoder, batch: int = 512, seq: int = 128, iters: int = 20,
                   compile: bool = False) -> float:
    """Tokens/s of our bf16 forward on perfectly packed, fixed (batch x seq) shapes: eager,
    or under torch.compile (whose minute of compiling is left out here)."""
    if encoder.device.type != "cuda":
        return float("nan")
    ids = torch.randint(0, 50257, (batch, seq), device=encoder.device)
    mask = torch.ones_like(ids)
    embed = torch.compile(encoder.model.embed) if compile else encoder.model.embed
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            embed(ids, mask)
        cuda_sync()
        t = time.perf_counter()
        for _ in range(iters):
            embed(ids, mask)
        cuda_sync()
    return batch * seq * iters / (time.perf_counter() - t)


def host_to_device_seconds(index: Path, device: torch.device) -> float:
    """Time to copy every token id of the index to the GPU from pinned memory, as embed does."""
    if device.type != "cuda":
        return 0.0
    seconds = 0.0
    for shard in sorted((index / "tokens").glob("*.parquet")):
        column = pq.read_table(shard, columns=["tokens"])["tokens"].combine_chunks()
        ids = torch.from_numpy(column.values.to_numpy().astype(np.int32)).pin_memory()
        cuda_sync()
        t = time.perf_counter()
        ids.to(device, non_blocking=True)
        cuda_sync()
        seconds += time.perf_counter() - t
    return seconds


def transformers_baseline(folder: Path, texts: list[str], device: torch.device,
                          max_tokens: int, bf16: bool = True) -> dict:
    """What a user would write: tiktoken ids, HF GPT2Model (sdpa), bf16 autocast on CUDA
    (on the CPU only with `bf16`), length-sorted batches of 128, masked mean pooling, vectors
    back on the CPU."""
    import transformers

    from pipeline.text.tokenizer import Tokenizer

    model = transformers.GPT2Model.from_pretrained(folder, attn_implementation="sdpa").float()
    model = model.to(device).eval()
    tok = Tokenizer.load()
    cuda_sync()
    t0 = time.perf_counter()
    ids = [x[:max_tokens] for x in tok.encode_batch(texts)]
    order = np.argsort([len(x) for x in ids])
    out = np.zeros((len(ids), model.config.n_embd), dtype=np.float32)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=device.type == "cuda" or bf16)
    with torch.inference_mode(), autocast:
        for i in range(0, len(order), 128):
            rows = order[i:i + 128]
            width = max(len(ids[r]) for r in rows)
            batch = torch.zeros((len(rows), width), dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):
                batch[j, :len(ids[r])] = torch.tensor(ids[r])
                mask[j, :len(ids[r])] = 1
            batch, mask = batch.to(device), mask.to(device)
            hidden = model(input_ids=batch, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1)
            out[rows] = torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy()
    seconds = time.perf_counter() - t0
    n_tokens = sum(len(x) for x in ids)
    return {"seconds": seconds, "tokens": n_tokens, "tokens_per_s": n_tokens / seconds,
            "docs_per_s": len(ids) / seconds}


def fp32_cosines(encoder_spec: str, device: str, index: Path, sample: int) -> np.ndarray:
    """Cosine of each stored vector to an fp32 padded-batch reference of the same rows."""
    ref = Encoder.load(encoder_spec, device, precision="fp32")
    tokens = pq.read_table(index / "tokens" / "part-00000.parquet", columns=["tokens"])
    token_lists = tokens["tokens"].to_pylist()[:sample]
    expected = ref.embed_flat(*flat(token_lists), 8192)
    ours = IndexFolder(index).load_vectors()[:len(token_lists)]
    return (expected * ours).sum(1)


def flat(token_lists):
    offsets = np.zeros(len(token_lists) + 1, dtype=np.int64)
    np.cumsum([len(t) for t in token_lists], out=offsets[1:])
    return np.concatenate([np.asarray(t, dtype=np.int32) for t in token_lists]), offsets


def scaling(docs: int, preset: str) -> dict:
    """Embed-stage tokens/s on one GPU and on all of them, over the same token shards."""
    work = Path(tempfile.mkdtemp(prefix="embed-scaling-"))
    try:
        corpus = work / "corpus.txt"
        make_corpus(corpus, docs)
        run_tokenize(corpus, work / "idx", TokenizeSettings(max_tokens=512, shard_rows=50_000))
        spec = str(save_checkpoint(random_model(preset, 0), work / "model"))
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        rates = {}
        for used in (devices[:1], devices):
            t = time.perf_counter()
            stats = run_embed(work / "idx", model=spec, device=used[0], dtype="float16",
                              overwrite=True, devices=used)["stats"]
            rates[len(used)] = stats["tokens"] / (time.perf_counter() - t)
        return {"gpus": len(devices), "card": torch.cuda.get_device_name(),
                "tokens_per_s": rates, "speedup": rates[len(devices)] / rates[1]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cpu_summary(card: str, result: dict) -> str:
    """The last line of a CPU run: only what a CPU run measures (no GPU ceiling or share)."""
    ours, base, staged = result["ours"], result["baseline"], result["staged"]
    bf16 = base["bf16_autocast"]
    return (f"\n{card}: ours {ours['tokens_per_s'] / 1e3:.1f}k tok/s end to end "
            f"({ours['docs_per_s']:,.0f} docs/s, {result['precision']}); transformers fp32 "
            f"{base['tokens_per_s'] / 1e3:.1f}k ({result['ratio_vs_baseline']:.2f}x), bf16 "
            f"autocast {bf16['tokens_per_s'] / 1e3:.1f}k "
            f"({base['ratio_vs_bf16_autocast']:.2f}x); stage after stage "
            f"{staged['tokens_per_s'] / 1e3:.1f}k tok/s; tokenize busy "
            f"{ours['tokenize_s'] / ours['seconds']:.0%} of the wall; min cosine "
            f"{result['cosine_vs_fp32']['min']:.5f}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=500_000)
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--model", default=None,
                        help="a checkpoint folder instead of random:PRESET (e.g. the default)")
    parser.add_argument("--batch-tokens", type=int, default=0, help="0: the encoder's default")
    parser.add_argument("--baseline-docs", type=int, default=0,
                        help="baseline on the first N docs only (0 = all)")
    parser.add_argument("--out", type=Path, default=None, help="write results JSON here")
    parser.add_argument("--device", default=None)
    parser.add_argument("--precision", default="auto",
                        help="ours: auto, fp32, bf16 or fp8 (the baseline stays as it is)")
    parser.add_argument("--compile", action="store_true",
                        help="also report the packed-shape ceiling under torch.compile")
    parser.add_argument("--scaling", action="store_true",
                        help="only compare the embed stage on one GPU and on all GPUs")
    args = parser.parse_args()
    if args.scaling:
        print(json.dumps(scaling(args.docs, args.preset), indent=2))
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    work = Path(tempfile.mkdtemp(prefix="embed-bench-"))
    try:
        # Random weights saved as a checkpoint first, as a user's model would be: loading it
        # is then part of the timed run, GPT-2's random init is not.
        spec = args.model or str(save_checkpoint(random_model(args.preset, 0), work / "model"))
        corpus = work / "corpus.txt"
        make_corpus(corpus, args.docs)
        texts = corpus.read_text().splitlines()
        encoder = Encoder.load(spec, str(device), precision=args.precision)
        kernel_cache_s = fill_kernel_cache(spec, device, args.precision) \
            if device.type == "cuda" else 0.0
        max_tokens = min(512, encoder.max_tokens)
        settings = TokenizeSettings(max_tokens=max_tokens, overlap=32)

        # Ours, end to end: raw text -> tokens/ and embeddings/ on disk, the two stages
        # overlapping (`pipeline tokenize --embed`).
        cuda_sync()
        torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
        t0 = time.perf_counter()
        tok, emb = run_tokenize_and_embed(corpus, work / "idx", settings, model=spec,
                                          device=str(device), dtype="float16",
                                          batch_tokens=args.batch_tokens or None,
                                          precision=args.precision)
        cuda_sync()
        t1 = time.perf_counter()
        n_tokens, n_rows = tok["stats"]["tokens"], tok["stats"]["rows"]
        ours = {"seconds": t1 - t0, "tokens": n_tokens, "rows": n_rows,
                "tokens_per_s": n_tokens / (t1 - t0), "docs_per_s": args.docs / (t1 - t0),
                "tokenize_s": tok["stats"]["seconds"],
                **{k: emb["stats"].get(k) for k in ("read_s", "queue_s", "gpu_s", "write_s",
                                                    "models_ready_at_s", "first_tokens_at_s",
                                                    "first_shard_at_s", "last_vectors_at_s")},
                "h2d_s": host_to_device_seconds(work / "idx", device)}
        peak_gb = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0

        # The same, stage after stage (`pipeline tokenize`, then `pipeline embed`).
        t0 = time.perf_counter()
        run_tokenize(corpus, work / "staged", settings)
        t1 = time.perf_counter()
        run_embed(work / "staged", model=spec, device=str(device), dtype="float16",
                  batch_tokens=args.batch_tokens or None, precision=args.precision)
        cuda_sync()
        t2 = time.perf_counter()
        staged = {"seconds": t2 - t0, "tokens_per_s": n_tokens / (t2 - t0),
                  "tokenize_s": t1 - t0, "embed_s": t2 - t1}
        shutil.rmtree(work / "staged")

        cos = fp32_cosines(spec, str(device), work / "idx", 4096)
        ceiling = packed_ceiling(encoder)
        try:
            compiled_ceiling = packed_ceiling(encoder, compile=True) if args.compile else None
        except Exception as err:  # reported, not fatal: the eager ceiling is the bar's
            compiled_ceiling = f"failed: {type(err).__name__}: {err}"[:300]
        tflops = matmul_tflops(device)
        fp8_tflops = fp8_matmul_tflops(device)
        mean_len = n_tokens / n_rows
        fpt = flops_per_token(encoder.model.config, mean_len)

        folder = Path(spec)
        base_texts = texts[:args.baseline_docs] if args.baseline_docs else texts
        base = transformers_baseline(folder, base_texts, device, max_tokens, bf16=False)
        if device.type == "cpu":  # on a CPU a user may or may not think of bf16 autocast
            base_bf16 = transformers_baseline(folder, base_texts, device, max_tokens)
            base["bf16_autocast"] = base_bf16
            base["ratio_vs_bf16_autocast"] = ours["tokens_per_s"] / base_bf16["tokens_per_s"]

        card = torch.cuda.get_device_name() if device.type == "cuda" else cpu_name()
        result = {
            "card": card, "device": str(device),
            "model": args.model or f"random:{args.preset}:0 (saved as a checkpoint)",
            "docs": args.docs,
            "torch": torch.__version__, "tokens": n_tokens, "mean_tokens_per_row": mean_len,
            "ours": ours, "staged": staged, "baseline": base,
            "ratio_vs_baseline": ours["tokens_per_s"] / base["tokens_per_s"],
            "packed_ceiling_tokens_per_s": ceiling,
            "packed_ceiling_compiled_tokens_per_s": compiled_ceiling,
            "share_of_ceiling": ours["tokens_per_s"] / ceiling if ceiling == ceiling else None,
            "bf16_matmul_tflops": tflops,
            "precision": encoder.precision,
            "mfu": ours["tokens_per_s"] * fpt / (tflops * 1e12) if tflops == tflops else None,
            "fp8_matmul_tflops": fp8_tflops,
            "mfu_vs_fp8": ours["tokens_per_s"] * fpt / (fp8_tflops * 1e12)
            if fp8_tflops else None,
            "peak_gpu_gb": peak_gb,
            "kernel_cache_fill_s": kernel_cache_s,
            "cosine_vs_fp32": {"min": float(cos.min()), "mean": float(cos.mean()),
                               "n": int(len(cos))},
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    if device.type == "cpu":
        print(cpu_summary(card, result))
        return 0
    total = ours["seconds"]
    print(f"\n{card}: ours {ours['tokens_per_s'] / 1e6:.2f}M tok/s "
          f"({ours['docs_per_s']:,.0f} docs/s), baseline {base['tokens_per_s'] / 1e6:.2f}M "
          f"tok/s, ratio {result['ratio_vs_baseline']:.2f}x; ceiling "
          f"{ceiling / 1e6:.2f}M tok/s ({result['share_of_ceiling'] or 0:.0%} of it); time "
          f"busy shares of the wall (overlapping): tokenize {ours['tokenize_s'] / total:.0%}, "
          f"GPU compute {ours['gpu_s'] / total:.0%}, host-to-device "
          f"{ours['h2d_s'] / total:.1%}, reading {ours['read_s'] / total:.0%}, writing "
          f"{ours['write_s'] / total:.0%}; stage after stage: "
          f"{staged['tokens_per_s'] / 1e6:.2f}M tok/s; min cosine {cos.min():.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
