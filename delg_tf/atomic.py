"""Writing files and folders so that a reader never sees a half-written one.

Files (`atomic_write`, `atomic_path`, `write_text_atomic`, `write_bytes_atomic`,
`write_json_atomic`): the content goes to a temporary file in the target's folder
(`.<name>.<random>.tmp`), is flushed and fsynced, then renamed over the target
(`os.replace`, atomic on POSIX). On an error (disk full, a kill, an exception of the
writer) the target keeps its old content or stays absent, and the temporary file is
removed (a killed process leaves it behind: it ends in `TMP_SUFFIX`, which readers
ignore and writers may delete).

Folders (`staged_directory`): written under a temporary sibling, then renamed into
place (an existing folder is moved aside first, then deleted).

Imports nothing from delg_tf, so that every room can use it.
"""

import contextlib
import json
import os
import shutil
import uuid
import errno
from pathlib import Path

TMP_SUFFIX = ".tmp"
# errno values meaning "this folder cannot take our files" (a permission, a file in the
# way, a full or read-only disk): reported as one line naming the folder, not as a bug.
OUTPUT_FOLDER_ERRNOS = frozenset(
    {
        errno.EACCES,
        errno.EPERM,
        errno.ENOTDIR,
        errno.EEXIST,
        errno.EISDIR,
        errno.ENOSPC,
        errno.EROFS,
        errno.EDQUOT,
    }
)
_RANDOM_CHARS = 8


def _random_tag() -> str:
    return uuid.uuid4().hex[:_RANDOM_CHARS]


def temporary_path(path) -> Path:
    """A new temporary name next to `path`: `<folder>/.<name>.<random>.tmp`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{_random_tag()}{TMP_SUFFIX}")


def _fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path, *, parents=False, fsync=True):
    """Yields a temporary path next to `path` for writers that take a file name (h5py,
    `tf.io.TFRecordWriter`, ...); once the block succeeds, the file written there is
    fsynced and renamed onto `path`.

    Args:
      path: the file to (re)write.
      parents: create the missing folders of `path` first.
      fsync: fsync the file before the rename (the content is on disk when the new
        name appears).

    Yields:
      The temporary `Path` (not created: the writer creates it).
    """
    path = Path(path)
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # e.g. disk full: never leave a partial file behind.


@contextlib.contextmanager
def atomic_write(path, mode="w", *, encoding="utf-8", parents=False, fsync=True):
    """`open(path, mode)` whose content replaces `path` only once the block succeeds.

    Args:
      path: the file to (re)write.
      mode: "w" (text, `encoding`) or "wb" (bytes).
      encoding: text encoding (ignored in binary mode).
      parents: create the missing folders of `path` first.
      fsync: flush and fsync before the rename.

    Yields:
      The open file object (of the temporary file).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', received {mode!r}.")
    with atomic_path(path, parents=parents, fsync=False) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())


def write_text_atomic(path, text: str, *, encoding="utf-8", parents=False) -> Path:
    """Writes `text` to `path` atomically (see the module doc); returns `path`."""
    with atomic_write(path, "w", encoding=encoding, parents=parents) as f:
        f.write(text)
    return Path(path)


def write_bytes_atomic(path, data: bytes, *, parents=False) -> Path:
    """Writes `data` to `path` atomically (see the module doc); returns `path`."""
    with atomic_write(path, "wb", parents=parents) as f:
        f.write(data)
    return Path(path)


def write_json_atomic(obj, path, *, end="", parents=False, **dumps_kwargs) -> Path:
    """Writes `json.dumps(obj, **dumps_kwargs) + end` to `path` atomically (UTF-8);
    returns `path`.
    """
    return write_text_atomic(path, json.dumps(obj, **dumps_kwargs) + end, parents=parents)


def _sibling(path, kind):
    return path.parent / f".{path.name}.{kind}-{_random_tag()}"


@contextlib.contextmanager
def staged_directory(target):
    """Yields a temporary sibling of `target` to write into; publishes it on success.

    On leaving the block without an exception the temporary directory replaces
    `target` (an existing `target` is first moved aside, then deleted; an empty one is
    simply removed), so `target` is always either the old complete content or the new
    one. On an exception the temporary directory is deleted and `target` is untouched.

    Args:
      target: the directory to (re)write. Its parent is created if needed.

    Yields:
      Path of the temporary directory (not created: writers such as
      `tf.saved_model.save` create it).
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "tmp")
    try:
        yield tmp
        old = None
        if target.exists() and any(target.iterdir()):
            old = _sibling(target, "old")
            os.replace(target, old)
        elif target.exists():
            target.rmdir()
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
