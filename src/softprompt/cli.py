"""Command-line plumbing shared by the console scripts: where configs live, and one-line config errors.

Hydra reports a bad override over several lines with exit status 1; users of every softprompt
command get one line naming the key, the value and what is allowed, and exit status 2.

`precheck` composes the config the way Hydra is about to, through Hydra's public API (`initialize_config_dir`
and `compose`) and with the same search path: the app's conf dir or `--config-path`, then `--config-dir`,
then `hydra.searchpath`. Hydra's own commands (`--info`, `--help`, `--shell-completion`, ...) are left to
Hydra, and sweep values the basic sweeper cannot list (`interval(...)`, as the Optuna sweeper reads them)
to the sweeper.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from softprompt.config import check_known_keys, register_configs, unknown_key_message
from softprompt.errors import UserError
from softprompt.search import missing_plugin

CONF_DIR = Path(__file__).resolve().parent / "conf"
CONFIG_NAME = "train"
# Hydra's own flags, which take the next argument as their value
_FLAGS_WITH_VALUE = {
    "--config-dir": "config_dir",
    "-cd": "config_dir",
    "--config-name": "config_name",
    "-cn": "config_name",
    "--config-path": "config_path",
    "-cp": "config_path",
    "--experimental-rerun": "rerun",
    "--cfg": "cfg",
    "-c": "cfg",
    "--package": "package",
    "-p": "package",
}
# flags after which Hydra prints something or replays a pickled job instead of composing our overrides
_HYDRA_COMMANDS = {"--help", "-h", "--hydra-help", "--version", "--shell-completion", "-sc", "--info", "-i"}
# --info takes an optional value from this list
_INFO_TOPICS = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


@dataclass
class Invocation:
    """What a softprompt-train command line asks of Hydra."""

    overrides: list[str] = field(default_factory=list)
    multirun: bool = False
    config_name: str = CONFIG_NAME
    # --config-path: replaces the app's conf dir; --config-dir: searched after it
    config_path: str | None = None
    config_dir: str | None = None
    # --cfg job|hydra|all: Hydra prints the config instead of running
    show: str | None = None
    # a Hydra command that composes nothing of ours (--info, --help, --shell-completion, --experimental-rerun)
    hydra_command: bool = False


def parse_argv(argv: list[str]) -> Invocation:
    """Hydra's command line, read as Hydra reads it (flags, `--flag=value`, overrides)."""
    found = Invocation()
    values: dict[str, str] = {}
    pending, after_info = None, False
    for arg in argv:
        if pending:
            values[pending], pending = arg, None
            continue
        optional_value, after_info = after_info and arg in _INFO_TOPICS, False
        if optional_value:
            continue
        flag, equals, value = arg.partition("=")
        if arg.startswith("-") and flag in _FLAGS_WITH_VALUE:
            if equals:
                values[_FLAGS_WITH_VALUE[flag]] = value
            else:
                pending = _FLAGS_WITH_VALUE[flag]
        elif arg in _HYDRA_COMMANDS or flag in ("--info", "-i"):
            found.hydra_command = True
            after_info = arg in ("--info", "-i")
        elif arg in ("-m", "--multirun"):
            found.multirun = True
        elif not arg.startswith("-"):
            found.overrides.append(arg)
    found.config_name = values.get("config_name", CONFIG_NAME)
    found.config_path, found.config_dir, found.show = (
        values.get("config_path"),
        values.get("config_dir"),
        values.get("cfg"),
    )
    found.hydra_command = found.hydra_command or "rerun" in values
    return found


def split_argv(argv: list[str]) -> tuple[list[str], bool]:
    """The overrides in argv (Hydra flags skipped), and whether it asks for a multirun."""
    found = parse_argv(argv)
    return found.overrides, found.multirun


def _message(error: Exception) -> str:
    if isinstance(error, OverrideParseException):
        reason = " ".join(error.message.split()).split(" See https://")[0]
        return (
            f"{error.override}: Hydra cannot read this override ({reason}); a value with {{braces}}, spaces, commas "
            "or colons needs Hydra's quotes inside the shell's: 'task.template=\"Review: {text} It was\"'"
        )
    if isinstance(error, MissingConfigException) and error.options is not None:
        group = (error.missing_cfg_file or "").rsplit("/", 1)[0]
        value = (error.missing_cfg_file or "").rsplit("/", 1)[-1]
        allowed = f"{group}={value!r} is not allowed: one of: {', '.join(sorted(error.options))}"
        return missing_plugin(group, value) or allowed
    unknown = re.match(r"Could not override '([\w.]+)'", str(error))
    named = unknown_key_message(unknown.group(1)) if unknown else None
    if named:
        return named
    cause = error.__cause__ if isinstance(error.__cause__, OmegaConfBaseException) else error
    text = " ".join(str(cause).split()).split(" full_key:")[0]
    key = getattr(cause, "full_key", None)
    if key and "Cannot convert 'dict' to string" in text:
        text += f" (Hydra reads {{...}} as a mapping: quote the value inside the shell's quotes, '{key}=\"...\"')"
    return f"{key}: {text}" if key else text


def _quoted(text: str) -> str:
    """A string as Hydra's override grammar reads it back unchanged."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _search_path(
    overrides: list[str], config_name: str, config_path: str | None, config_dir: str | None
) -> tuple[Path | str, list[str]]:
    """The primary config folder and the overrides that give the rest of Hydra's search path.

    Hydra searches the app's conf dir (or --config-path), then --config-dir, then hydra.searchpath's folders; the
    public API takes one folder and hydra.searchpath, so --config-dir joins hydra.searchpath's front. A primary
    config that only --config-dir holds (-cn) makes that folder the primary one, the app's conf dir searched next.
    """
    primary = _primary_folder(config_path)
    if config_dir is None:
        return primary, overrides
    folder = Path(config_dir).expanduser().resolve()
    if not folder.is_dir():
        raise UserError(f"--config-dir {config_dir}: no such folder (give a folder holding model/, task/, ... configs)")
    extra, rest = [], []
    for item, parsed in zip(overrides, _parse(overrides)):
        if parsed.get_key_element().lstrip("+~") == "hydra.searchpath" and isinstance(parsed.value(), list):
            extra = [str(path) for path in parsed.value()]
        else:
            rest.append(item)
    searched = [f"file://{folder}"]
    if (
        isinstance(primary, Path)
        and not (primary / f"{config_name}.yaml").is_file()
        and (folder / f"{config_name}.yaml").is_file()
    ):
        primary, searched = folder, [f"file://{_primary_folder(config_path)}"]
    paths = [*searched, *extra]
    return primary, [*rest, f"hydra.searchpath=[{','.join(_quoted(path) for path in paths)}]"]


def _primary_folder(config_path: str | None) -> Path | str:
    """The app's conf dir, or --config-path's folder (a pkg:// path stays as it is)."""
    if config_path is None:
        return CONF_DIR
    if config_path.startswith("pkg://"):
        return config_path
    # a relative --config-path is relative to the module declaring the app, as Hydra resolves it
    folder = Path(config_path) if os.path.isabs(config_path) else CONF_DIR.parent / config_path
    if not folder.is_dir():
        raise UserError(f"--config-path {config_path}: no such folder ({folder})")
    return folder.resolve()


def _initialize(primary: Path | str):
    if isinstance(primary, str):
        return initialize_config_module(config_module=primary[len("pkg://") :].replace("/", "."), version_base=None)
    return initialize_config_dir(config_dir=str(primary), version_base=None)


def compose_config(
    overrides: list[str],
    config_name: str = CONFIG_NAME,
    return_hydra_config: bool = False,
    config_path: str | None = None,
    config_dir: str | None = None,
) -> DictConfig:
    """Compose a config the way the app would, turning Hydra's errors into one-line UserErrors."""
    register_configs()
    GlobalHydra.instance().clear()
    try:
        primary, overrides = _search_path(overrides, config_name, config_path, config_dir)
        with _initialize(primary):
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


def without_hydra(cfg: DictConfig) -> DictConfig:
    """A composed config without Hydra's node: what the app receives."""
    job = cfg.copy()
    with read_write(job), open_dict(job):
        job.pop("hydra", None)
    return job


def _parse(overrides: list[str]) -> list[Override]:
    try:
        return OverridesParser.create().parse_overrides(overrides)
    except HydraException as error:
        raise UserError(_message(error)) from None


@dataclass
class Jobs:
    """The jobs a command line launches: each one's overrides, and the sweeps left to the sweeper."""

    overrides: list[list[str]]
    # keys swept with a grammar only another sweeper lists (interval(...), tag(...) on a range of reals)
    unlisted: list[str] = field(default_factory=list)
    hydra_overrides: list[str] = field(default_factory=list)


def expand_jobs(overrides: list[str], multirun: bool) -> Jobs:
    """Every job's overrides, as the basic sweeper forms them: the cartesian product of the swept values."""
    jobs = Jobs([])
    choices: dict[str, list[str]] = {}
    for item, parsed in zip(overrides, _parse(overrides)):
        if parsed.is_hydra_override():
            jobs.hydra_overrides.append(item)
            continue
        key = parsed.get_key_element()
        if not multirun or not parsed.is_sweep_override():
            choices[key] = [item]
        elif parsed.is_discrete_sweep():
            choices[key] = [f"{key}={value}" for value in parsed.sweep_string_iterator()]
        else:
            jobs.unlisted.append(key)
    jobs.overrides = [list(job) for job in itertools.product(*choices.values())]
    return jobs


def job_overrides(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override list of every job the command would launch (one job without -m)."""
    return expand_jobs(overrides, multirun).overrides


def precheck(argv: list[str]) -> tuple[Invocation, DictConfig | None]:
    """Compose every job's config up front, once each, so a typo fails in one line before any job starts.

    Returns the command line as read, and the first job's config with Hydra's node (None when the command is
    one of Hydra's own, which composes nothing of ours).
    """
    found = parse_argv(argv)
    if found.hydra_command:
        return found, None
    jobs = expand_jobs(found.overrides, found.multirun and found.show is None)
    where = {"config_name": found.config_name, "config_path": found.config_path, "config_dir": found.config_dir}
    for key in jobs.unlisted:
        unknown = unknown_key_message(key.lstrip("+~").split("@")[0])
        if unknown:
            raise UserError(unknown)
    first = None
    for number, job in enumerate(jobs.overrides):
        cfg = compose_config(job + jobs.hydra_overrides, return_hydra_config=number == 0, **where)
        check_known_keys(without_hydra(cfg))
        first = first if number else cfg
    return found, first
