"""Hyperparameter search with Optuna (softprompt/search.py): softprompt's sweeper defaults, a search on a tiny
model that maximises the best dev metric, goes on past a failed trial, replays on a rerun, and is drawn by the
report, ends as a failed sweep when no trial completes; one line for a storage optuna cannot write, and one
naming the extra where the plugin is missing."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from helpers import ROOT, quick_overrides, run_cli
from softprompt.cli import compose_config
from softprompt.search import INSTALL, MULTIRUN, RESULTS, Space, find_search, trial_values

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="needs the Optuna sweeper: pip install -e '.[optuna]'")


def test_optuna_sweeper_maximises_seeded_one_trial_at_a_time_and_goes_on():
    sweeper = compose_config(["hydra/sweeper=optuna", "seed=7"], return_hydra_config=True).hydra.sweeper
    assert (sweeper.direction, sweeper.n_jobs, sweeper.max_failure_rate) == ("maximize", 1, 1.0)
    assert (sweeper.sampler._target_, sweeper.sampler.seed) == ("optuna.samplers.TPESampler", 7)
    # every sampler that draws at random is seeded; the grid has no seed and still composes
    random = compose_config(["hydra/sweeper=optuna", "hydra/sweeper/sampler=random"], return_hydra_config=True)
    assert random.hydra.sweeper.sampler.seed == 0
    grid = compose_config(["hydra/sweeper=optuna", "hydra/sweeper/sampler=grid"], return_hydra_config=True)
    assert "seed" not in grid.hydra.sweeper.sampler
    # the command line still chooses
    mine = compose_config(["hydra/sweeper=optuna", "hydra.sweeper.direction=minimize"], return_hydra_config=True)
    assert mine.hydra.sweeper.direction == "minimize"


def test_lr_search_preset_searches_the_learning_rate_on_a_log_scale(tmp_path):
    cfg = compose_config(["experiment=lr_search"], return_hydra_config=True)
    assert (cfg.model.name, cfg.task.name, cfg.trainer.max_steps) == ("minilm-l6", "sst2", 300)
    assert cfg.hydra.sweep.dir == "outputs/sweeps/lr_search"
    assert cfg.hydra.sweeper.direction == "maximize" and cfg.hydra.sweeper.sampler.seed == 0
    # the search space as the report reads it back from the sweep dir; a key the command line fixes is not searched
    (tmp_path / MULTIRUN).write_text(OmegaConf.to_yaml(cfg))
    assert find_search(tmp_path).keys == {
        "trainer.lr": Space(log=True, bounds=(0.001, 0.3)),
        "prompt.length": Space(choices=[1, 5, 20]),
    }
    fixed = compose_config(["experiment=lr_search", "prompt.length=20"], return_hydra_config=True)
    (tmp_path / MULTIRUN).write_text(OmegaConf.to_yaml(fixed))
    assert list(find_search(tmp_path).keys) == ["trainer.lr"]
    # a basic sweep is no search
    (tmp_path / MULTIRUN).write_text(
        OmegaConf.to_yaml(compose_config(["experiment=quickstart"], return_hydra_config=True))
    )
    assert find_search(tmp_path) is None


def statuses(sweep_dir: Path) -> dict[str, dict]:
    """Each run folder of a sweep and its metrics.json."""
    return {path.parent.name: json.loads(path.read_text()) for path in sorted(sweep_dir.glob("*/metrics.json"))}


@pytest.mark.slow
def test_search_maximises_the_dev_metric_goes_on_past_a_failed_trial_and_replays_on_a_rerun(tmp_path):
    sweep_dir = tmp_path / "search"
    # seed=1 draws prompt lengths 0, 4, 2 for the first three trials (random, before TPE): length 0 is refused, so
    # that trial fails; the tiny model scores lengths 4 and 2 apart
    fixed = [item for item in quick_overrides("tiny-gpt2", seed="1") if not item.startswith("prompt.length=")]
    searched = ["trainer.lr=tag(log, interval(0.001, 0.3))", "prompt.length=choice(0, 1, 2, 4)"]
    args = ["softprompt.train", "-m", "hydra/sweeper=optuna", *searched, *fixed, f"hydra.sweep.dir={sweep_dir}"]
    first = run_cli(*args, "hydra.sweeper.n_trials=3")
    output = first.stdout + first.stderr
    # the failed trial is Optuna's failed trial, the others ran after it, and the exit status says one failed
    assert first.returncode == 1, output[-3000:]
    assert "Failed experiment" in output and "1 of 3 jobs failed: " in output
    runs = statuses(sweep_dir)
    assert sorted(record["status"] for record in runs.values()) == ["completed", "completed", "failed"], runs
    failed = next(name for name, record in runs.items() if record["status"] == "failed")
    assert runs[failed]["reason"] == "prompt.length=0 is not allowed: a number >= 1"
    values = {name: record["eval"]["accuracy"] for name, record in runs.items() if record["status"] == "completed"}
    assert len(set(values.values())) == 2, values

    # Optuna's best is the completed trial with the highest dev metric, with the values that run was given
    results = yaml.safe_load((sweep_dir / RESULTS).read_text())
    best = max(values, key=values.get)
    assert results["best_value"] == values[best]
    assert results["best_params"] == trial_values(sweep_dir / best, ["trainer.lr", "prompt.length"])

    # the report draws the trials and names Optuna's best
    assert (sweep_dir / "trials.png").is_file() and (sweep_dir / "trials.svg").is_file()
    report = (sweep_dir / "report.md").read_text()
    assert "![trials](trials.png)" in report and "3 trials (2 completed, 1 failed); Optuna's best: " in report

    # seeded, the same search proposes the same three trials again: two skipped, the refused one refused again;
    # with one more trial asked for, one new run trains after them
    finished = {name: (sweep_dir / name / "metrics.json").read_bytes() for name in values}
    second = run_cli(*args, "hydra.sweeper.n_trials=4")
    assert second.returncode == 1, (second.stdout + second.stderr)[-3000:]
    assert second.stdout.count("skipped, completed earlier") == 2 and second.stdout.count("accuracy: ") == 1
    assert {name: (sweep_dir / name / "metrics.json").read_bytes() for name in finished} == finished
    assert len(statuses(sweep_dir)) == 4 and "4 trials (" in (sweep_dir / "report.md").read_text()


@pytest.mark.slow
def test_a_search_where_every_trial_fails_ends_as_a_failed_sweep_without_a_traceback(tmp_path):
    sweep_dir = tmp_path / "search"
    fixed = quick_overrides("tiny-bert", **{"trainer.batch_size": "0"})
    searched = ["trainer.lr=tag(log, interval(0.001, 0.3))", "hydra.sweeper.n_trials=2"]
    result = run_cli(
        "softprompt.train", "-m", "hydra/sweeper=optuna", *searched, *fixed, f"hydra.sweep.dir={sweep_dir}"
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "No trials are completed" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("2 of 2 jobs failed: ")
    assert [record["status"] for record in statuses(sweep_dir).values()] == ["failed", "failed"]
    assert f"2 runs from {sweep_dir}: 2 failed." in (sweep_dir / "report.md").read_text()


@pytest.mark.skipif(int(version("sqlalchemy").split(".")[0]) < 2, reason="optuna 2.10 writes SQLAlchemy 1 databases")
def test_a_storage_optuna_cannot_write_is_refused_in_one_line_before_anything_runs(tmp_path):
    database = tmp_path / "search.db"
    result = run_cli(
        "softprompt.train",
        "-m",
        "experiment=lr_search",
        f"hydra.sweeper.storage=sqlite:///{database}",
        f"hydra.sweep.dir={tmp_path / 'search'}",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        f"error: hydra.sweeper.storage=sqlite:///{database} is not allowed with SQLAlchemy {version('sqlalchemy')}: "
        "the Optuna sweeper's optuna 2.10 writes databases only with SQLAlchemy < 2; leave storage out, the same "
        "command resumes the search from its sweep directory"
    ]
    assert list(tmp_path.iterdir()) == []


# a Python where every Hydra plugin but the Optuna sweeper is installed
WITHOUT_PLUGIN = """
import pathlib, sys, tempfile
import hydra_plugins
kept = pathlib.Path(tempfile.mkdtemp())
for folder in list(hydra_plugins.__path__):
    for plugin in pathlib.Path(folder).iterdir():
        if plugin.name != "hydra_optuna_sweeper":
            (kept / plugin.name).symlink_to(plugin)
hydra_plugins.__path__ = [str(kept)]
from softprompt.train import main
sys.argv = ["softprompt-train", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["hydra/sweeper=optuna", "trainer.lr=interval(0.001,0.3)"], ["experiment=lr_search"]])
def test_without_the_plugin_one_line_names_the_extra(argv, tmp_path):
    command = [sys.executable, "-c", WITHOUT_PLUGIN, "-m", *argv, f"hydra.sweep.dir={tmp_path / 'search'}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        f"error: hydra/sweeper=optuna needs Hydra's Optuna sweeper, which is not installed: {INSTALL}"
    ]
    assert not (tmp_path / "search").exists()
