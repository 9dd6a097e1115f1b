"""Reliability: exact resume after SIGKILL and SIGTERM, divergence, atomic and safe records, determinism,
one-line errors for every bad input, and random overrides that never end in a traceback.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from helpers import ROOT, completed_run, data_dir, quick_overrides, run_cli
from softprompt import checkpoint, zoo
from softprompt import run_dir as records
from softprompt.cli import compose_config
from softprompt.config import TrainConfig, validate
from softprompt.errors import UserError
from softprompt.train import train

# 8 batches an epoch, a checkpoint every 3 steps: kills land mid-epoch as well as on its edges;
# backbone dropout on, so the random states must come back exactly too
EVERY = 3
LONG = quick_overrides(
    "tiny-bert",
    steps=60,
    **{
        "trainer.log_every": "1",
        "trainer.eval_every": "10",
        "trainer.checkpoint_every": str(EVERY),
        "trainer.lr": "0.3",
        "trainer.backbone_dropout": "true",
    },
)


def start(run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "softprompt.train", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def logged_steps(run_dir: Path) -> int:
    path = run_dir / records.TRAIN_LOG
    return len(path.read_text().splitlines()) if path.is_file() else 0


def interrupt(run_dir: Path, overrides: list[str], signum: int, at_step: int) -> subprocess.CompletedProcess:
    """Start a run, send `signum` once its log shows `at_step` steps, and wait for it to end."""
    process = start(run_dir, overrides)
    deadline = time.monotonic() + 300
    while logged_steps(run_dir) < at_step and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert process.poll() is None, f"the run ended before step {at_step}: {process.communicate()[1][-2000:]}"
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def outcome(run_dir: Path) -> tuple[dict, list[tuple]]:
    """metrics.json without its timing keys, and every train_log entry's step, loss and learning rate."""
    metrics = records.read_json(run_dir / records.METRICS)
    log = [json.loads(line) for line in (run_dir / records.TRAIN_LOG).read_text().splitlines()]
    return (
        {key: value for key, value in metrics.items() if key not in records.TIMING_KEYS},
        [(entry["step"], entry["loss"], entry["lr"]) for entry in log],
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    return completed_run(tmp_path_factory.mktemp("reference") / "run", LONG)


# ---- a failed command deletes or changes nothing it did not create ----


def tree(root: Path) -> dict[str, str]:
    """Every file and folder under root (hidden ones too): a folder as 'dir', a file as the sha256 of its bytes."""
    return {
        str(path.relative_to(root)): "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
    }


def one_error(result: subprocess.CompletedProcess, code: int = 2) -> str:
    """The command's single `error:` line, after checking its exit status and that no traceback was printed."""
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def user_folder(folder: Path) -> list[str]:
    """A folder of the user's own files: a CSV task whose training file has a label task.labels lacks."""
    folder.mkdir(parents=True)
    (folder / "train.csv").write_text("sentence,label\ngreat,1\nodd,7\n")
    (folder / "dev.csv").write_text("sentence,label\nfine,1\ndull,0\n")
    (folder / "notes.txt").write_text("my own notes\n")
    (folder / "results").mkdir()
    (folder / "results" / "old.json").write_text('{"mine": true}\n')
    return [
        "task=custom",
        f"task.data_files.train={folder / 'train.csv'}",
        f"task.data_files.validation={folder / 'dev.csv'}",
        "task.text_fields=[sentence]",
        "task.template='Review: {sentence} Sentiment:'",
        "task.labels=[0,1]",
        *(item for item in quick_overrides("tiny-bert", steps=2) if not item.startswith("task.")),
    ]


@pytest.mark.slow
def test_a_data_error_in_a_folder_of_user_files_deletes_nothing(tmp_path):
    """hydra.run.dir=. inside the user's own folder, then a label error in one of its CSV files."""
    folder = tmp_path / "mine"
    overrides = user_folder(folder)
    before = tree(folder)
    result = run_cli("softprompt.train", *overrides, "hydra.run.dir=.", cwd=folder)
    assert "label 7 is not one of task.labels" in one_error(result)
    assert tree(folder) == before


@pytest.mark.slow
def test_a_failed_start_removes_the_folders_it_created_and_nothing_else(tmp_path):
    folder = tmp_path / "mine"
    overrides = user_folder(folder)
    before = tree(tmp_path)
    result = run_cli("softprompt.train", *overrides, f"hydra.run.dir={tmp_path / 'new' / 'a' / 'b'}")
    assert "label 7 is not one of task.labels" in one_error(result)
    assert tree(tmp_path) == before


@pytest.mark.slow
def test_resume_must_on_a_folder_of_user_files_deletes_nothing(tmp_path):
    folder = tmp_path / "mine"
    user_folder(folder)
    before = tree(folder)
    result = run_cli(
        "softprompt.train", *quick_overrides("tiny-bert", steps=2), "trainer.resume=must", f"hydra.run.dir={folder}"
    )
    assert "trainer.resume=must but" in one_error(result)
    assert tree(folder) == before


@pytest.mark.slow
def test_a_refused_rerun_leaves_a_completed_run_byte_identical(tmp_path):
    run_dir = tmp_path / "run"
    overrides = quick_overrides("tiny-bert", steps=2)
    first = run_cli("softprompt.train", *overrides, f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr[-3000:]
    before = tree(run_dir)
    assert {".hydra/config.yaml", "train.log", "metrics.json"} <= set(before)
    refused = run_cli("softprompt.train", *overrides, "trainer.lr=0.02", f"hydra.run.dir={run_dir}")
    assert "holds a checkpoint of another config (trainer.lr: 0.01 -> 0.02)" in one_error(refused)
    assert tree(run_dir) == before
    assert records.status(run_dir) == "completed"


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_matches_the_uninterrupted_run(tmp_path, uninterrupted):
    at_step = random.randint(EVERY + 1, 30)
    run_dir = tmp_path / "run"
    killed = interrupt(run_dir, LONG, signal.SIGKILL, at_step)
    assert killed.returncode == -signal.SIGKILL
    assert records.status(run_dir) == "running"
    saved = records.read_json(run_dir / checkpoint.CHECKPOINT_DIR / checkpoint.STATE)["progress"]["step"]
    assert EVERY <= saved and saved % EVERY == 0, (at_step, saved)

    resumed = run_cli("softprompt.train", *LONG, f"hydra.run.dir={run_dir}", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {saved}" in (run_dir / "train.log").read_text()
    assert outcome(run_dir) == outcome(uninterrupted), f"killed at step >= {at_step}, resumed from {saved}"
    assert (run_dir / "prompt" / "adapter_model.safetensors").read_bytes() == (
        uninterrupted / "prompt" / "adapter_model.safetensors"
    ).read_bytes()


@pytest.mark.slow
def test_sigterm_checkpoints_exits_143_and_the_rerun_completes_identically(tmp_path, uninterrupted):
    at_step = random.randint(2, 30)
    run_dir = tmp_path / "run"
    stopped = interrupt(run_dir, LONG, signal.SIGTERM, at_step)
    assert stopped.returncode == 128 + signal.SIGTERM
    metrics = records.read_json(run_dir / records.METRICS)
    state = records.read_json(run_dir / checkpoint.CHECKPOINT_DIR / checkpoint.STATE)["progress"]
    assert metrics["status"] == "preempted"
    assert metrics["reason"].startswith(f"stopped by SIGTERM at step {state['step']};")
    assert state["step"] >= at_step and state["result"] is None
    # the checkpoint is the step it stopped at: the log holds exactly those steps
    assert logged_steps(run_dir) == state["step"]

    rerun = run_cli("softprompt.train", *LONG, f"hydra.run.dir={run_dir}", timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert outcome(run_dir) == outcome(uninterrupted), f"stopped at step {state['step']}"


@pytest.mark.slow
def test_sigint_is_a_preemption_exit_130_and_the_rerun_completes_identically(tmp_path, uninterrupted):
    at_step = random.randint(2, 30)
    run_dir = tmp_path / "run"
    stopped = interrupt(run_dir, LONG, signal.SIGINT, at_step)
    assert stopped.returncode == 130
    assert "Traceback" not in stopped.stdout + stopped.stderr
    metrics = records.read_json(run_dir / records.METRICS)
    state = records.read_json(run_dir / checkpoint.CHECKPOINT_DIR / checkpoint.STATE)["progress"]
    assert metrics["status"] == "preempted"
    assert metrics["reason"].startswith(f"stopped by SIGINT at step {state['step']};")
    assert logged_steps(run_dir) == state["step"] >= at_step

    rerun = run_cli("softprompt.train", *LONG, f"hydra.run.dir={run_dir}", timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert outcome(run_dir) == outcome(uninterrupted), f"stopped at step {state['step']}"


def run_main(argv: list[str]) -> int:
    """softprompt-train in this process, as its console script runs it; returns the exit status."""
    from softprompt import train as command

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    old_argv = sys.argv
    sys.argv = ["softprompt-train", *argv]
    try:
        command.main()
    except SystemExit as stop:
        return stop.code
    finally:
        sys.argv = old_argv
        # Hydra configured logging for the command: give the test session its own back
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
    return 0


def leftovers(run_dir: Path) -> list[str]:
    """Half-written files: temporary files of atomic writes, folders being built."""
    return sorted(path.name for path in run_dir.rglob(".*") if path.name.endswith((".tmp", ".build", ".old")))


def test_a_second_sigint_stops_at_once_exit_130(tmp_path, monkeypatch, capsys):
    from softprompt import train as command

    after_step = command._after_step

    def ctrl_c_twice(run, bar):
        if run.progress.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return after_step(run, bar)

    monkeypatch.setattr(command, "_after_step", ctrl_c_twice)
    run_dir = tmp_path / "run"
    overrides = quick_overrides("tiny-bert", steps=20, **{"trainer.checkpoint_every": "2"})
    assert run_main([*overrides, f"hydra.run.dir={run_dir}"]) == 130
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    metrics = records.read_json(run_dir / records.METRICS)
    assert metrics["status"] == "preempted" and metrics["reason"].startswith("stopped at once by a second SIGINT")
    assert records.read_json(run_dir / checkpoint.CHECKPOINT_DIR / checkpoint.STATE)["progress"]["step"] == 2
    assert leftovers(run_dir) == []


def refuse_writes(monkeypatch, name: str, code: int) -> None:
    """Every rename onto a file or folder called `name` fails as a full (ENOSPC) or read-only (EACCES) disk would."""
    replace = os.replace

    def refusing(source, target):
        if Path(target).name == name:
            raise OSError(code, os.strerror(code), str(target))
        return replace(source, target)

    monkeypatch.setattr(os, "replace", refusing)


@pytest.mark.parametrize(
    "name,code", [(checkpoint.CHECKPOINT_DIR, errno.ENOSPC), ("prompt", errno.EACCES), ("env.json", errno.ENOSPC)]
)
def test_a_write_failure_mid_run_fails_the_run_in_one_line(tmp_path, monkeypatch, capsys, name, code):
    refuse_writes(monkeypatch, name, code)
    run_dir = tmp_path / "run"
    overrides = quick_overrides("tiny-bert", steps=4, **{"trainer.checkpoint_every": "2"})
    assert run_main([*overrides, f"hydra.run.dir={run_dir}"]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {run_dir / name}: {os.strerror(code)}"]
    metrics = records.read_json(run_dir / records.METRICS)
    assert metrics["status"] == "failed" and metrics["reason"] == errors[0].removeprefix("error: ")
    assert leftovers(run_dir) == []


def test_a_record_the_full_disk_refuses_leaves_no_temporary_file(tmp_path, monkeypatch, capsys):
    refuse_writes(monkeypatch, records.METRICS, errno.ENOSPC)
    run_dir = tmp_path / "run"
    assert run_main([*quick_overrides("tiny-bert", steps=2), f"hydra.run.dir={run_dir}"]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert [line for line in captured.err.splitlines() if line.startswith("error:")] == [
        f"error: {run_dir / records.METRICS}: {os.strerror(errno.ENOSPC)}"
    ]
    assert not (run_dir / records.METRICS).exists() and leftovers(run_dir) == []


def test_records_follow_the_umask(train_run):
    old = os.umask(0o022)
    try:
        run_dir, _ = train_run(quick_overrides("tiny-bert", steps=2))
        records.write_json(run_dir / "shared.json", {})
        os.umask(0o027)
        records.write_json(run_dir / "group.json", {})
    finally:
        os.umask(old)
    for name in (
        records.METRICS,
        records.ENV,
        records.TASK,
        f"{checkpoint.CHECKPOINT_DIR}/{checkpoint.STATE}",
        "shared.json",
    ):
        assert (run_dir / name).stat().st_mode & 0o777 == 0o644, name
    assert (run_dir / "group.json").stat().st_mode & 0o777 == 0o640


@pytest.mark.slow
def test_a_sweep_with_a_failed_job_exits_1_after_its_report(tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = quick_overrides("tiny-bert", steps=2, **{"prompt.length": "2,0"})
    result = run_cli("softprompt.train", "-m", *args, f"hydra.sweep.dir={sweep_dir}")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    assert (sweep_dir / "report.md").is_file()
    failed = [path.parent.name for path in sweep_dir.glob("*/metrics.json") if records.status(path.parent) == "failed"]
    summary = [line for line in result.stderr.splitlines() if "jobs failed" in line]
    assert summary == [f"1 of 2 jobs failed: {failed[0]}: prompt.length=0 is not allowed: a number >= 1"]


def test_a_completed_run_started_again_reports_it_without_training(uninterrupted):
    before = (uninterrupted / records.METRICS).read_text(), (uninterrupted / records.TRAIN_LOG).read_text()
    result = train(validate(compose_config(LONG)), uninterrupted)
    assert result["train_seconds"] == json.loads(before[0])["train_seconds"]
    assert ((uninterrupted / records.METRICS).read_text(), (uninterrupted / records.TRAIN_LOG).read_text()) == before


@pytest.mark.slow
def test_nonfinite_loss_fails_the_run_and_keeps_a_finite_prompt(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(
        "softprompt.train",
        *quick_overrides("tiny-bert", steps=20, **{"trainer.lr": "1e30"}),
        f"hydra.run.dir={run_dir}",
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(errors) == 1 and "the loss became nan at step" in errors[0]
    metrics = records.read_json(run_dir / records.METRICS)
    assert metrics["status"] == "failed" and metrics["reason"] in errors[0]
    prompt = load_file(str(run_dir / "prompt" / "adapter_model.safetensors"))["prompt_embeddings"]
    assert torch.isfinite(prompt).all()


SHORT = quick_overrides("tiny-llama", steps=6, **{"trainer.checkpoint_every": "2"})


def test_same_seed_gives_byte_identical_metrics_apart_from_timings(train_run):
    """metrics.json keeps its timing keys (run_dir.TIMING_KEYS, one line each); every other byte is the same."""
    first, _ = train_run(SHORT, "first")
    second, _ = train_run(SHORT, "second")

    def without_timings(path: Path) -> list[str]:
        lines = (path / records.METRICS).read_text().splitlines()
        return [line for line in lines if not line.strip().startswith(tuple(f'"{key}"' for key in records.TIMING_KEYS))]

    assert without_timings(first) == without_timings(second)
    assert len(without_timings(first)) < len((first / records.METRICS).read_text().splitlines())
    assert (first / "prompt" / "adapter_model.safetensors").read_bytes() == (
        second / "prompt" / "adapter_model.safetensors"
    ).read_bytes()


def test_resume_never_starts_over_and_a_changed_config_is_refused(train_run):
    run_dir, first = train_run(SHORT)
    again = train(validate(compose_config(SHORT + ["trainer.resume=never"])), run_dir)
    assert {k: v for k, v in again.items() if k not in records.TIMING_KEYS} == {
        k: v for k, v in first.items() if k not in records.TIMING_KEYS
    }
    assert [json.loads(line)["step"] for line in (run_dir / records.TRAIN_LOG).read_text().splitlines()] == [6]
    with pytest.raises(UserError, match=r"holds a checkpoint of another config \(trainer.lr: 0.01 -> 0.5\)"):
        train(validate(compose_config(SHORT + ["trainer.lr=0.5"])), run_dir)


def test_a_pickle_checkpoint_is_refused(train_run):
    run_dir, _ = train_run(SHORT)
    torch.save({"step": 1}, run_dir / checkpoint.CHECKPOINT_DIR / "optimizer.bin")
    with pytest.raises(UserError, match=r"holds pickle files \(optimizer.bin\), which can run code when loaded"):
        train(validate(compose_config(SHORT)), run_dir)


def test_checkpoint_tensors_are_safetensors_and_the_rest_json(train_run):
    run_dir, _ = train_run(SHORT)
    folder = run_dir / checkpoint.CHECKPOINT_DIR
    assert sorted(path.name for path in folder.iterdir()) == [
        checkpoint.BEST_PROMPT,
        checkpoint.STATE,
        checkpoint.TENSORS,
    ]
    tensors = load_file(str(folder / checkpoint.TENSORS))
    assert {
        "model.peft_model.prompt_encoder.default.embedding.weight",
        "rng.torch",
        "rng.numpy",
        "data.generator",
    } <= set(tensors)
    assert any(key.startswith("optimizer.0.exp_avg") for key in tensors)
    assert not list(run_dir.glob(".checkpoint*")), "no build or old folder is left beside the checkpoint"


# ---- bad input: one case per mistake and command; each ends in one `error:` line and exit status 2 ----
# (a command other than softprompt-train and -zoo adds its cases with @case("report: ...") and so on)


@dataclass
class Case:
    """A command line that must fail in one line: the module run with `python -m`, and a fragment of its message."""

    module: str
    args: list[str]
    message: str
    # an output folder the command must not leave behind (a train run directory, a zoo model folder)
    output: Path | None = None
    env: dict[str, str] = field(default_factory=dict)


CASES: dict[str, Callable[[Path], Case]] = {}


def case(name: str):
    def register(build: Callable[[Path], Case]) -> Callable[[Path], Case]:
        CASES[name] = build
        return build

    return register


def train_case(tmp: Path, overrides: list[str], message: str) -> Case:
    run_dir = tmp / "run"
    quick = [item for item in quick_overrides("tiny-bert", steps=2) if not item.startswith("task.")]
    args = quick + overrides + [f"hydra.run.dir={run_dir}"]
    return Case("softprompt.train", args, message, output=run_dir)


# bad task data (missing, empty, invalid JSON, missing column, unknown label): tests/test_tasks.py::test_bad_data_is_one_line_and_exit_2


@case("train: verbalizer word that tokenizes to nothing")
def _(tmp):
    return train_case(
        tmp,
        ["task.verbalizer=['',positive]"],
        "task.verbalizer='' is not allowed: words that tokenize to at least one token",
    )


@case("train: from_file prompt of the wrong width")
def _(tmp):
    folder = tmp / "other_prompt"
    folder.mkdir()
    save_file({"prompt_embeddings": torch.zeros(4, 16)}, str(folder / "adapter_model.safetensors"))
    return train_case(
        tmp, ["prompt.init=from_file", f"prompt.path={folder}"], "a prompt of width 32 (this one has width 16)"
    )


@case("train: from_file prompt saved as a pickle")
def _(tmp):
    folder = tmp / "pickled_prompt"
    folder.mkdir()
    torch.save({"prompt_embeddings": torch.zeros(4, 32)}, folder / "adapter_model.bin")
    return train_case(tmp, ["prompt.init=from_file", f"prompt.path={folder}"], "holding adapter_model.safetensors")


@case("train: run directory under a regular file")
def _(tmp):
    (tmp / "file.txt").write_text("not a folder")
    built = train_case(tmp, [], "")
    built.args[-1] = f"hydra.run.dir={tmp / 'file.txt' / 'run'}"
    built.message = f"hydra.run.dir='{tmp / 'file.txt' / 'run'}' is not allowed: a folder that can be created ({tmp / 'file.txt'} is a file)"
    built.output = tmp / "file.txt" / "run"
    return built


@case("train: run directory under a read-only folder")
def _(tmp):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    locked = tmp / "locked"
    locked.mkdir(mode=0o555)
    built = train_case(tmp, [], f"a folder that can be created ({locked} is not writable)")
    built.args[-1] = f"hydra.run.dir={locked / 'run'}"
    built.output = locked / "run"
    return built


@case("train: resume=must without a checkpoint")
def _(tmp):
    return train_case(tmp, ["trainer.resume=must"], "trainer.resume=must but")


@case("train: trainer.resume unknown")
def _(tmp):
    return train_case(tmp, ["trainer.resume=maybe"], "trainer.resume='maybe' is not allowed: one of: auto, never, must")


@case("train: trainer.checkpoint_every 0")
def _(tmp):
    return train_case(tmp, ["trainer.checkpoint_every=0"], "trainer.checkpoint_every=0 is not allowed: a number >= 1")


@case("zoo: unknown model name")
def _(tmp):
    return Case(
        "softprompt.zoo", ["install", "nope"], "model='nope' is not allowed: one of: " + ", ".join(sorted(zoo.ZOO))
    )


@case("zoo: install while the package index cannot be reached")
def _(tmp):
    missing = [
        entry.name for entry in zoo.ZOO.values() if not any(zoo._installed_site(spec) for spec in entry.packages)
    ]
    if not missing:
        pytest.skip("every zoo entry's packages are installed, so none needs the index")
    unreachable = {
        "SOFTPROMPT_ZOO_DIR": str(tmp / "zoo"),
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_EXTRA_INDEX_URL": "",
        "PIP_FIND_LINKS": "",
        "PIP_RETRIES": "0",
        "PIP_TIMEOUT": "2",
    }
    return Case(
        "softprompt.zoo",
        ["install", missing[0]],
        "(is PyPI reachable?)",
        output=tmp / "zoo" / missing[0],
        env=unreachable,
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_gives_one_line_and_exit_2(tmp_path, name):
    bad = CASES[name](tmp_path)
    result = run_cli(bad.module, *bad.args, env=bad.env, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1 and bad.message in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    if bad.output is not None:
        assert not bad.output.exists(), "a failed command must leave no output folder behind"


# ---- random overrides against the schema: a UserError or a valid config, never anything else ----

LEAVES = sorted(checkpoint.comparable_config(validate(compose_config([]))))
GROUPS = ["model", "task", "prompt", "trainer"]
AWKWARD = [
    "null",
    "''",
    "[]",
    "{}",
    "[1,2]",
    "{a: 1}",
    "${nope}",
    "${oc.env:HOME}",
    "${model.name}",
    "nan",
    "inf",
    "-inf",
    "1e400",
    "true",
    "~",
    "a=b",
    "'x,y'",
]
VALUES = st.one_of(
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(AWKWARD + ["custom", "tiny-t5", "lester", "minilm-l6"]),
    st.text(alphabet="abc01 ,.:=[]{}()'\"$\\-_/", max_size=10),
)
OVERRIDE = st.tuples(st.sampled_from(LEAVES + GROUPS), VALUES).map(lambda pair: f"{pair[0]}={pair[1]}")


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(st.lists(OVERRIDE, min_size=1, max_size=3))
def test_random_overrides_give_a_config_or_a_user_error(overrides):
    try:
        cfg = validate(compose_config(overrides))
    except UserError as error:
        assert "\n" not in str(error).strip()
        return
    assert isinstance(cfg, TrainConfig)


@pytest.mark.slow
def test_a_preempted_generation_run_resumes_to_the_same_answers(tmp_path):
    """task.eval_rows keeps the best step's parameters in the checkpoint: the resumed run scores the same prompt
    on the whole split and writes the same answers."""
    overrides = [
        *(item for item in quick_overrides("tiny-llama", steps=8) if not item.startswith("task.builtin_size")),
        *("task=e2e", "task.max_train_rows=48", "task.max_eval_rows=40", "task.eval_rows=3"),
        *("generation.max_new_tokens=6", "trainer.lr=0.3", "trainer.log_every=1", "trainer.checkpoint_every=1"),
    ]
    data_dir("e2e")
    reference = completed_run(tmp_path / "reference", overrides)
    run_dir = tmp_path / "run"
    assert interrupt(run_dir, overrides, signal.SIGTERM, at_step=4).returncode == 128 + signal.SIGTERM
    assert records.read_json(run_dir / records.METRICS)["status"] == "preempted"
    completed_run(run_dir, overrides)

    def kept(path: Path) -> tuple:
        metrics = records.read_json(path / records.METRICS)
        log = [json.loads(line) for line in (path / records.TRAIN_LOG).read_text().splitlines()]
        return (
            {key: value for key, value in metrics.items() if key not in records.TIMING_KEYS},
            [{key: value for key, value in entry.items() if key != "samples_per_second"} for entry in log],
            (path / records.PREDICTIONS).read_text(),
        )

    assert kept(run_dir) == kept(reference)
    assert records.read_json(reference / records.METRICS)["eval_subset"]["rows"] == 3
