"""Checkpoints: everything a run needs to continue exactly where it stopped, in safetensors and JSON only.

`run_dir/checkpoint/` holds the trainable parameters (prompt and head), the optimiser and scheduler
state, the random states of python, numpy, torch (and CUDA), the data order (the shuffle
generator's state at the start of the current epoch and how many batches of it were consumed),
the best-so-far metrics, the open log window, and the best prompt saved so far. It is built
beside its final place and swapped in whole (`run_dir.replace_dir`), so a kill at any moment
leaves either the previous checkpoint or the new one.

Nothing here is ever unpickled: tensors go to one safetensors file and everything else to JSON.
A checkpoint folder holding pickle files (`*.bin`, `*.pkl`, `*.pt`, `*.pth`) is refused, since
loading a pickle can run arbitrary code.

The random states saved are the main process's; every process starts from the same seed and
draws the same amounts, so they are the same on every process.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from softprompt import run_dir as records
from softprompt import sharding
from softprompt.config import TrainConfig
from softprompt.errors import UserError
from softprompt.identity import comparable_config

CHECKPOINT_DIR = "checkpoint"
STATE = "state.json"
TENSORS = "tensors.safetensors"
BEST_PROMPT = "best_prompt"
FORMAT = 1
PICKLE_SUFFIXES = (".bin", ".pkl", ".pickle", ".pt", ".pth")


@dataclass
class Progress:
    """Where the training loop stands; with the tensors, all it needs to go on exactly."""

    step: int = 0
    epoch: int = 0
    # micro-batches of the current epoch already consumed
    batches_in_epoch: int = 0
    # Accelerate's gradient-accumulation counter, which decides the next sync step
    accelerator_step: int = 0
    samples: int = 0
    seconds: float = 0.0
    # step 0's and the best step's metrics on the rows evaluated during training
    initial: dict[str, float] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    # step 0's on the whole split, when those rows are task.eval_rows of it
    initial_full: dict[str, float] = field(default_factory=dict)
    best_step: int = 0
    # every evaluation during training, step 0 included: {"step": ..., metric: value, ...}
    curve: list[dict[str, float]] = field(default_factory=list)
    stale: int = 0
    # the train_log window not yet written
    window_samples: int = 0
    window_batches: int = 0
    window_loss: float = 0.0
    # train_log.jsonl's size at this point: lines a killed run wrote later are cut on resume
    log_bytes: int = 0
    # the final metrics record, once the run has completed
    result: dict[str, Any] | None = None


@dataclass
class Snapshot:
    """A checkpoint found on disk and checked against the config, not yet loaded into a model."""

    folder: Path
    progress: Progress
    state: dict[str, Any]


def _refuse_pickle(folder: Path) -> None:
    pickles = sorted(path.name for path in folder.iterdir() if path.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UserError(
            f"{folder} holds pickle files ({', '.join(pickles)}), which can run code when loaded; "
            "softprompt checkpoints are safetensors and JSON only: remove them or set trainer.resume=never"
        )


def find(run_path: Path, cfg: TrainConfig) -> Snapshot | None:
    """The checkpoint to resume from under `cfg.trainer.resume`, checked before any model loads."""
    mode = cfg.trainer.resume
    if mode == "never":
        return None
    folder = run_path / CHECKPOINT_DIR
    # a kill between the two renames of replace_dir leaves the previous checkpoint under .old
    candidates = [path for path in (folder, folder.with_name(f".{CHECKPOINT_DIR}.old")) if path.is_dir()]
    if not candidates:
        if mode == "must":
            raise UserError(f"trainer.resume=must but {run_path} holds no checkpoint to resume from")
        return None
    folder = candidates[0]
    _refuse_pickle(folder)
    try:
        state = records.read_json(folder / STATE)
        progress = Progress(**state["progress"])
        if state["format"] != FORMAT:
            raise ValueError(f"format {state['format']}, this version reads format {FORMAT}")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(
            f"{folder} is not a readable softprompt checkpoint ({error}); set trainer.resume=never to start over"
        ) from None
    ours, theirs = comparable_config(cfg), state["config"]
    changed = sorted(key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key))
    if changed:
        shown = "; ".join(f"{key}: {theirs.get(key)!r} -> {ours.get(key)!r}" for key in changed[:3])
        raise UserError(
            f"{run_path} holds a checkpoint of another config ({shown}{'; ...' if len(changed) > 3 else ''}): "
            "run the same config to resume, choose another hydra.run.dir, or set trainer.resume=never to start over"
        )
    if progress.result is None:
        _check_tensors(folder / TENSORS)
    return Snapshot(folder, progress, state)


def _check_tensors(path: Path) -> None:
    """The tensors a resumed run needs are there and whole: read the header (a truncated file fails here), not the data."""
    try:
        with safe_open(str(path), "pt") as handle:
            handle.keys()
    except (OSError, SafetensorError) as error:
        reason = "missing" if not path.exists() else f"damaged: {error}"
        raise UserError(
            f"{path} is {reason}; set trainer.resume=never to start this run over (the checkpoint is replaced)"
        ) from None


def _optimizer_parts(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, plain = {}, {}
    for index, values in state_dict["state"].items():
        plain[str(index)] = {}
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{name}"] = value
            else:
                plain[str(index)][name] = value
    return tensors, {"state": plain, "param_groups": state_dict["param_groups"]}


def _optimizer_state(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state = {int(index): dict(values) for index, values in plain["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state[int(index)][name] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def _random_states() -> tuple[dict[str, torch.Tensor], dict]:
    kind, keys, position, has_gauss, cached = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state(), "rng.numpy": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    version, python_state, gauss = random.getstate()
    return tensors, {"python": [version, list(python_state), gauss], "numpy": [kind, position, has_gauss, cached]}


def _set_random_states(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    version, python_state, gauss = plain["python"]
    random.setstate((version, tuple(python_state), gauss))
    kind, position, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[key] for key in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def start_over(run_path: Path) -> None:
    """No checkpoint to resume from: drop what an earlier attempt left, so no stale record survives."""
    for name in (CHECKPOINT_DIR, f".{CHECKPOINT_DIR}.old", records.PROMPT_DIR):
        shutil.rmtree(run_path / name, ignore_errors=True)
    for name in (records.TRAIN_LOG, records.PREDICTIONS):
        (run_path / name).unlink(missing_ok=True)


def save(
    run_path: Path,
    cfg: TrainConfig,
    progress: Progress,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    epoch_data_state: torch.Tensor,
    best_state: dict[str, torch.Tensor] | None = None,
    write: bool = True,
) -> None:
    """Write a complete checkpoint beside the old one, then swap it in. Called on every process: a sharded
    (FSDP) tensor is gathered whole, so the file is an unsharded run's; only the process with `write` writes.
    `best_state`: the best step's trainable parameters, kept when the best prompt is evaluated again at the end."""
    tensors = {f"model.{name}": p for name, p in model.named_parameters() if p.requires_grad}
    tensors.update({f"best.{name}": value for name, value in (best_state or {}).items()})
    optimizer_tensors, optimizer_plain = _optimizer_parts(optimizer.state_dict())
    tensors.update(optimizer_tensors)
    tensors = {key: sharding.full(value.detach()).cpu().contiguous().clone() for key, value in tensors.items()}
    if not write:
        return

    def fill(build: Path) -> None:
        build.mkdir()
        rng_tensors, rng_plain = _random_states()
        tensors.update(rng_tensors, **{"data.generator": epoch_data_state})
        save_file(tensors, str(build / TENSORS))
        best_prompt = run_path / records.PROMPT_DIR
        if best_prompt.is_dir():
            shutil.copytree(best_prompt, build / BEST_PROMPT)
        if (run_path / records.PREDICTIONS).is_file():
            shutil.copy2(run_path / records.PREDICTIONS, build / records.PREDICTIONS)
        state = {
            "format": FORMAT,
            "config": comparable_config(cfg),
            "progress": asdict(progress),
            "optimizer": optimizer_plain,
            "scheduler": scheduler.state_dict(),
            "random": rng_plain,
        }
        records.write_json(build / STATE, state)

    records.build_dir(run_path / CHECKPOINT_DIR, fill)


def restore(
    snapshot: Snapshot,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    data_generator: torch.Generator,
) -> dict[str, torch.Tensor] | None:
    """Put every saved state back: parameters, optimiser, schedule, random states, data order; returns the best
    step's parameters if they were saved. Writes no file, so a checkpoint refused here leaves the run directory as it was."""
    tensors = load_file(str(snapshot.folder / TENSORS))
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    saved = {key.removeprefix("model."): value for key, value in tensors.items() if key.startswith("model.")}
    if saved.keys() != parameters.keys():
        raise UserError(
            f"{snapshot.folder} was written for other trainable parameters ({', '.join(sorted(saved))}); set trainer.resume=never to start over"
        )
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(sharding.like(parameter, saved[name]))
    optimizer.load_state_dict(_laid_out(_optimizer_state(tensors, snapshot.state["optimizer"]), optimizer))
    scheduler.load_state_dict(snapshot.state["scheduler"])
    data_generator.set_state(tensors["data.generator"])
    _set_random_states(tensors, snapshot.state["random"])
    best = {
        name: sharding.like(parameters[name], tensors[f"best.{name}"])
        for name in parameters
        if f"best.{name}" in tensors
    }
    return best or None


def _laid_out(state_dict: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A saved optimiser state with each per-parameter tensor laid out as its parameter is (sharded under FSDP)."""
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    for index, values in state_dict["state"].items():
        parameter = parameters[int(index)]
        for name, value in values.items():
            if isinstance(value, torch.Tensor) and value.shape == parameter.shape:
                values[name] = sharding.like(parameter, value)
    return state_dict


def restore_files(snapshot: Snapshot, run_path: Path) -> None:
    """The run's files as they were at the checkpoint (main process, once the run is taken on): train_log.jsonl
    cut to its length then, prompt/ the best prompt then."""
    log_path = run_path / records.TRAIN_LOG
    if log_path.is_file():
        with open(log_path, "r+b") as handle:
            handle.truncate(snapshot.progress.log_bytes)
    if (snapshot.folder / BEST_PROMPT).is_dir():
        records.build_dir(
            run_path / records.PROMPT_DIR, lambda build: shutil.copytree(snapshot.folder / BEST_PROMPT, build)
        )
    if (snapshot.folder / records.PREDICTIONS).is_file():
        records.write_text(
            run_path / records.PREDICTIONS, (snapshot.folder / records.PREDICTIONS).read_text(encoding="utf-8")
        )
