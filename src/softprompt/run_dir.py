"""Run directory records: written atomically, so a directory is either complete or says it is not.

`metrics.json` always carries `status`: `running` while training, then `completed`, or
`failed` or `preempted` with a `reason`. Readers (reports, sweep resumption) trust only `completed`.
`RunRecord` is the one writer of those statuses: it takes a run on only once the command has
accepted it, and a failed command removes only the files and folders it created itself.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import platform
import secrets
import shutil
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from softprompt.errors import as_user_error

METRICS = "metrics.json"
# written by `softprompt-predict --ensemble` into the folder of the prompts it combined
ENSEMBLE = "ensemble.json"
TRAIN_LOG = "train_log.jsonl"
# a generation task's written answers for the evaluated inputs, with their references and scores
PREDICTIONS = "predictions.jsonl"
ENV = "env.json"
TASK = "task.json"
PROMPT_DIR = "prompt"
# Hydra's record of the run's config, in Hydra's own layout: other commands read .hydra/config.yaml
HYDRA_DIR = ".hydra"
# the key of the config a run was trained with (softprompt.sweep.config_key)
KEY_FIELD = "config_key"
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
LIBRARIES = ("softprompt", "torch", "transformers", "peft", "accelerate", "datasets", "evaluate", "hydra-core")
# keys whose values are wall-clock measurements; everything else in metrics.json is deterministic
TIMING_KEYS = ("train_seconds", "train_samples_per_second", "eval_seconds")
ENDED = ("completed", "failed", "preempted")


def write_text(path: Path, text: str) -> None:
    """Write to a temporary file beside the target, then rename: readers never see half a file.

    The file is created as `open` creates any file, so its mode follows the umask (0644 under 022);
    a failed write removes the temporary file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "x", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def replace_dir(build: Path, target: Path) -> None:
    """Swap a freshly written folder into place; the old one goes only once the new one is complete."""
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(build, target)
    if old.exists():
        shutil.rmtree(old)


def build_dir(target: Path, fill: Callable[[Path], None]) -> None:
    """Write a folder beside `target` with `fill(build)`, then swap it in; a failed build leaves nothing behind."""
    build = target.with_name(f".{target.name}.build")
    shutil.rmtree(build, ignore_errors=True)
    try:
        fill(build)
        replace_dir(build, target)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise


def mark(run_dir: Path, status: str, **fields: Any) -> dict:
    """Merge fields into metrics.json with a new status."""
    path = run_dir / METRICS
    record = read_json(path) if path.is_file() else {}
    record.update(fields, status=status)
    if status in ("running", "completed"):
        record.pop("reason", None)
    write_json(path, record)
    return record


def status(run_dir: Path) -> str | None:
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return None
    try:
        return read_json(path).get("status")
    except (json.JSONDecodeError, OSError):
        return None


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment(
    num_processes: int, device: str, per_device_batch: int, grad_accum: int, seed: int, sharding: str
) -> dict:
    """What it takes to reproduce a run: library versions, hardware, and the batch actually seen per step."""
    return {
        "versions": {name: _version(name) for name in LIBRARIES},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "num_processes": num_processes,
        # none: each process held the whole backbone; fsdp: its layers sharded across the processes
        "sharding": sharding,
        "per_device_batch_size": per_device_batch,
        "grad_accum": grad_accum,
        "effective_batch_size": per_device_batch * num_processes * grad_accum,
        "seed": seed,
        "torch_threads": torch.get_num_threads(),
    }


# run directory -> the folders of its path that did not exist before Hydra made it (NewFoldersCallback)
_NEW_FOLDERS: dict[str, list[Path]] = {}


def new_folders(run_path: Path) -> list[Path]:
    """The folders of `run_path` (itself, then parents) this command's Hydra created, deepest first."""
    return _NEW_FOLDERS.get(os.path.abspath(run_path), [])


class NewFoldersCallback(Callback):
    """Note, before Hydra makes the run directory, which folders of its path do not exist yet: those, and only
    those, a command that fails before it takes the run on removes again (registered in conf/train.yaml,
    before the processes callback, so every rank is still waiting there and none has made the folder yet)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        path = Path(os.path.abspath(str(config.hydra.run.dir)))
        _NEW_FOLDERS[str(path)] = [folder for folder in (path, *path.parents) if not folder.exists()]


class RunRecord:
    """The one writer of a run directory's lifecycle: start, complete, fail, preempt.

    Nothing is written before `start`, which the command calls once it has accepted the run (config,
    checkpoint, data and model all checked and loaded): it writes `.hydra/` (as Hydra would, kept
    from Hydra until then), attaches the log file (holding the lines logged so far) and marks the
    run `running`. Used as a context manager it is the run's failure policy: an exception before
    `start` removes the folders this command created (`new_folders`) and nothing else; after it,
    the run is marked `failed` with the reason (where that can still be written), or `preempted`
    for a second Ctrl-C. Only the main process writes; on the others every method writes nothing.
    """

    def __init__(
        self,
        path: Path,
        key: str | None = None,
        *,
        new_folders: list[Path] | None = None,
        hydra_files: dict[str, str] | None = None,
        log_name: str | None = None,
        main: bool | None = None,
    ) -> None:
        self.path = Path(path)
        self.key = key
        self.new_folders = new_folders or []
        self.hydra_files = hydra_files or {}
        self.main = PartialState().is_main_process if main is None else main
        self.started = False
        self.status: str | None = None
        self._log_name = log_name
        # the lines logged before `start`, for the log file; dropped if the run is never taken on
        self._pending = logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1)
        self._log_file: logging.Handler | None = None
        if self.main and log_name:
            logging.getLogger().addHandler(self._pending)

    def __enter__(self) -> RunRecord:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: object) -> None:
        try:
            if isinstance(error, KeyboardInterrupt):
                self.preempt(
                    "stopped at once by a second SIGINT; start the same run again to resume from its last checkpoint"
                )
            elif isinstance(error, Exception):
                user_error = as_user_error(error)
                self.fail(str(user_error) if user_error is not None else f"{type(error).__name__}: {error}")
        finally:
            self.close()

    def start(self, fresh: bool = False, **fields: Any) -> None:
        """Take the run on and mark it running; `fresh`: an earlier attempt's record is replaced, not merged into."""
        if not self.main:
            self.started = True
            return
        if not self.started:
            self.path.mkdir(parents=True, exist_ok=True)
            for name, text in self.hydra_files.items():
                write_text(self.path / HYDRA_DIR / name, text)
            self._open_log()
            self.started = True
        self._mark("running", fresh=fresh, **fields)

    def complete(self, **result: Any) -> None:
        self._mark("completed", **result)

    def fail(self, reason: str, **fields: Any) -> None:
        """Mark the run failed with its reason; a run not taken on yet leaves only what was there before."""
        if self.status != "failed":
            self._end("failed", reason=reason, **fields)

    def preempt(self, reason: str) -> None:
        if self.status not in ENDED:
            self._end("preempted", reason=reason)

    def _end(self, status: str, **fields: Any) -> None:
        if not self.main:
            return
        if not self.started:
            self.discard()
            return
        self._remove_temporaries()
        try:
            self._mark(status, **fields)
        except OSError as error:
            if as_user_error(error) is None:
                raise
            # the disk that refused the run's files refuses its record too: the command's error line says why
            self.status = status

    def discard(self) -> None:
        """Remove the folders this command created, deepest first: the run directory with what this command
        wrote into it, a parent only while empty. Anything that existed before stays as it was."""
        self.close()
        for folder in self.new_folders:
            if folder == self.path:
                shutil.rmtree(folder, ignore_errors=True)
                continue
            try:
                folder.rmdir()
            except OSError:
                return

    def write(self, name: str, data: Any) -> None:
        """One JSON record of the run (env.json, task.json), from the main process."""
        if self.main:
            write_json(self.path / name, data)

    def append_log(self, entry: dict) -> None:
        """One line of train_log.jsonl, from the main process."""
        if self.main:
            with open(self.path / TRAIN_LOG, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry, sort_keys=True) + "\n")

    def close(self) -> None:
        """Detach this run's log handlers (the command ends, or the run is not taken on)."""
        root = logging.getLogger()
        for handler in (self._pending, self._log_file):
            if handler is not None and handler in root.handlers:
                root.removeHandler(handler)
        self._pending.close()
        if self._log_file is not None:
            self._log_file.close()

    def _open_log(self) -> None:
        if not self._log_name:
            return
        self._log_file = logging.FileHandler(self.path / self._log_name, encoding="utf-8")
        self._log_file.setFormatter(logging.Formatter(LOG_FORMAT))
        root = logging.getLogger()
        root.addHandler(self._log_file)
        self._pending.setTarget(self._log_file)
        self._pending.flush()
        root.removeHandler(self._pending)

    def _mark(self, status: str, fresh: bool = False, **fields: Any) -> None:
        if not self.main:
            return
        key = {KEY_FIELD: self.key} if self.key is not None else {}
        if fresh:
            write_json(self.path / METRICS, {**key, **fields, "status": status})
        else:
            mark(self.path, status, **key, **fields)
        self.status = status

    def _remove_temporaries(self) -> None:
        """Half-written files of this run (a write the disk refused, a second Ctrl-C in the middle of one)."""
        for leftover in (*self.path.glob(".*.build"), *self.path.glob(".*.tmp")):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
