"""Run directory records: written atomically, so a directory is either complete or says it is not.

`metrics.json` always carries `status`: `running` while training, then `completed`, or
`failed` or `preempted` with a `reason`. Readers (reports, sweep resumption) trust only `completed`.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

METRICS = "metrics.json"
# written by `softprompt-predict --ensemble` into the folder of the prompts it combined
ENSEMBLE = "ensemble.json"
TRAIN_LOG = "train_log.jsonl"
ENV = "env.json"
PROMPT_DIR = "prompt"
LIBRARIES = ("softprompt", "torch", "transformers", "peft", "accelerate", "datasets", "evaluate", "hydra-core")
# keys whose values are wall-clock measurements; everything else in metrics.json is deterministic
TIMING_KEYS = ("train_seconds", "train_samples_per_second", "eval_seconds")


def write_json(path: Path, data: Any) -> None:
    """Write to a temporary file beside the target, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
        temporary = Path(handle.name)
    os.replace(temporary, path)


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


def append_log(run_dir: Path, entry: dict) -> None:
    with open(run_dir / TRAIN_LOG, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, sort_keys=True) + "\n")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment(num_processes: int, device: str, per_device_batch: int, grad_accum: int, seed: int) -> dict:
    """What it takes to reproduce a run: library versions, hardware, and the batch actually seen per step."""
    return {
        "versions": {name: _version(name) for name in LIBRARIES},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "num_processes": num_processes,
        "per_device_batch_size": per_device_batch,
        "grad_accum": grad_accum,
        "effective_batch_size": per_device_batch * num_processes * grad_accum,
        "seed": seed,
        "torch_threads": torch.get_num_threads(),
    }
