"""Moving a finished model: a copy in another dtype, shards of at most N bytes (a device call
returns files of limited size), and the merge of those shards back into one file."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.errors import InputFileError
from pipeline.hashing import file_sha256
from pipeline.train.checkpoints import RUN_RECORDS

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
INDEX = "model.safetensors.index.json"
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
            raise InputFileError(f"{base}: missing pieces")
        out[base] = torch.cat(parts, dim=0)
    return out


def require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise InputFileError(f"{path.parent} is not {what} (no {path.name})")
    return path


def copy_run_records(src: Path, dst: Path) -> None:
    if src.resolve() == dst.resolve():
        return
    for name in RUN_RECORDS:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def save_shards(sd: dict[str, torch.Tensor], dst: Path, shard_bytes: int) -> list[Path]:
    """model-0000i-of-0000n.safetensors and the index that maps each tensor to its file."""
    shards = shard_state_dict(sd, shard_bytes)
    written, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(dst / name), metadata={"format": "pt"})
        written.append(dst / name)
        weight_map.update({k: name for k in shard})
    (dst / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1)
                             + "\n")
    return written


def export_checkpoint(src: str | Path, dst: str | Path, dtype: str = "float16",
                      shard_bytes: int | None = None) -> list[Path]:
    """Copy a checkpoint folder as `dtype` (model.safetensors + config.json + the run's logs),
    or, with shard_bytes, as files of at most that size (model-0000i-of-0000n.safetensors +
    model.safetensors.index.json, for transfers; merge_shards joins them). Returns the weight
    files written."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    src, dst = Path(src), Path(dst)
    config = json.loads(require(src / "config.json", "a checkpoint folder").read_text())
    weights = require(src / "model.safetensors", "a checkpoint folder")
    sd = {k: v.to(DTYPES[dtype]).contiguous() for k, v in load_file(str(weights)).items()}
    dst.mkdir(parents=True, exist_ok=True)
    if shard_bytes is None:
        save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
        written = [dst / "model.safetensors"]
        config["weights_sha256"] = file_sha256(dst / "model.safetensors")
    else:
        written = save_shards(sd, dst, shard_bytes)
        config.pop("weights_sha256", None)
    config["torch_dtype"] = dtype
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_run_records(src, dst)
    return written


def merge_shards(src: str | Path, dst: str | Path) -> Path:
    """Join a sharded checkpoint back into one model.safetensors (+ config.json)."""
    src, dst = Path(src), Path(dst)
    index = json.loads(require(src / INDEX, "a sharded checkpoint").read_text())
    config = json.loads(require(src / "config.json", "a sharded checkpoint").read_text())
    sd = {}
    for name in sorted(set(index["weight_map"].values())):
        sd.update(load_file(str(require(src / name, "a complete sharded checkpoint"))))
    dst.mkdir(parents=True, exist_ok=True)
    save_file(join_pieces(sd), str(dst / "model.safetensors"), metadata={"format": "pt"})
    config["weights_sha256"] = file_sha256(dst / "model.safetensors")
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_run_records(src, dst)
    return dst
