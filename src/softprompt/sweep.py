"""Resumable sweeps: every job is keyed by a hash of its resolved config, so a rerun finds its results.

Hydra multirun cannot resume on its own. The sweep directory is fixed per experiment (no
timestamp) and each job's folder is named after its config key, so running the same command
again lands every job in the folder of its earlier run: a job whose `metrics.json` says
`completed` with the same key is skipped, an incomplete or failed one trains again. When the
multirun ends, `ReportCallback` writes the report into the sweep directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from softprompt import run_dir as records
from softprompt.config import MethodConfig
from softprompt.errors import read_record

log = logging.getLogger("softprompt")

# keys that only say where outputs go, how progress is shown, how often a run checkpoints or whether
# activations are recomputed: they never change a result
NON_RESULT_KEYS = (
    "output_root",
    "trainer.progress_bar",
    "trainer.log_every",
    "trainer.log_with",
    "trainer.num_workers",
    "trainer.checkpoint_every",
    "trainer.resume",
    "trainer.gradient_checkpointing",
    "trainer.compile",
)
KEY_FIELD = "config_key"
KEY_LENGTH = 10


def drop_default_method(tree: dict) -> dict:
    """Runs made before `method` existed were prompt tuning: the default method with its default knobs is
    left out of keys and comparisons, so their config keys and checkpoints stay valid."""
    if tree.get("method") == asdict(MethodConfig()):
        tree.pop("method")
    return tree


def _result_config(cfg: DictConfig) -> dict:
    """The resolved config without Hydra's node and without the keys that cannot change a result."""
    tree = drop_default_method(
        OmegaConf.to_container(OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"]), resolve=True)
    )
    for dotted in NON_RESULT_KEYS:
        *parents, leaf = dotted.split(".")
        node = tree
        for parent in parents:
            node = node.get(parent, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return tree


def config_key(cfg: DictConfig) -> str:
    """A short stable hash of everything in a job's config that can change its results."""
    text = json.dumps(_result_config(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


def job_name(cfg: DictConfig) -> str:
    """A readable folder name for one job that ends in its config key."""
    method = OmegaConf.select(cfg, "method.name", default="prompt_tuning")
    if method == "prompt_tuning":
        parts = [cfg.model.name, cfg.task.name, f"len{cfg.prompt.length}", cfg.prompt.init]
    elif method == "prompt_design":
        parts = [cfg.model.name, cfg.task.name, method, f"k{cfg.method.num_demonstrations}"]
    elif method in ("prefix_tuning", "p_tuning"):
        parts = [cfg.model.name, cfg.task.name, method, f"len{cfg.prompt.length}"]
    elif method == "lora":
        parts = [cfg.model.name, cfg.task.name, method, f"r{cfg.method.lora_r}"]
    else:
        parts = [cfg.model.name, cfg.task.name, method]
    parts += [f"seed{cfg.seed}", config_key(cfg)]
    return "_".join(re.sub(r"[^\w.-]+", "-", str(part)) for part in parts)


def completed_record(run_path: Path, key: str) -> dict[str, Any] | None:
    """The earlier run's metrics when it completed with this very config, else None (train again)."""
    path = run_path / records.METRICS
    if not path.is_file():
        return None
    record = read_record(
        path, "move it out of the job's folder to train this job again (its checkpoint, if any, is resumed)"
    )
    return record if record.get("status") == "completed" and record.get(KEY_FIELD) == key else None


def _resolve_job_name(*, _root_: DictConfig) -> str:
    return job_name(_root_)


# `${softprompt_job:}` names a sweep job's folder (hydra.sweep.subdir in conf/train.yaml); registered on
# import, so every process that runs jobs (the local launcher's or a SLURM worker) knows it
if not OmegaConf.has_resolver("softprompt_job"):
    OmegaConf.register_new_resolver("softprompt_job", _resolve_job_name)


class ReportCallback(Callback):
    """Write the report (tables and figures) into the sweep directory once every job has ended."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from softprompt.report import write_report

        sweep_dir = Path(config.hydra.sweep.dir)
        written = write_report([sweep_dir], sweep_dir)
        print(f"report: {written['markdown']}")
