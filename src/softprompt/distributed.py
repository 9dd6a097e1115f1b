"""Several processes, one run: the run directory chosen once, and only the main process speaking.

`torchrun` and `accelerate launch` start N copies of `softprompt-train`; Hydra would resolve
`hydra.run.dir` (a timestamp) in each of them and give every rank its own folder (Hydra issue
#2070). `ProcessCallback` (registered in conf/train.yaml) starts the process group before Hydra
makes the folder, and every rank takes rank 0's resolved folder. Under Hydra's submitit launcher
with several tasks per job (one per GPU, conf/hydra/launcher/slurm.yaml) it first exports the
variables PyTorch's `env://` rendezvous reads, through submitit's own helper. Ranks other than 0
then print nothing on stdout and log nothing; the run's files (`.hydra/`, the log file, the records)
are written by `run_dir.RunRecord`, on the main process only.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from softprompt.cli import split_argv
from softprompt.errors import UserError

ZERO3_REFUSAL = (
    "DeepSpeed ZeRO-3 is not supported: it partitions every parameter, and prompt tuning reads the "
    "prompt and the word embeddings outside their modules' forward (peft #206, #1633), so the prompt "
    "would be empty; shard the backbone with FSDP instead: trainer.sharding=fsdp under torchrun, or "
    "accelerate launch --config_file conf/accelerate/fsdp.yaml"
)


def _submitit_tasks() -> int:
    """Tasks in the submitit job this process belongs to (1 outside submitit)."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return 1
    import submitit

    return submitit.JobEnvironment().num_tasks


def world_size() -> int:
    """Processes in this job: from torchrun / accelerate launch, else from a submitit job's tasks."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return _submitit_tasks()


def init_processes() -> PartialState | None:
    """Join this job's process group (None for a single process); CPU-only machines use gloo."""
    if world_size() <= 1:
        return None
    if "WORLD_SIZE" not in os.environ:
        from submitit.helpers import TorchDistributedEnvironment

        # every task sees all of its node's GPUs; Accelerate picks cuda:LOCAL_RANK
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    # without cpu=True, Accelerate on a machine without CUDA ignores torchrun's ranks
    return PartialState(cpu=not torch.cuda.is_available())


def quiet() -> None:
    """Silence a non-main rank: no log handlers (so no log file), no warnings, stdout discarded."""
    import transformers

    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    warnings.simplefilter("ignore")
    sys.stdout = open(os.devnull, "w", encoding="utf-8")


def deepspeed_zero_stage() -> int | None:
    """The ZeRO stage `accelerate launch` asked for, from its flags or from a DeepSpeed JSON config."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        return int(os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if config_file and Path(config_file).is_file():
        return json.loads(Path(config_file).read_text()).get("zero_optimization", {}).get("stage")
    return None


def check_launch(argv: list[str]) -> None:
    """Refuse, in one line, the combinations of launcher and command that cannot work."""
    if world_size() > 1 and split_argv(argv)[1]:
        raise UserError(
            "-m/--multirun inside a multi-process launch would run the whole sweep in every process: "
            "run the sweep from one process with hydra/launcher=accelerate hydra.launcher.num_processes=N"
        )
    if deepspeed_zero_stage() == 3:
        raise UserError(ZERO3_REFUSAL)


class ProcessCallback(Callback):
    """One run directory for all ranks of a job, and quiet ranks other than 0."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        state = init_processes()
        if state is None:
            return
        # resolved here, in every rank; rank 0's clock wins
        chosen = broadcast_object_list([str(config.hydra.run.dir)], from_process=0)[0]
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.run.dir = chosen

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        state = init_processes()
        if state is not None and not state.is_main_process:
            quiet()
