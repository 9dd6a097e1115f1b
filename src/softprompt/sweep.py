"""Resumable sweeps: every job is keyed by a hash of its resolved config, so a rerun finds its results.

Hydra multirun cannot resume on its own. The sweep directory is fixed per experiment (no
timestamp) and each job's folder is named after its config key, so running the same command
again lands every job in the folder of its earlier run: a job whose `metrics.json` says
`completed` with the same key is skipped, an incomplete or failed one trains again. When the
multirun ends, `ReportCallback` writes the report into the sweep directory. An Optuna search
(softprompt.search) resumes the same way: seeded, it proposes the same trials again.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from softprompt import run_dir as records
from softprompt.errors import UserError, read_record
from softprompt.identity import config_key
from softprompt.registry import DEFAULT_METHOD, METHODS
from softprompt.run_dir import KEY_FIELD
from softprompt.search import MULTIRUN

log = logging.getLogger("softprompt")


def job_name(cfg: DictConfig) -> str:
    """A readable folder name for one job that ends in its config key: model, task, the method's own parts
    (registry.MethodSpec.job_parts), seed, key."""
    method = OmegaConf.select(cfg, "method.name", default=DEFAULT_METHOD)
    # a name no method has fails validation once the job starts; until then its folder is named after it
    own = METHODS[method].job_parts(cfg) if method in METHODS else [method]
    parts = [cfg.model.name, cfg.task.name, *own, f"seed{cfg.seed}", config_key(cfg)]
    return "_".join(re.sub(r"[^\w.-]+", "-", str(part)) for part in parts)


# what a sweep says of a job whose metrics.json cannot be read
DAMAGED_WAY_OUT = "move it out of the job's folder to train this job again (its checkpoint, if any, is resumed)"


def completed_record(run_path: Path, key: str) -> dict[str, Any] | None:
    """The earlier run's metrics when it completed with this very config, else None (train again)."""
    path = run_path / records.METRICS
    if not path.is_file():
        return None
    record = read_record(path, DAMAGED_WAY_OUT)
    return record if record.get("status") == "completed" and record.get(KEY_FIELD) == key else None


def _resolve_job_name(*, _root_: DictConfig) -> str:
    return job_name(_root_)


# `${softprompt_job:}` names a sweep job's folder (hydra.sweep.subdir in conf/train.yaml); registered on
# import, so every process that runs jobs (the local launcher's or a SLURM worker) knows it
if not OmegaConf.has_resolver("softprompt_job"):
    OmegaConf.register_new_resolver("softprompt_job", _resolve_job_name)


class ReportCallback(Callback):
    """Write the report (tables and figures) into the sweep directory once every job has ended; then, when any
    job of this multirun failed, one line naming each with its reason, and exit status 1.

    This multirun's jobs are those whose record it wrote (jobs skipped as completed earlier are not
    touched), so failures left in the same sweep directory by an earlier sweep do not count; a job whose
    record cannot be read was refused by this multirun whatever its age, and counts as failed.
    """

    def __init__(self) -> None:
        self.started = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()
        # the multirun's config, as the basic sweeper writes it; the Optuna sweeper does not, and its search space
        # (hydra.sweeper.params and the command line's sweeps) is what the report draws the trials against
        records.write_text(Path(config.hydra.sweep.dir) / MULTIRUN, OmegaConf.to_yaml(config))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from softprompt.report import write_report

        sweep_dir = Path(config.hydra.sweep.dir)
        written = write_report([sweep_dir], sweep_dir)
        print(f"report: {written['markdown']}")
        jobs, failed = 0, {}
        for path in sorted(sweep_dir.glob(f"*/{records.METRICS}")):
            try:
                record = read_record(path, DAMAGED_WAY_OUT)
            except UserError as error:
                jobs, failed[path.parent.name] = jobs + 1, str(error)
                continue
            if path.stat().st_mtime >= self.started:
                jobs += 1
                if record.get("status") == "failed":
                    failed[path.parent.name] = record.get("reason")
        if failed:
            reasons = "; ".join(f"{name}: {reason}" for name, reason in failed.items())
            print(f"{len(failed)} of {jobs} jobs failed: {reasons}", file=sys.stderr)
            sys.exit(1)
