"""The Python API: train, report and serve from Python, leaving the run directories the commands leave.

`run` is softprompt-train without a shell: the same override strings, the same checks before anything loads
(their one-line messages raised as UserErrors), and the same Hydra job (its callbacks, its logging, the same
RunRecord), so `report`, softprompt-report and softprompt-predict accept what it trains. `load_run` puts one run's
prompt on its frozen backbone through a PromptBank, as softprompt-predict serves it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from omegaconf import DictConfig

from softprompt import run_dir as records
from softprompt.cli import CONF_DIR, CONFIG_NAME, precheck, without_hydra
from softprompt.config import TrainConfig, validate
from softprompt.distributed import check_launch
from softprompt.errors import UserError, as_user_error
from softprompt.predict import example_for, predict_rows
from softprompt.prompt_bank import PromptBank
from softprompt.report import read_reference, report_destination, write_report
from softprompt.task import FIELD
from softprompt.train import check_output_dir, job_record, train

# the job name softprompt-train runs under (its module's name, as Hydra detects it); conf/train.yaml sets it too
JOB_NAME = "train"
ONE_RUN = "softprompt.run trains one run; run a sweep with softprompt-train -m ..."


def run(overrides: Sequence[str] = ()) -> dict:
    """Train one run from softprompt-train's overrides (`["model=tiny-bert", "hydra.run.dir=outputs/a"]`).

    Returns the run's metrics.json record. With no hydra.run.dir the run goes where the command puts it
    (outputs/runs/<time>_<task>_<model> under the working directory). A mistake raises a UserError carrying the
    line the command prints, before anything loads or is written; a run that fails later is marked failed in its
    directory, as the command marks it. One run per call: a sweep (-m) is softprompt-train's.
    """
    if isinstance(overrides, str):
        raise UserError(f"softprompt.run takes a list of overrides, e.g. [{overrides!r}], not one string")
    overrides = list(overrides)
    for item in overrides:
        if item in ("-m", "--multirun"):
            raise UserError(f"{item}: {ONE_RUN}")
        if item.startswith("-"):
            raise UserError(
                f"{item}: softprompt.run takes overrides (key=value), not softprompt-train's flags; your own config "
                "folder is hydra.searchpath=[file:///absolute/folder]"
            )
    check_launch(overrides)
    _, cfg = precheck(overrides)
    if cfg.hydra.mode == RunMode.MULTIRUN:
        raise UserError(f"hydra.mode=MULTIRUN: {ONE_RUN}")
    check_output_dir(cfg, validate(without_hydra(cfg)))
    # what Hydra's command line adds to a run that names no mode, so hydra.yaml records the same overrides
    mode = ["hydra.mode=RUN"] if cfg.hydra.mode is None else []
    with initialize_config_dir(config_dir=str(CONF_DIR), job_name=JOB_NAME, version_base=None), _logging_kept():
        job = GlobalHydra.instance().hydra.run(
            config_name=CONFIG_NAME, task_function=_train_job, overrides=[*overrides, *mode]
        )
    outcome = job.return_value
    if isinstance(outcome, Exception):
        user_error = as_user_error(outcome)
        if user_error is None or user_error is outcome:
            raise outcome
        raise user_error from outcome
    return outcome


def _train_job(raw: DictConfig) -> dict | Exception:
    """softprompt-train's job, its error handed back to `run` to raise: raised here, Hydra would first print that
    the job failed."""
    record = job_record(raw)
    try:
        with record:
            result = train(validate(raw), record.path, record)
    except Exception as error:
        return error
    # processes other than the main one write no metrics.json
    return records.read_json(record.path / records.METRICS) if record.main else result


@contextmanager
def _logging_kept() -> Iterator[None]:
    """Hydra sets up the job's logging as for the command (a console handler at INFO); the calling process gets its
    root logger's handlers and level back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)


def report(*folders: str | Path, out: str | Path | None = None, reference: str | Path | None = None) -> dict[str, Path]:
    """softprompt-report: every run under `folders` (and the rows of earlier reports' results.csv among them) ->
    results.csv, summary.csv, curves.csv, configs.jsonl, report.md and figures in `out` (default: the one folder
    given). Returns the files written: "results", "summary", "curves", "configs", "markdown", then each figure by
    its file name."""
    if not folders:
        raise UserError("softprompt.report needs a folder: a run directory, or a folder of them")
    paths = [Path(folder) for folder in folders]
    return write_report(
        paths,
        report_destination(paths, Path(out) if out is not None else None, "out="),
        read_reference(Path(reference)) if reference else None,
    )


class LoadedRun:
    """One trained run ready to predict: its frozen backbone with its prompt on a one-prompt PromptBank, the way
    softprompt-predict serves it."""

    def __init__(self, bank: PromptBank):
        self.bank = bank

    @property
    def path(self) -> Path:
        return self.bank.entries[0].run_dir

    @property
    def cfg(self) -> TrainConfig:
        """The validated config the run was trained with."""
        return self.bank.cfg

    @property
    def peft_model(self):
        """The backbone behind PEFT's prompt-tuning adapter, the run's prompt loaded."""
        return self.bank.model.peft_model

    @property
    def tokenizer(self):
        return self.bank.backbone.tokenizer

    @property
    def prompt(self) -> torch.Tensor:
        """The soft prompt, (length, width)."""
        return self.bank.prompts[0]

    def predict(self, rows: Iterable[str | dict], batch_size: int = 32, progress: bool = False) -> list[dict]:
        """Each row with its prediction, as softprompt-predict writes it: a label with every label's log-probability
        under "scores" (a classification task), or the written answer (a generation task). A row is a mapping of
        the task's fields, or a string where the task's template reads one field; a row holding the answer also
        gets its scores."""
        if batch_size < 1:
            raise UserError(f"batch_size={batch_size} is not allowed: a number >= 1")
        rows = [self._row(item, number) for number, item in enumerate(rows, start=1)]
        if not rows:
            return []
        examples = [example_for(self.bank, 0, row, f"row {number}") for number, row in enumerate(rows, start=1)]
        predicted, _ = predict_rows(self.bank, rows, [0] * len(rows), examples, batch_size, progress)
        return predicted

    def _row(self, item: str | dict, number: int) -> dict:
        if isinstance(item, dict):
            return item
        if not isinstance(item, str):
            raise UserError(f"row {number}: a {type(item).__name__}; give a string or a mapping of the task's fields")
        fields = FIELD.findall(self.cfg.task.template)
        if len(set(fields)) != 1:
            raise UserError(
                f"row {number}: task {self.cfg.task.name!r} reads {', '.join(fields)} from each row: give rows as "
                "mappings of those fields, not strings"
            )
        return {fields[0]: item}


def load_run(path: str | Path) -> LoadedRun:
    """A run directory's prompt on its frozen backbone, ready to `predict` (prompt tuning and the methods that
    train a prompt, as softprompt-predict serves them)."""
    run_path = Path(path)
    return LoadedRun(PromptBank.load({run_path.name or str(run_path): run_path}))
