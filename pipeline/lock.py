"""Advisory locks on an index folder: one writer, or any number of readers, at a time.

A command that writes the folder (tokenize, embed, build-index) holds an exclusive `flock` on
INDEX/.lock, with its PID and command written in the file for the others' error message; a
command that reads it (search, cluster, similarity-matrix --index) holds a shared one. Neither
waits: a command that finds the folder busy stops at once with one line saying who holds it,
so nobody is left staring at a silent terminal. The kernel drops a lock when its holder
exits, however it ends (SIGKILL included): no stale lock files to clean up.

Within one thread the lock is taken once: a writer that calls another stage (tokenize --embed
resuming as embed) or a reader inside a writer already holds what it needs. Other threads
(a server's) take their own: shared locks on separate descriptors coexist.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import IndexBusy

LOCK_FILE = ".lock"
_local = threading.local()  # .held: real folder path -> "write" or "read", by this thread


def _held() -> dict[str, str]:
    if not hasattr(_local, "held"):
        _local.held = {}
    return _local.held


def _key(folder: Path) -> str:
    return os.path.realpath(folder)


@contextlib.contextmanager
def writing(folder: Path, command: str) -> Iterator[None]:
    """Hold `folder`'s exclusive lock (creating the folder if needed) while `command` runs."""
    key, held = _key(folder), _held()
    if held.get(key) == "write":
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexBusy(busy_for_writer(folder, fd)) from None
        with contextlib.suppress(OSError):  # a courtesy for others' messages: a full disk
            os.ftruncate(fd, 0)             # must not stop the command holding the lock
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "command": command}).encode(), 0)
        held[key] = "write"
        try:
            yield
        finally:
            del held[key]
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def reading(folder: Path) -> Iterator[None]:
    """Hold `folder`'s shared lock: no writer changes it meanwhile. A folder that is not there
    (or not ours to lock) is left to the reader's own checks to refuse."""
    key, held = _key(folder), _held()
    if key in held or not folder.is_dir():
        yield
        return
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except PermissionError:  # a read-only folder: nobody can be writing it through us
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexBusy(f"{folder} is being written by {holder(fd)}: try again when it "
                            "ends") from None
        held[key] = "read"
        try:
            yield
        finally:
            del held[key]
    finally:
        os.close(fd)


def holder(fd: int) -> str:
    """Who holds the exclusive lock, as its holder wrote it: 'PID 123 (`pipeline embed`)'.
    A holder writes it just after taking the lock: a read in between finds the file empty
    (or half written), so it is read again for a moment before giving up."""
    for _ in range(50):
        try:
            info = json.loads(os.pread(fd, 4096, 0))
            return f"PID {info['pid']} (`pipeline {info['command']}`)"
        except (ValueError, KeyError, TypeError):
            time.sleep(0.01)
    return "another command"


def busy_for_writer(folder: Path, fd: int) -> str:
    """Why a writer cannot have the lock: another writer, or readers."""
    probe = os.open(folder / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)  # succeeds if only readers hold it
        return (f"{folder} is being read by another command (search, cluster, ...): try again "
                "when it ends")
    except BlockingIOError:
        return f"{folder} is being written by {holder(fd)}: wait for it to end, or use another " \
               "--index"
    finally:
        os.close(probe)
