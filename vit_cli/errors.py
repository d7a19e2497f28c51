"""The one exception type that the CLI turns into a short message instead of a traceback,
and the write errors of a full disk, which it reports the same way."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

# A full disk, a full quota, or a file-size limit (ulimit -f).
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class UserError(Exception):
    """A problem with the user's config, files or data, with a message that says the fix."""


def first_line(error: Exception) -> str:
    """A library's exception as one line for a UserError: its type and first line."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def no_space_error(error: BaseException | None) -> OSError | None:
    """The full-disk OSError behind `error`, if there is one. torch.save reports a failed
    write as a RuntimeError, and TensorBoard's writer thread as a later error of its own;
    each keeps the OSError as its context."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _NO_SPACE:
            return error
        error = error.__cause__ or error.__context__
    return None


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def no_space_message(folder: Path, error: OSError, needed: int | None = None) -> str:
    """What could not be written where, the space it needed and the space there is."""
    target = f"{error.filename}" if error.filename else f"in {folder}"
    try:
        free = f"{megabytes(shutil.disk_usage(folder).free)} free in {folder}"
    except OSError:
        free = f"the free space in {folder} unknown"
    need = f"it needed about {megabytes(needed)}, " if needed is not None else ""
    return f"Could not write {target}: {error.strerror}; {need}{free}."
