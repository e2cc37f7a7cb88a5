"""`--device`: a name we cannot run on is one line naming the devices there are, never a
traceback from deep in torch (mps, xpu, meta are device types torch knows, not ones an encoder
runs on)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers_index import random_unit_vectors, write_embedded_folder
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.embed.device import available_devices, pick_device
from pipeline.errors import UsageError

TINY = ["--model", "random:gpt2-tiny"]
NOT_HERE = ["bogus", "mps", "meta", "xpu", "cuda:x", f"cuda:{torch.cuda.device_count()}"]


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: --device "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_available_devices_are_cpu_then_each_gpu():
    devices = available_devices()
    assert devices == ["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    assert all(pick_device(name) == torch.device(name) for name in devices)


@pytest.mark.parametrize("name", NOT_HERE)
def test_pick_device_refuses_what_is_not_here(name):
    with pytest.raises(UsageError, match=f"devices here: {', '.join(available_devices())}$"):
        pick_device(name)


@pytest.mark.parametrize("name", NOT_HERE)
def test_embed_device_is_one_line(name):
    result = CliRunner().invoke(app, ["embed", "--sentence", "hi", *TINY, "--device", name])
    assert result.exit_code == 1, result.output
    line = one_error_line(result.stderr)
    assert name in line and line.endswith(", ".join(available_devices()))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_on_a_cpu_machine_is_one_line():
    # A real process, as a user runs it: nothing of the CLI runner's in between.
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "embed", "--sentence", "hi",
                             *TINY, "--device", "cuda"], capture_output=True, text=True)
    assert result.returncode == 1
    assert one_error_line(result.stderr) == (
        "error: --device cuda: no CUDA device here; devices here: cpu")


@pytest.mark.parametrize("name", ["bogus", "mps"])
def test_search_device_is_one_line(tmp_path, name):
    # An index of the tiny model's width: search loads that model, then the device fails.
    write_embedded_folder(tmp_path / "idx", random_unit_vectors(20, 32),
                          identity={"model": "random:gpt2-tiny"})
    result = CliRunner().invoke(app, ["search", "hello", "--index", str(tmp_path / "idx"),
                                      "--device", name])
    assert result.exit_code == 1, result.output
    assert name in one_error_line(result.stderr)
