"""User-facing errors: a mistake the user can fix gets one line and exit status 2, never a traceback."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

EXIT_USER_ERROR = 2

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


def exit_on_user_error(main: F) -> F:
    """Wrap a command's entry point so a UserError prints one line on stderr and exits with status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
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
