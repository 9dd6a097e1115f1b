"""Command-line plumbing shared by the console scripts: where configs live, and one-line config errors.

Hydra reports a bad override over several lines with exit status 1; users of every softprompt
command get one line naming the key, the value and what is allowed, and exit status 2.
"""

from __future__ import annotations

import re
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from softprompt.config import TrainConfig, register_configs
from softprompt.errors import UserError

CONF_DIR = Path(__file__).resolve().parent / "conf"
# Hydra's own flags, which take the next argument as their value
_FLAGS_WITH_VALUE = {
    "--config-dir",
    "-cd",
    "--config-name",
    "-cn",
    "--config-path",
    "-cp",
    "--experimental-rerun",
    "--cfg",
    "-c",
    "--package",
    "-p",
}
# --info takes an optional value from this list
_INFO_TOPICS = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def split_argv(argv: list[str]) -> tuple[list[str], bool]:
    """The overrides in argv (Hydra flags skipped), and whether it asks for a multirun."""
    overrides, multirun, skip, after_info = [], False, False, False
    for arg in argv:
        takes_value, skip = skip, False
        optional_value, after_info = after_info and arg in _INFO_TOPICS, False
        if takes_value or optional_value:
            continue
        if arg in ("-i", "--info"):
            after_info = True
        elif arg in ("-m", "--multirun"):
            multirun = True
        elif arg in _FLAGS_WITH_VALUE:
            skip = True
        elif not arg.startswith("-"):
            overrides.append(arg)
    return overrides, multirun


def _unknown_key(key: str) -> str | None:
    """Name the keys that do exist beside an unknown one."""
    parent_path, _, _ = key.rpartition(".")
    try:
        parent = (
            OmegaConf.select(OmegaConf.structured(TrainConfig), parent_path)
            if parent_path
            else OmegaConf.structured(TrainConfig)
        )
    except (OmegaConfBaseException, AttributeError):
        # a key under a group the schema leaves open (task.builtin_size.x): OmegaConf's own message says it
        return None
    if not isinstance(parent, DictConfig):
        return None
    return f"{key} is not a config key: {parent_path or 'the root'} has: {', '.join(parent.keys())}"


def _message(error: Exception) -> str:
    if isinstance(error, MissingConfigException) and error.options is not None:
        group = (error.missing_cfg_file or "").rsplit("/", 1)[0]
        value = (error.missing_cfg_file or "").rsplit("/", 1)[-1]
        return f"{group}={value!r} is not allowed: one of: {', '.join(sorted(error.options))}"
    unknown = re.match(r"Could not override '([\w.]+)'", str(error))
    if unknown and _unknown_key(unknown.group(1)):
        return _unknown_key(unknown.group(1))
    cause = error.__cause__ if isinstance(error.__cause__, OmegaConfBaseException) else error
    text = " ".join(str(cause).split()).split(" full_key:")[0]
    key = getattr(cause, "full_key", None)
    return f"{key}: {text}" if key else text


def compose_config(overrides: list[str], config_name: str = "train", return_hydra_config: bool = False) -> DictConfig:
    """Compose a config the way the app would, turning Hydra's errors into one-line UserErrors."""
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            return compose(config_name=config_name, overrides=overrides, return_hydra_config=return_hydra_config)
    except (HydraException, OmegaConfBaseException) as error:
        raise UserError(_message(error)) from None
    except (ValueError, AttributeError) as error:
        # Hydra checks a group choice's type with a bare ValueError (model=0), and OmegaConf fails merging
        # a mapping into a null one (model.from_config={a: 1}) with an AttributeError
        raise UserError(
            f"the overrides could not be applied ({type(error).__name__}: {str(error).splitlines()[0]}): {' '.join(overrides)}"
        ) from None
    finally:
        GlobalHydra.instance().clear()


def job_overrides(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override list of every job the command would launch (one job without -m)."""
    own = [item for item in overrides if not item.startswith(("hydra.", "hydra/", "+hydra", "~hydra"))]
    if not multirun:
        return [own]
    try:
        parsed = OverridesParser.create().parse_overrides(own)
    except OverrideParseException as error:
        raise UserError(_message(error)) from None
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def compose_or_exit(argv: list[str], config_name: str = "train") -> None:
    """Compose every job's config up front, so a typo fails in one line before any job starts."""
    overrides, multirun = split_argv(argv)
    for job in job_overrides(overrides, multirun):
        compose_config(job, config_name)
