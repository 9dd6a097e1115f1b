"""Experiment trackers: trainer.log_with names one tracker Accelerate supports, or a list of them.

Each tracker's run is named after the run directory and keeps its files there unless the user's environment
says otherwise (MLFLOW_TRACKING_URI; WANDB_DIR, WANDB_MODE), so nothing reaches the network unless asked.
Accelerate drops a tracker whose package is missing without a word; here that is a one-line error naming
what to install, raised before the run directory is taken on.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType

from softprompt.errors import ConfigError, UserError

# every tracker Accelerate knows, from Accelerate itself; "all" (whatever happens to be installed) is left
# out, so a run's config says where it logs
NAMES = tuple(kind.value for kind in LoggerType if kind is not LoggerType.ALL)
# the project each tracker files its runs under (a TensorBoard subfolder of the run directory)
PROJECT = "softprompt"


def tracker_names(log_with: Any) -> list[str]:
    """trainer.log_with as a list of names: null is none, a name is one, a list is each once."""
    if log_with is None:
        return []
    listed = [log_with] if isinstance(log_with, str) else log_with
    if not isinstance(listed, (list, tuple)) or not all(isinstance(name, str) and name in NAMES for name in listed):
        raise ConfigError(
            "trainer.log_with", log_with, f"one of {', '.join(NAMES)}, or a list of them ([tensorboard,mlflow])"
        )
    return list(dict.fromkeys(listed))


def check_installed(log_with: Any) -> None:
    """A named tracker whose package is missing: one line naming the extra (or the package) to install."""
    available = {kind.value for kind in get_available_trackers()}
    missing = [name for name in tracker_names(log_with) if name not in available]
    if not missing:
        return
    extras = importlib.metadata.metadata("softprompt").get_all("Provides-Extra") or []
    install = " ".join(f"'softprompt[{name}]'" if name in extras else name for name in missing)
    which = f"the {missing[0]} tracker is" if len(missing) == 1 else f"the {', '.join(missing)} trackers are"
    raise UserError(f"trainer.log_with: {which} not installed: pip install {install}")


def start(accelerator: Accelerator, log_with: Any, run_path: Path, config: dict[str, Any], first_step: int) -> None:
    """Start each tracker's run, named after the run directory, with the run's config as its parameters.

    Each attempt at a run is a tracker run of its own; `first_step` is the first step this one logs (0, or the
    checkpoint's step + 1 when resumed), and TensorBoard hides what earlier attempts logged from there on, as
    train_log.jsonl drops it."""
    run_path = run_path.resolve()
    names = tracker_names(log_with)
    init_kwargs: dict[str, dict[str, Any]] = {}
    if "tensorboard" in names:
        init_kwargs["tensorboard"] = {"purge_step": first_step}
    if "mlflow" in names:
        import mlflow

        init_kwargs["mlflow"] = {"run_name": run_path.name}
        # MLflow announces at INFO each table it creates in a new sqlite store: a normal run prints no library notes
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        if "MLFLOW_TRACKING_URI" not in os.environ:
            # MLflow's own default store (sqlite, mlflow.db in the working directory), in the run directory
            mlflow.set_tracking_uri(_local_store(run_path))
            init_kwargs["mlflow"]["logging_dir"] = str(run_path / "mlartifacts")
    if "wandb" in names:
        init_kwargs["wandb"] = {"name": run_path.name}
        if "WANDB_DIR" not in os.environ:
            init_kwargs["wandb"]["dir"] = str(run_path)
        if "WANDB_MODE" not in os.environ:
            init_kwargs["wandb"]["mode"] = "offline"
    accelerator.init_trackers(PROJECT, config=config, init_kwargs=init_kwargs)


def finish(accelerator: Accelerator, run_path: Path) -> None:
    """End each tracker's run, and let go of the MLflow store `start` chose: mlflow.set_tracking_uri also set
    MLFLOW_TRACKING_URI, which the next run in this process (a sweep's next job) would take for the user's."""
    for tracker in accelerator.trackers:
        tracker.finish()
    if os.environ.get("MLFLOW_TRACKING_URI") == _local_store(run_path.resolve()):
        import mlflow

        mlflow.set_tracking_uri(None)


def _local_store(run_path: Path) -> str:
    return f"sqlite:///{run_path / 'mlflow.db'}"
