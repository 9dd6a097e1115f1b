"""User-facing errors: a mistake the user can fix gets one line and exit status 2, never a traceback.

One failure policy for every command (`exit_on_user_error`): a UserError, or a write the file system
refused (disk full, no permission), is one `error: ...` line on stderr and exit status 2; Ctrl-C
ends the command with exit status 130 and no traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

EXIT_USER_ERROR = 2
# what a shell reports for a process that SIGINT (Ctrl-C) ended
EXIT_INTERRUPTED = 128 + signal.SIGINT
# a read or write the file system refused for a reason the user can fix: disk full, quota, permissions, read-only
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)

F = TypeVar("F", bound=Callable)


class UserError(Exception):
    """A mistake in what the user asked for (config, data, paths); the message is the whole explanation."""


class ConfigError(UserError):
    """A config value that is not allowed: names the key, the value and what is allowed."""

    def __init__(self, key: str, value, allowed: str):
        super().__init__(f"{key}={value!r} is not allowed: {allowed}")
        self.key, self.value, self.allowed = key, value, allowed


class DataError(UserError):
    """Bad input data: names the file, and the row and column where known."""

    def __init__(self, message: str, path=None, row: int | None = None, column: str | None = None):
        where = ", ".join(
            part
            for part in (
                str(path) if path is not None else "",
                f"row {row}" if row is not None else "",
                f"column {column!r}" if column is not None else "",
            )
            if part
        )
        super().__init__(f"{where}: {message}" if where else message)


class StorageError(UserError):
    """The file system refused a read or write (disk full, no permission): names the path and the cause."""

    def __init__(self, error: OSError):
        where = f"{error.filename}: " if error.filename is not None else ""
        super().__init__(f"{where}{error.strerror or error}")


def as_user_error(error: BaseException) -> UserError | None:
    """The one-line error an exception is for the user, or None for a bug (which keeps its traceback)."""
    if isinstance(error, UserError):
        return error
    if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
        return StorageError(error)
    return None


def exit_on_user_error(main: F) -> F:
    """Wrap a command's entry point in the failure policy: a user error is one line on stderr and exit status 2,
    Ctrl-C is exit status 130, neither with a traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            sys.exit(EXIT_INTERRUPTED)
        except Exception as error:
            user_error = as_user_error(error)
            if user_error is None:
                raise
            print(f"error: {user_error}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)

    return wrapper  # type: ignore[return-value]


def folder_problem(path: Path) -> str | None:
    """Why `path` cannot be a folder this process writes into (None when it can): a file in the way, or no write access."""
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def read_record(path: Path, way_out: str) -> dict:
    """A JSON record (metrics.json, ensemble.json) as a mapping; one that is cut short or is not a JSON object is a
    UserError naming the file, what is wrong and `way_out`."""
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is damaged ({type(error).__name__}: {error}): {way_out}") from None
    if not isinstance(record, dict):
        raise UserError(f"{path} is damaged (a JSON {type(record).__name__}, not an object): {way_out}")
    return record
