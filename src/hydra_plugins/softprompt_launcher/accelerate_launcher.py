"""Sweeps of multi-process jobs: each job of a Hydra multirun runs as its own `accelerate launch`.

`accelerate launch ... -m` would run the whole sweep in every process. Instead the multirun stays
in one process (`hydra/launcher=accelerate`): for each job it resolves the job's folder exactly
as Hydra's own launchers do (`hydra.sweep.dir`/`hydra.sweep.subdir`), skips it when that folder
already holds completed results for the same config (softprompt.sweep), and otherwise runs
`accelerate launch --num_processes N --main_process_port P -m softprompt.train <job overrides>
hydra.run.dir=<job folder>`, with P a port free at that moment, so no two jobs (of this sweep
or another) share a rendezvous. Jobs run one after another; a job that fails is marked failed
and the sweep goes on.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)

# hydra overrides that belong to the multirun itself, not to a job's own run
_SWEEP_ONLY = (
    "hydra/launcher",
    "hydra.launcher",
    "hydra/sweeper",
    "hydra.sweeper",
    "hydra.sweep.",
    "hydra.run.",
    "hydra.mode",
)


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it), for one job's rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def quote(value: str) -> str:
    """A Hydra override value that keeps any path intact (spaces, commas, equals signs)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def launch_command(num_processes: int, port: int, config_file: str | None, overrides: list[str]) -> list[str]:
    """The `accelerate launch` command line of one job."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(num_processes),
        "--main_process_port",
        str(port),
    ]
    if config_file:
        command += ["--config_file", config_file]
    else:
        # the defaults Accelerate would otherwise warn about; precision comes from trainer.mixed_precision
        command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if num_processes > 1:
            command.append("--multi_gpu")
    return command + ["-m", "softprompt.train", *overrides]


class AccelerateLauncher(Launcher):
    """Hydra launcher: one `accelerate launch` with `num_processes` processes per job, one job at a time."""

    def __init__(self, num_processes: int = 1, config_file: str | None = None) -> None:
        self.num_processes = num_processes
        self.config_file = config_file
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        passed_on = [item for item in self.config.hydra.overrides.hydra if not item.startswith(_SWEEP_ONLY)]
        log.info(
            f"Launching {len(job_overrides)} jobs, each with accelerate launch --num_processes {self.num_processes}"
        )
        runs = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = sweep_config.hydra.job.num = idx
            job_dir = Path(str(sweep_config.hydra.sweep.dir), str(sweep_config.hydra.sweep.subdir)).absolute()
            with open_dict(sweep_config):
                sweep_config.hydra.runtime.output_dir = str(job_dir)
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            runs.append(self._run(idx, list(overrides), passed_on, sweep_config, job_dir))
        return runs

    def _run(
        self, idx: int, overrides: list[str], passed_on: list[str], sweep_config: DictConfig, job_dir: Path
    ) -> JobReturn:
        from softprompt import run_dir as records
        from softprompt import sweep

        task_cfg = copy.deepcopy(sweep_config)
        with open_dict(task_cfg):
            del task_cfg["hydra"]
        key = sweep.config_key(task_cfg)
        ret = JobReturn(
            overrides=overrides,
            cfg=task_cfg,
            hydra_cfg=sweep_config,
            working_dir=os.getcwd(),
            task_name=sweep_config.hydra.job.name,
        )
        done = sweep.completed_record(job_dir, key)
        if done:
            log.info(f"\t#{idx} skipped, completed earlier with the same config: {job_dir}")
            ret.status, ret.return_value = JobStatus.COMPLETED, done["eval"][done["main_metric"]]
            return ret
        command = launch_command(
            self.num_processes,
            free_port(),
            self.config_file,
            [*overrides, *passed_on, f"hydra.run.dir={quote(str(job_dir))}"],
        )
        # the job's output streams through; its last `error:` line, if any, is the reason it failed
        process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        reason = None
        for line in process.stderr:
            sys.stderr.write(line)
            if line.startswith("error: "):
                reason = line[len("error: ") :].strip()
        code = process.wait()
        if code == 0 and records.status(job_dir) == "completed":
            record = records.read_json(job_dir / records.METRICS)
            ret.status, ret.return_value = JobStatus.COMPLETED, record["eval"][record["main_metric"]]
            return ret
        if records.status(job_dir) != "failed":
            # the sweep's own job folder: its record says the job failed, and why
            record = records.RunRecord(job_dir, key, main=True)
            record.start()
            record.fail(reason or f"accelerate launch exited with status {code}")
        if reason:
            # a mistake in this job's config or data, recorded like any failed job of a sweep
            ret.status, ret.return_value = JobStatus.COMPLETED, None
        else:
            ret.status, ret.return_value = (
                JobStatus.FAILED,
                RuntimeError(f"job #{idx} in {job_dir}: accelerate launch exited with status {code}"),
            )
        return ret
