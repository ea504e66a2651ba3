"""Writing an export directory so that a reader never sees a half-written one."""

import contextlib
import os
import shutil
import uuid
from pathlib import Path

_SUFFIX_LENGTH = 8


def _sibling(path, kind):
    return path.parent / f".{path.name}.{kind}-{uuid.uuid4().hex[:_SUFFIX_LENGTH]}"


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
