"""Sweeps: every preset composes, reruns skip finished jobs, killed sweeps resume, failures are reported."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from helpers import ROOT, quick_overrides, run_cli
from softprompt.cli import compose_config, job_overrides
from softprompt.config import validate
from softprompt.sweep import completed_record, config_key, job_name
from softprompt.task import data_root  # noqa: F401  (registers ${softprompt_data:} used by the task configs)

EXPERIMENTS = sorted(path.stem for path in (ROOT / "conf" / "experiment").glob("*.yaml"))


def sweep_args(sweep_dir: Path, lengths: str, *overrides: str, steps: int = 4) -> list[str]:
    """A multirun over prompt lengths of tiny-bert jobs on the embedded task, a few steps each, into sweep_dir."""
    quick = quick_overrides("tiny-bert", steps=steps, **{"prompt.length": lengths})
    return ["softprompt.train", "-m", *quick, *overrides, f"hydra.sweep.dir={sweep_dir}"]


def job_dirs(sweep_dir: Path) -> dict[str, str | None]:
    """Each job folder of a sweep and the status its metrics.json records (None: none written)."""
    statuses = {}
    for folder in sorted(path for path in sweep_dir.iterdir() if (path / ".hydra").is_dir()):
        metrics = folder / "metrics.json"
        statuses[folder.name] = json.loads(metrics.read_text())["status"] if metrics.is_file() else None
    return statuses


def test_config_key_ignores_output_paths_and_display_only():
    base = compose_config(["model=tiny-bert"])
    assert config_key(base) == config_key(
        compose_config(["model=tiny-bert", "output_root=/elsewhere", "trainer.progress_bar=false"])
    )
    assert config_key(base) != config_key(compose_config(["model=tiny-bert", "prompt.length=5"]))
    assert config_key(base) != config_key(compose_config(["model=tiny-bert", "seed=1"]))
    assert job_name(base) == f"tiny-bert_reviews_len20_class_labels_seed0_{config_key(base)}"


def test_completed_record_needs_the_same_key(tmp_path):
    from softprompt import run_dir as records

    records.write_json(tmp_path / "metrics.json", {"status": "running", "config_key": "abc"})
    assert completed_record(tmp_path, "abc") is None
    records.mark(tmp_path, "completed")
    assert completed_record(tmp_path, "abc")["status"] == "completed"
    assert completed_record(tmp_path, "other") is None


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_value_composes_and_validates(experiment):
    """Every value each preset sweeps over (every model and task it names, both ends of a range Optuna searches)
    composes and validates."""
    cfg = compose_config([f"experiment={experiment}"], return_hydra_config=True)
    assert cfg.hydra.sweep.dir == f"outputs/sweeps/{experiment}"
    for key, values in (cfg.hydra.sweeper.params or {}).items():
        (swept,) = OverridesParser.create().parse_overrides([f"{key}={values}"])
        if swept.is_interval_sweep():
            jobs = [[f"experiment={experiment}", f"{key}={end}"] for end in (swept.value().start, swept.value().end)]
        else:
            jobs = job_overrides([f"experiment={experiment}", f"{key}={values}"], multirun=True)
        assert len(jobs) >= 2, (key, values)
        for job in jobs:
            validate(compose_config(job))


def test_lester_preset_is_the_paper_setup():
    cfg = compose_config(["experiment=lester"], return_hydra_config=True)
    assert (cfg.trainer.optimizer, cfg.trainer.lr, cfg.trainer.batch_size, cfg.trainer.max_steps) == (
        "adafactor",
        0.3,
        32,
        30000,
    )
    assert (cfg.prompt.length, cfg.prompt.init) == (100, "class_labels")
    models = cfg.hydra.sweeper.params.model.split(",")
    assert models == [f"t5-{size}-lm-adapt" for size in ("small", "base", "large", "xl", "xxl")]
    sizes = [compose_config([f"model={model}"]).model for model in models]
    assert [model.name_or_path for model in sizes] == [f"google/{model}" for model in models]
    assert [model.num_params for model in sizes] == [76961152, 247577856, 783150080, 2849757184, 11135332352]
    assert {model.kind for model in sizes} == {"encoder_decoder"}


@pytest.mark.slow
def test_rerun_skips_finished_jobs_and_a_failing_job_is_reported(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # prompt.length=0 is impossible: that job fails, the other two complete
    args = sweep_args(sweep_dir, "2,4,0", "experiment=quickstart")
    first = run_cli(*args, timeout=600)
    # every job ran and the report is written, and the exit status says one job failed
    assert first.returncode == 1, first.stderr[-3000:]
    assert "1 of 3 jobs failed: " in first.stdout + first.stderr
    statuses = job_dirs(sweep_dir)
    assert sorted(statuses.values()) == ["completed", "completed", "failed"], statuses
    assert first.stdout.count("accuracy: ") == 2

    table = pd.read_csv(sweep_dir / "results.csv")
    assert sorted(table["status"]) == ["completed", "completed", "failed"]
    assert table.set_index("prompt_length").loc[0, "reason"] == "prompt.length=0 is not allowed: a number >= 1"
    report = (sweep_dir / "report.md").read_text()
    assert "**failed**: prompt.length=0 is not allowed" in report
    assert (sweep_dir / "by_prompt_length.png").is_file() and (sweep_dir / "by_prompt_length.svg").is_file()

    finished = {
        name: (sweep_dir / name / "metrics.json").read_bytes()
        for name, status in statuses.items()
        if status == "completed"
    }
    started = time.perf_counter()
    second = run_cli(*args, timeout=600)
    assert second.returncode == 1, second.stderr[-3000:]
    # nothing trained again: the completed jobs are skipped untouched, the impossible one fails again
    assert "accuracy: " not in second.stdout and second.stdout.count("skipped, completed earlier") == 2
    assert {name: (sweep_dir / name / "metrics.json").read_bytes() for name in finished} == finished
    assert time.perf_counter() - started < 60


@pytest.mark.slow
def test_killed_sweep_trains_only_the_missing_jobs(tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = sweep_args(sweep_dir, "2,3,4", steps=40)
    process = subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=os.environ.copy(),
    )
    try:
        deadline = time.monotonic() + 300
        while "completed" not in (job_dirs(sweep_dir).values() if sweep_dir.is_dir() else ()):
            assert process.poll() is None and time.monotonic() < deadline, "the first job never completed"
            time.sleep(0.2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    before = job_dirs(sweep_dir)
    done = {name for name, status in before.items() if status == "completed"}
    assert 1 <= len(done) < 3, before
    assert not (sweep_dir / "report.md").exists()

    resumed = run_cli(*args, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("skipped, completed earlier") == len(done)
    assert resumed.stdout.count("accuracy: ") == 3 - len(done)
    assert set(job_dirs(sweep_dir).values()) == {"completed"} and len(job_dirs(sweep_dir)) == 3
    assert set(pd.read_csv(sweep_dir / "results.csv")["status"]) == {"completed"}
