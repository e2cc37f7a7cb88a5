"""The helper processes of a run: `tokenize --embed`'s tokenizer, the embed stage's layout
planners.

Each is a fresh Python interpreter: not a fork of this process, which runs CUDA threads, and
not multiprocessing's spawn, which re-imports the caller's __main__ in the child (a script
importing torch cost seconds there; one without a __main__ guard would fail). Each runs in a
session of its own, so that Ctrl-C reaches only the parent, which stops its children itself,
and each dies with its parent.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def start_python(code: str, args: list[str], pass_fds: list[int]) -> subprocess.Popen:
    """`python -c code *args` with this package importable and the file descriptors
    `pass_fds` inherited, in a session of its own."""
    package_parent = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)}
    return subprocess.Popen([sys.executable, "-c", code, *args], pass_fds=pass_fds, env=env,
                            start_new_session=True)


def start_function(function: Callable[..., None], args: list[str], pass_fds: list[int]
                   ) -> subprocess.Popen:
    """`function(*args)`, args as strings, in a fresh interpreter (`start_python`). The child
    imports it by its module and name, so the parent's call cannot drift from the function's
    definition (and `ps` shows the function's name)."""
    module, name = function.__module__, function.__qualname__
    return start_python(f"import sys; from {module} import {name}; {name}(*sys.argv[1:])",
                        args, pass_fds)


def die_with_parent(parent: int) -> None:
    """Linux: SIGTERM this process when its parent dies (even by SIGKILL), so a killed run
    leaves no helper behind (a tokenizer would race the rerun for tokens.tmp)."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the line above
        raise SystemExit(1)
