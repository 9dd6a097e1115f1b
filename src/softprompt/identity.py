"""Run identity: the part of a config that can change a run's result, and the key that names it.

One definition serves the sweep (a job's folder and whether its earlier result still holds), the
checkpoint (whether a run directory's checkpoint may be resumed with this config) and the report
(which config keys are settings worth a column). It sits below all three.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

from omegaconf import DictConfig, OmegaConf

from softprompt.config import GenerationConfig, MethodConfig, TrainConfig, flatten

# keys that only say where outputs go, how progress is shown, how often a run checkpoints, whether
# activations are recomputed or how the backbone is laid out across processes: they never change a result
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
    "trainer.sharding",
    "trainer.reshard_after_forward",
)
KEY_LENGTH = 10
# keys added after runs existed, left out while they hold the value every earlier run had, so the
# config keys of earlier sweeps and the checkpoints of earlier runs stay valid
LATER_KEYS = {
    "task.encoding": "utf-8",
    "task.target_field": None,
    "task.eval_rows": None,
    "task.carve_by": None,
    "trainer.head_lr": None,
}
# a task's hub source, which cannot change a run that reads the task's files (task.hub_dataset, older, is then
# null as it was in every such run)
HUB_KEYS = ("task.source", "task.hub_splits", "task.hub_columns")


def result_config(cfg: DictConfig | TrainConfig) -> dict[str, Any]:
    """The resolved config as plain data, without Hydra's node and the keys that cannot change a result.

    Runs made before `method` existed were prompt tuning: the default method with its default knobs is
    left out (and the default decoding, which came later), so their config keys and checkpoints stay valid; so are later keys at their earlier value.
    """
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    else:
        cfg = OmegaConf.structured(cfg)
    tree = OmegaConf.to_container(cfg, resolve=True)
    for section, schema in (("method", MethodConfig), ("generation", GenerationConfig)):
        if tree.get(section) == asdict(schema()):
            tree.pop(section)
    for dotted in NON_RESULT_KEYS:
        _drop(tree, dotted)
    for dotted, earlier in LATER_KEYS.items():
        _drop(tree, dotted, only=earlier)
    task = tree.get("task", {})
    if task.get("source") == "files":
        for dotted in HUB_KEYS:
            _drop(tree, dotted)
        task["hub_dataset"] = None
    return tree


ANY_VALUE = object()


def _drop(tree: dict[str, Any], dotted: str, only: Any = ANY_VALUE) -> None:
    """Remove a dotted key from a nested mapping (where it is present; with `only`, where it holds that value)."""
    *parents, leaf = dotted.split(".")
    node = tree
    for parent in parents:
        node = node.get(parent, {}) if isinstance(node, dict) else {}
    if isinstance(node, dict) and leaf in node and (only is ANY_VALUE or node[leaf] == only):
        node.pop(leaf)


def config_key(cfg: DictConfig | TrainConfig) -> str:
    """A short stable hash of everything in a config that can change its results."""
    text = json.dumps(result_config(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


def comparable_config(cfg: DictConfig | TrainConfig) -> dict[str, Any]:
    """Dotted key -> value for every key that can change a result (what a resumed run must share)."""
    return flatten(result_config(cfg))
