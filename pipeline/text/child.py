"""The tokenizing child process of `pipeline tokenize --embed`, both sides of it.

The parent (`TokenizeChild`, used by embed/overlap.py) starts `tokenize_child` in a fresh
interpreter (children.py) and reads what it sends on an inherited pipe: ("shard", record,
table) for each token shard as soon as it is written, then ("done", section) or ("error",
exception).

A process of its own, not a thread: reading and cutting documents is Python work that, beside
the thread driving the GPU, would wait for the GIL most of the time (docs/performance.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict
from multiprocessing.connection import Connection
from pathlib import Path

from pipeline.children import die_with_parent, start_function
from pipeline.errors import ChildFailed
from pipeline.text.stage import TokenizeSettings, run_tokenize

# ---------------------------------------------------------------------------------------------
# The parent's side


class TokenizeChild:
    """The tokenize stage in a child process, its shards arriving here. Ctrl-C reaches only
    this process (the child runs in a session of its own), which stops the child (and the
    child's workers) itself."""

    def __init__(self, corpus, index_dir: Path, settings: TokenizeSettings, force: bool):
        read_fd, write_fd = os.pipe()
        job = json.dumps({"corpus": str(corpus), "index_dir": str(index_dir),
                          "settings": asdict(settings), "force": force, "fd": write_fd,
                          "parent": os.getpid()})
        self.process = start_function(tokenize_child, [job], pass_fds=[write_fd])
        os.close(write_fd)
        self._receive = Connection(read_fd, writable=False)

    def messages(self) -> Iterator[tuple]:
        """The child's messages as they arrive, until it ends. A message cut by the child's
        death ends them silently (`died` says so); a report that does not unpickle here
        comes as ("error", ChildFailed) and stops the child, since nobody reads the pipe any
        more."""
        try:
            while True:
                # Poll rather than wait for EOF: a killed child's workers may hold the pipe.
                if not self._receive.poll(0.1):
                    if self.process.poll() is None:
                        continue  # still working
                    if not self._receive.poll(0):
                        return  # ended, and nothing left to read
                yield self._receive.recv()
        except (EOFError, OSError, pickle.UnpicklingError):
            return  # the child died mid-message
        except Exception as err:  # a report that does not unpickle here
            self.process.terminate()
            yield "error", ChildFailed(f"the tokenizing process failed: {err}")

    def died(self) -> ChildFailed:
        return ChildFailed(
            f"the tokenizing process ended unexpectedly (exit code {self.process.poll()})")

    def stop(self, asked_to_stop: bool) -> None:
        """Wait for the child to end (SIGTERM first if it must stop early: it removes its
        tokens.tmp on the way out), then kill whatever is left of its process group: the
        workers of a child that was killed would otherwise live on, holding the pipe open."""
        child = self.process
        if asked_to_stop and child.poll() is None:
            child.terminate()
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        if child.returncode != 0:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)

    def close(self) -> None:
        self._receive.close()


# ---------------------------------------------------------------------------------------------
# The child's side


def tokenize_child(job: str) -> None:
    """The child process (`TokenizeChild`): the tokenize stage, each shard sent on the
    inherited pipe as soon as it is written, then ("done", section) or ("error", exception).
    SIGTERM stops it cleanly (no tokens.tmp left)."""
    from tqdm import tqdm

    stopped = stop_on_sigterm()
    job = json.loads(job)
    die_with_parent(job["parent"])
    conn = Connection(job["fd"], readable=False)
    close_in_workers(job["fd"])
    try:
        with tqdm(unit="doc", desc="tokenize", file=sys.stderr, delay=1) as bar:
            section = run_tokenize(job["corpus"], job["index_dir"],
                                   TokenizeSettings(**job["settings"]), progress=bar,
                                   force=job["force"], locked=True,  # by the parent
                                   on_shard=lambda record, table: conn.send(
                                       ("shard", record, table)))
        conn.send(("done", section))
    except BaseException as err:
        if stopped or isinstance(err, BrokenPipeError):
            return  # the parent asked for the stop, or is gone: nobody reads a report
        report_error(conn, err)


def stop_on_sigterm() -> list[int]:
    """SIGTERM raises SystemExit, so that the stage's clean-up runs; the list returned gets
    the signal's number once it came."""
    stopped: list[int] = []

    def stop(signum, frame):
        stopped.append(signum)
        raise SystemExit(1)

    signal.signal(signal.SIGTERM, stop)
    return stopped


def close_in_workers(fd: int) -> None:
    """Close the pipe `fd` in the worker processes forked from here: otherwise they would hold
    it open, and a reader would wait forever for the rest of a message cut by a kill."""
    tokenizer_pid = os.getpid()

    def close_pipe_in_worker():
        if os.getppid() == tokenizer_pid:  # a worker, not a process a worker forks
            with contextlib.suppress(OSError):
                os.close(fd)

    os.register_at_fork(after_in_child=close_pipe_in_worker)


def report_error(conn: Connection, err: BaseException) -> None:
    try:
        conn.send(("error", err))
    except Exception:  # an exception that does not pickle, or nobody listening
        with contextlib.suppress(Exception):
            conn.send(("error", RuntimeError(f"{type(err).__name__}: {err}")))
