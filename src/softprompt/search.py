"""Hyperparameter search with Optuna through Hydra (`-m hydra/sweeper=optuna`, `experiment=lr_search`).

Hydra's Optuna sweeper is made for a loss: it minimises, asks two trials at a time, draws unseeded and stops
the search at the first trial that raises. A softprompt job returns its best dev metric (higher is better for
every task) and a sweep is resumable, so `hydra/sweeper=optuna` here is the plugin's schema with softprompt's
defaults: maximise, one trial at a time (each proposal knows every result before it), the sampler seeded by
`seed`, and a failed trial (the job returned None, or raised) recorded as failed by Optuna while the search goes
on; a search where no trial completed ends as any sweep whose jobs all failed
(hydra_plugins/softprompt_optuna_sweeper.py). Seeded, the sampler proposes the same trials again given the same
results: a rerun of the same command replays the search, skipping completed trials (their recorded metrics are
told to Optuna again), resuming an interrupted one from its checkpoint and training what is missing; with a
larger `n_trials` it goes on past where it stopped.

The sweeper records neither its search space nor its trials' numbers; the sweep directory keeps the multirun's
config (`multirun.yaml`, written by `sweep.ReportCallback` as the basic sweeper writes its own), Optuna's best
trial (`optimization_results.yaml`) and each trial's assignment (its run's `.hydra/overrides.yaml`); the report
reads them back to draw the metric against each searched value.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.core.plugins import Plugins
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from softprompt.errors import UserError

PLUGIN = "hydra_plugins.hydra_optuna_sweeper"
# hydra_plugins/softprompt_optuna_sweeper.py: the plugin's sweeper, ending a search where no trial completed as a
# failed sweep; sweep directories of either name are searches
SWEEPER = "hydra_plugins.softprompt_optuna_sweeper.SoftpromptOptunaSweeper"
INSTALL = "pip install 'softprompt[optuna]'"
# written into the sweep directory: the multirun's config (by us), Optuna's best trial (by the sweeper)
MULTIRUN = "multirun.yaml"
RESULTS = "optimization_results.yaml"


def plugin_installed() -> bool:
    return importlib.util.find_spec(PLUGIN) is not None


def missing_plugin(group: str, choice: str) -> str | None:
    """The one line for `hydra/sweeper=optuna` asked of a Python without the plugin (None for any other choice)."""
    if group == "hydra/sweeper" and choice == "optuna":
        return f"hydra/sweeper=optuna needs Hydra's Optuna sweeper, which is not installed: {INSTALL}"
    return None


def check_storage(cfg: DictConfig) -> None:
    """Refuse `hydra.sweeper.storage` where Optuna cannot write it, before any trial runs.

    optuna 2.10, the newest the Hydra plugin allows, reads its database schema with calls SQLAlchemy 2 removed: the
    search would end in a traceback; the sweep directory keeps what storage would, for a rerun.
    """
    storage = OmegaConf.select(cfg, "hydra.sweeper.storage", default=None)
    if storage is None or not plugin_installed():
        return
    version = importlib.metadata.version("sqlalchemy")
    if int(version.split(".")[0]) >= 2:
        raise UserError(
            f"hydra.sweeper.storage={storage} is not allowed with SQLAlchemy {version}: the Optuna sweeper's optuna "
            "2.10 writes databases only with SQLAlchemy < 2; leave storage out, the same command resumes the search "
            "from its sweep directory"
        )


def register_sweeper() -> None:
    """Store softprompt's `hydra/sweeper=optuna` and seeded samplers over the plugin's own (when it is installed).

    Hydra's plugin scan runs each plugin's config module again, storing its nodes anew: the scan is made first,
    so the nodes stored here are the ones composed.
    """
    if not plugin_installed():
        return
    from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf

    # optuna imports alembic, whose plugin setup logs a line per plugin at INFO level
    logging.getLogger("alembic").setLevel(logging.WARNING)
    Plugins.instance()

    @dataclass
    class SoftpromptOptunaConf(OptunaSweeperConf):
        _target_: str = SWEEPER
        direction: Any = "maximize"
        n_jobs: int = 1
        max_failure_rate: float = 1.0

    store = ConfigStore.instance()
    store.store(group="hydra/sweeper", name="optuna", node=SoftpromptOptunaConf, provider="softprompt")
    for name in store.list("hydra/sweeper/sampler"):
        sampler = store.load(f"hydra/sweeper/sampler/{name}").node
        # every sampler but the grid draws at random
        if "seed" in sampler:
            seeded = sampler.copy()
            seeded.seed = "${seed}"
            store.store(
                group="hydra/sweeper/sampler", name=name.removesuffix(".yaml"), node=seeded, provider="softprompt"
            )


@dataclass
class Space:
    """How one key was searched: between bounds (interval(...)) or among choices (choice(...), range(...)), on a
    log scale when tagged so (tag(log, ...))."""

    log: bool = False
    bounds: tuple[float, float] | None = None
    choices: list[Any] | None = None


def _space(override: Override) -> Space:
    space = Space(log="log" in override.value().tags)
    if override.is_interval_sweep():
        space.bounds = (float(override.value().start), float(override.value().end))
    else:
        space.choices = list(override.sweep_iterator())
    return space


@dataclass
class Search:
    """An Optuna search found in a sweep directory."""

    # each searched key, as on the command line (trainer.lr, prompt.length, model), and its space
    keys: dict[str, Space]
    # Optuna's best trial (empty when no trial completed)
    best_params: dict[str, Any] = field(default_factory=dict)
    best_value: float | None = None


def find_search(folder: Path) -> Search | None:
    """The Optuna search whose sweep directory `folder` is, or None (another sweep, a run, a damaged record)."""
    try:
        multirun = OmegaConf.load(folder / MULTIRUN)
        if not str(OmegaConf.select(multirun, "hydra.sweeper._target_", default="")).startswith((PLUGIN, SWEEPER)):
            return None
        params = multirun.hydra.sweeper.params
        arguments = [f"{key}={value}" for key, value in (params.items() if params is not None else [])]
        arguments += OmegaConf.to_container(multirun.hydra.overrides.task, resolve=False)
        parsed = OverridesParser.create().parse_overrides(arguments)
    except (OSError, yaml.YAMLError, OmegaConfBaseException, HydraException):
        return None
    # the command line's value of a key (searched or fixed) replaces the preset's search of it, as in the sweeper
    last = {override.get_key_element(): override for override in parsed}
    search = Search({key: _space(found) for key, found in last.items() if found.is_sweep_override()})
    try:
        results = OmegaConf.to_container(OmegaConf.load(folder / RESULTS))
        search.best_params, search.best_value = dict(results["best_params"]), float(results["best_value"])
    except (OSError, yaml.YAMLError, OmegaConfBaseException, KeyError, TypeError, ValueError):
        pass
    return search


def trial_values(run_path: Path, keys: list[str]) -> dict[str, Any] | None:
    """The searched values a trial's run was given (its `.hydra/overrides.yaml`), or None for a run of no trial of
    this search (a searched key missing, or unreadable)."""
    try:
        overrides = OmegaConf.to_container(OmegaConf.load(run_path / ".hydra" / "overrides.yaml"))
        parsed = OverridesParser.create().parse_overrides([str(item) for item in overrides])
    except (OSError, yaml.YAMLError, OmegaConfBaseException, HydraException, TypeError):
        return None
    given = {override.get_key_element(): override.value() for override in parsed}
    return {key: given[key] for key in keys} if set(keys) <= set(given) else None
