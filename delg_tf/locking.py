"""One writer per output: an exclusive OS lock on a folder (or a lock file) while writing.

    with output_lock(logdir, f"--logdir={logdir}"):
        ...  # write checkpoints, summaries, ...

`output_lock` opens (creating it if needed) a lock file -- `<folder>/.delg_tf.lock`, or
the file given with `name=None` -- and takes `fcntl.flock(LOCK_EX | LOCK_NB)` on it:
taking the lock and checking that nobody holds it are one system call, so two writers
starting at the same moment cannot both get it (no check-then-create race). The holder
then writes its pid, host, start time and command line into the file (JSON), for the
messages of the others. A second writer does not wait: it raises `LockedError`, one line
naming the holder (pid, host, start time, command), the lock file and the fix (wait for
that run to end, stop it, or use another folder). The lock is held until the block ends;
then the lock file is removed (while still locked: see `_acquire` for why that is safe).

A lock left by a dead process is taken over safely: the kernel releases a flock when the
last file descriptor of its holder is closed, so when a holder dies (even kill -9, a
crash, OOM) its lock is free; the next writer simply gets it (the file still names the
dead holder: it is logged as taken over, then rewritten). No pid-liveness guess, no
stale-lock timeout. The descriptor is not inherited across `exec` (Python's default), but
a child made by a bare `fork()` (multiprocessing's "fork" start method) shares it: the
lock then lasts until that child exits too.

Readers never need the lock: every writer of the package publishes complete files only
(`delg_tf.atomic`, the store's parts), so a reader sees old or new content, never half.

Caveats:
* Network file systems: on Linux, NFS clients implement flock with NFS byte-range locks
  (NLM for NFSv3, the protocol itself for NFSv4), so writers on different machines do
  exclude each other -- unless the share is mounted with `nolock` / `local_lock=all`
  (then the lock is local to each machine), or the server has no lock service (flock
  fails: one `ConfigError` line). A holder whose machine dies keeps its lock until the
  server notices (the NFSv4 lease, ~90 s by default; NLM: when the client reboots).
  Other network file systems (SMB, FUSE mounts such as gcsfuse) may not lock at all.
* Object stores (`gs://`, `s3://`, ... paths) have no locks: `output_lock` logs a
  warning and writes without one.
* Within one process, two `output_lock`s on the same file also exclude each other
  (flock locks belong to an open file, not to a process).

Imports nothing from delg_tf but `configs`, so that every room can use it.
"""

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import logging
import os
import re
import shlex
import socket
import sys
from pathlib import Path
from typing import Optional

from delg_tf.configs import ConfigError

logger = logging.getLogger(__name__)

LOCK_NAME = ".delg_tf.lock"
LOCK_SUFFIX = ".lock"
# Opening the file again after the path was replaced under us (see `_acquire`).
MAX_OPEN_ATTEMPTS = 10
# The holder's record is small; more than this is not a record of ours.
MAX_RECORD_BYTES = 64 * 1024
MAX_COMMAND_CHARS = 400
LOCK_FILE_MODE = 0o644
# `gs://...`, `s3://...` (a Path of one reads `gs:/...`); not a drive letter `C:/`.
URL_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")
BUSY_ERRNOS = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


class LockedError(ConfigError):
    """Another process holds the lock of an output: one line naming the holder (pid,
    host, start time, command), the lock file and the fix.

    A `ConfigError` (a ValueError), so that every entry module reports it as one
    `error:` line with exit code `delg_tf.cli.EXIT_USAGE_ERROR`.

    Attributes:
      path: the lock file.
      holder: the holder's record (`pid`, `host`, `started`, `command`), or None if
        it could not be read (not written yet, or not ours).
    """

    def __init__(self, message, path, holder=None):
        super().__init__(message)
        self.path, self.holder = Path(path), holder


@dataclasses.dataclass
class OutputLock:
    """What `output_lock` yields.

    Attributes:
      path: the lock file (None: a remote path, written without a lock).
      holder: this process's record written into it.
      previous: the record found in the file when the lock was taken (a holder that
        died without releasing it), or None.
    """

    path: Optional[Path]
    holder: dict
    previous: Optional[dict] = None


def sibling_lock_file(path) -> Path:
    """`<folder>/.<name>.lock` beside `path`: the lock of an output that is created by
    a rename (a staged directory), so that it cannot hold its own lock file.
    """
    path = Path(path).absolute()
    return path.with_name(f".{path.name}{LOCK_SUFFIX}")


def lock_file_path(directory_or_file, name=LOCK_NAME) -> Path:
    """The lock file of `directory_or_file`: `<it>/<name>`, or (`name=None`) itself."""
    path = Path(directory_or_file)
    return path if name is None else path / name


def holder_record() -> dict:
    """This process's record: pid, host, start time (local ISO 8601), command line."""
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(str(a) for a in argv),
    }


def read_holder(path) -> Optional[dict]:
    """The record in the lock file `path`, or None (absent, empty, half written, not
    ours). Reading needs no lock.
    """
    try:
        with open(path, "rb") as f:
            return _parse_record(f.read(MAX_RECORD_BYTES))
    except OSError:
        return None


def _parse_record(data: bytes) -> Optional[dict]:
    try:
        record = json.loads(data.decode("utf-8"))
    except ValueError:  # empty, half written, or not ours (UnicodeDecodeError too).
        return None
    return record if isinstance(record, dict) and "pid" in record else None


def describe_holder(holder: Optional[dict]) -> str:
    """`pid 123 on host h (started ..., command: ...)`, or a note that it is unknown."""
    if holder is None:
        return "another process (it has not written its pid into the lock file yet)"
    command = " ".join(str(holder.get("command", "?")).split())  # one line
    if len(command) > MAX_COMMAND_CHARS:
        command = command[:MAX_COMMAND_CHARS] + "..."
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (started "
        f"{holder.get('started', '?')}, command: {command})"
    )


def _locked_error(what, path, holder) -> LockedError:
    stop = f"stop it (kill {holder.get('pid')} on {holder.get('host')})" if holder else "stop it"
    return LockedError(
        f"{what} is being written by {describe_holder(holder)}; one writer per output "
        f"(lock file {path}): wait for that run to end, {stop}, or use another folder.",
        path,
        holder,
    )


def _acquire(path: Path, what: str) -> int:
    """An open descriptor of `path` holding its exclusive flock.

    After locking, the descriptor must still be the file at `path`: a holder removes
    the file (while locked) on release, so a process that opened the old file just
    before may get a lock on a file nobody else will ever open; it then starts again
    with the new file. Hence removing the file on release is safe.
    """
    for _ in range(MAX_OPEN_ATTEMPTS):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, LOCK_FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _parse_record(os.pread(fd, MAX_RECORD_BYTES, 0))
            os.close(fd)
            if e.errno in BUSY_ERRNOS:
                raise _locked_error(what, path, holder) from e
            raise ConfigError(
                f"{what}: cannot lock {path} ({os.strerror(e.errno)}): this file system "
                "has no file locks (e.g. NFS without a lock service); write to a local "
                "folder or one on a file system with locks."
            ) from e
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # released by its holder meanwhile: lock the new file.
    raise ConfigError(
        f"{what}: the lock file {path} keeps being replaced; another process "
        "is taking and releasing it in a loop: stop it, or use another folder."
    )


@contextlib.contextmanager
def output_lock(directory_or_file, what, name=LOCK_NAME):
    """Holds the exclusive lock of an output for the duration of the block.

    Args:
      directory_or_file: the output folder (created if missing; its lock file is
        `<folder>/<name>`), or with `name=None` the lock file itself (e.g. the
        `sibling_lock_file` of an output created by a rename; its folder is created if
        missing). A URL such as `gs://...` (an object store) is written without a
        lock (a warning is logged).
      what: how messages name the output, e.g. `--logdir=/runs/r50`.
      name: the lock file's name in the folder (writers of different parts of one
        folder, e.g. extraction shards, use one name each); None: see above.

    Yields:
      `OutputLock` (the lock file, this holder's record, a dead holder's record).

    Raises:
      LockedError: another process (or another `output_lock` of this process) holds
        it; one line naming the holder and the fix.
      ConfigError: the file system has no file locks.
    """
    if URL_PATTERN.match(os.fspath(directory_or_file)):
        logger.warning(
            "%s: %s has no file locks; writing without one (make sure no other run writes there).",
            what,
            directory_or_file,
        )
        yield OutputLock(None, holder_record())
        return
    path = lock_file_path(directory_or_file, name).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, what)
    try:
        previous = _parse_record(os.pread(fd, MAX_RECORD_BYTES, 0))
        if previous is not None:
            logger.info(
                "%s: took over the lock %s left by %s, which is no longer running",
                what,
                path,
                describe_holder(previous),
            )
        holder = holder_record()
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode("utf-8"), 0)
        os.fsync(fd)
        yield OutputLock(path, holder, previous)
    finally:
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):  # not if replaced by hand
                path.unlink()  # still locked: see `_acquire`.
        os.close(fd)  # releases the lock.
