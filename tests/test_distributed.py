"""Several processes on CPU (gloo): one run directory, one voice, data-parallel equivalence, sweeps of
multi-process jobs through hydra/launcher=accelerate, and submitit's local launcher with two tasks per job.

Every multi-process start costs ~10 s of imports on 2 cores, so each test starts as few as it can.
"""

from __future__ import annotations

import json

import pytest

from helpers import assert_same_training, equivalence_overrides, quick_overrides, read_train_log, run_cli
from softprompt.cli import compose_config
from softprompt.distributed import check_launch
from softprompt.errors import UserError

PER_DEVICE_BATCH = 8
SUMMARY = "trainable parameters:"


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """One torchrun job of 2 processes with per-device batch b: (completed process, its output root)."""
    root = tmp_path_factory.mktemp("torchrun")
    result = run_cli(
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "softprompt.train",
        *equivalence_overrides(PER_DEVICE_BATCH),
        f"output_root={root}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result, root


@pytest.mark.slow
def test_two_processes_write_one_complete_run_directory_and_speak_once(two_processes):
    result, root = two_processes
    runs = list((root / "runs").iterdir())
    assert len(runs) == 1, runs
    run_dir = runs[0]
    for name in (
        "metrics.json",
        "env.json",
        "task.json",
        "train_log.jsonl",
        "train.log",
        "prompt/adapter_model.safetensors",
        ".hydra/config.yaml",
    ):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"
    env = json.loads((run_dir / "env.json").read_text())
    assert env["num_processes"] == 2 and env["per_device_batch_size"] == PER_DEVICE_BATCH
    assert env["sharding"] == "none"
    assert env["effective_batch_size"] == 2 * PER_DEVICE_BATCH
    output = result.stdout + result.stderr
    assert output.count(SUMMARY) == 1, output[-3000:]
    assert output.count("step 0: accuracy=") == 1
    log_lines = (run_dir / "train.log").read_text().splitlines()
    assert sum("step 0:" in line for line in log_lines) == 1
    assert [entry["step"] for entry in read_train_log(run_dir)] == [1, 2, 3, 4]


@pytest.mark.slow
def test_two_processes_of_batch_b_equal_one_process_of_batch_2b(two_processes, train_run):
    _, root = two_processes
    distributed = next((root / "runs").iterdir())
    single, _ = train_run(equivalence_overrides(2 * PER_DEVICE_BATCH))

    assert_same_training(distributed, single)


@pytest.mark.slow
def test_distributed_sweep_runs_each_job_as_its_own_accelerate_launch_and_resumes(tmp_path):
    common = [
        "-m",
        "hydra/launcher=accelerate",
        "hydra.launcher.num_processes=2",
        *quick_overrides("tiny-bert", steps=2, **{"prompt.length": "2"}),
        f"output_root={tmp_path}",
    ]
    # the third job's config is wrong (init=text without a text): it fails alone, the others go on
    first = run_cli("softprompt.train", *common, "prompt.init=class_labels,random_uniform,text")
    assert first.returncode == 1, first.stderr[-3000:]
    assert "1 of 3 jobs failed: " in first.stdout + first.stderr
    sweep_dir = tmp_path / "sweeps" / "multirun"
    jobs = sorted(path for path in sweep_dir.iterdir() if path.is_dir() and not path.name.startswith("."))
    assert len(jobs) == 3
    by_init = {
        init: next(job for job in jobs if f"_{init}_" in job.name)
        for init in ("class_labels", "random_uniform", "text")
    }
    failed = json.loads((by_init["text"] / "metrics.json").read_text())
    assert failed["status"] == "failed" and "prompt.text" in failed["reason"]
    for init in ("class_labels", "random_uniform"):
        job = by_init[init]
        assert json.loads((job / "metrics.json").read_text())["status"] == "completed"
        env = json.loads((job / "env.json").read_text())
        assert env["num_processes"] == 2 and env["effective_batch_size"] == 16
    assert (first.stdout + first.stderr).count(SUMMARY) == 2
    assert (sweep_dir / "report.md").is_file()

    # the same sweep again: completed jobs are found by their config key and not launched at all
    stamps = {job.name: (job / "metrics.json").stat().st_mtime_ns for job in jobs}
    again = run_cli("softprompt.train", *common, "prompt.init=class_labels,random_uniform")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("skipped, completed earlier") == 2
    assert SUMMARY not in again.stdout
    assert all((sweep_dir / name / "metrics.json").stat().st_mtime_ns == stamp for name, stamp in stamps.items())


@pytest.mark.slow
def test_submitit_local_runs_a_sweep_with_two_processes_per_job(tmp_path):
    """The SLURM code path on one machine: two tasks per job, joined through submitit's environment, each job's
    backbone sharded across them."""
    result = run_cli(
        "softprompt.train",
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.tasks_per_node=2",
        "trainer.sharding=fsdp",
        *quick_overrides("tiny-bert", steps=2),
        "prompt.length=2,4",
        f"output_root={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = tmp_path / "sweeps" / "multirun"
    jobs = sorted(path for path in sweep_dir.iterdir() if path.is_dir() and not path.name.startswith("."))
    assert [job.name.split("_")[2] for job in jobs] == ["len2", "len4"]
    for job in jobs:
        assert json.loads((job / "metrics.json").read_text())["status"] == "completed"
        env = json.loads((job / "env.json").read_text())
        assert (env["num_processes"], env["sharding"]) == (2, "fsdp")
    # each job's rank 1 stayed quiet: the summary is only in rank 0's submitit log
    logs = {path.name: path.read_text() for path in sweep_dir.glob(".submitit/*/*_log.out")}
    assert len(logs) == 4
    assert sorted(name.rsplit("_", 2)[1] for name, text in logs.items() if SUMMARY in text) == ["0", "0"]


def test_slurm_config_starts_one_process_per_gpu_on_every_node():
    launcher = compose_config(
        [
            "hydra/launcher=slurm",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.nodes=2",
            "hydra.launcher.gpus_per_node=4",
        ],
        return_hydra_config=True,
    ).hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 2, 4, 4)
    assert launcher.timeout_min > 0


@pytest.mark.slow
def test_zero3_is_refused_in_one_line_before_anything_loads():
    result = run_cli(
        "softprompt.train",
        "model=tiny-bert",
        env={"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: DeepSpeed ZeRO-3 is not supported")


@pytest.mark.parametrize(
    "env, argv, message",
    [
        ({"WORLD_SIZE": "2", "RANK": "0"}, ["-m", "prompt.length=1,5"], "-m/--multirun inside a multi-process launch"),
        (
            {"WORLD_SIZE": "2", "RANK": "0"},
            ["--multirun", "prompt.length=1,5"],
            "-m/--multirun inside a multi-process launch",
        ),
    ],
)
def test_launches_that_cannot_work_are_refused(monkeypatch, env, argv, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError, match=message.replace("/", ".")):
        check_launch(["model=tiny-bert", *argv])


def test_a_single_process_sweep_is_allowed(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    check_launch(["-m", "prompt.length=1,5"])
