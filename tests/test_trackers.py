"""Experiment trackers: what a run logs to TensorBoard, MLflow and W&B (offline), read back from their own files
and compared with the run's records; names Accelerate does not know, and trackers not installed, refused in one
line with nothing written."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
from accelerate.utils import LoggerType

from helpers import quick_overrides, run_cli
from softprompt import run_dir as records
from softprompt import trackers, train
from softprompt.cli import compose_config
from softprompt.config import register_configs, validate
from softprompt.errors import ConfigError, UserError


def logged(run_path: Path) -> list[dict]:
    return [json.loads(line) for line in (run_path / records.TRAIN_LOG).read_text().splitlines()]


def tensorboard_scalars(run_path: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows for the run: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_path / trackers.PROJECT), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def mlflow_runs(run_path: Path) -> list[tuple[object, dict[str, list[tuple[int, float]]]]]:
    """The runs of the MLflow store in the run directory, oldest first, each with its metric histories."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(trackers.PROJECT)
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    return [
        (
            run,
            {
                key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
                for key in run.data.metrics
            },
        )
        for run in runs
    ]


def wandb_records(path: Path):
    """The records of a .wandb file (W&B's offline run log: a LevelDB-style log of protobuf records in 32 KiB
    blocks after a 7-byte file header); wandb 0.31 ships no reader of its own."""
    from wandb.proto import wandb_internal_pb2

    data, block, position, pieces = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        if block - position % block < 7:
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pieces += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def assert_close(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    assert [step for step, _ in got] == [step for step, _ in expected]
    # TensorBoard keeps float32
    assert all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for (_, a), (_, b) in zip(got, expected)), (got, expected)


def expected_values(run_path: Path) -> tuple[dict[str, list[tuple[int, float]]], dict]:
    """What the trackers should hold, from the run's own records: loss and lr at each logged step, the
    evaluation at step 0 and at the best step as metrics.json has them."""
    entries = logged(run_path)
    metrics = records.read_json(run_path / records.METRICS)
    return {
        "train/loss": [(e["step"], e["loss"]) for e in entries],
        "train/lr": [(e["step"], e["lr"]) for e in entries],
    }, metrics


TRACKED = quick_overrides("tiny-bert", steps=4, **{"trainer.log_every": "1", "trainer.eval_every": "2"})


def test_names_are_accelerates_one_or_a_list():
    assert set(trackers.NAMES) == {kind.value for kind in LoggerType} - {"all"}
    assert {"tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive"} <= set(trackers.NAMES)
    assert trackers.tracker_names(None) == []
    assert trackers.tracker_names("tensorboard") == ["tensorboard"]
    assert trackers.tracker_names(["tensorboard", "mlflow", "tensorboard"]) == ["tensorboard", "mlflow"]
    register_configs()
    one = validate(compose_config(["trainer.log_with=tensorboard"]))
    assert one.trainer.log_with == "tensorboard"
    both = validate(compose_config(["trainer.log_with=[tensorboard,mlflow]"]))
    assert both.trainer.log_with == ["tensorboard", "mlflow"]
    for bad in (
        "trainer.log_with=neptune",
        "trainer.log_with=[tensorboard,neptune]",
        "trainer.log_with=3",
        "trainer.log_with=all",
    ):
        with pytest.raises(
            ConfigError, match=r"trainer.log_with=.* is not allowed: one of .*mlflow.*, or a list of them"
        ):
            validate(compose_config([bad]))


def test_an_unknown_tracker_is_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys):
    run_path = tmp_path / "run"
    monkeypatch.setattr(
        sys, "argv", ["softprompt-train", "trainer.log_with=[tensorboard,neptune]", f"hydra.run.dir={run_path}"]
    )
    with pytest.raises(SystemExit) as stopped:
        train.main()
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: trainer.log_with=['tensorboard', 'neptune'] is not allowed: one of ")
    assert "mlflow" in err and "wandb" in err and "[tensorboard,mlflow]" in err
    assert not run_path.exists()


def test_a_tracker_not_installed_names_what_to_install(monkeypatch):
    monkeypatch.setattr(trackers, "get_available_trackers", lambda: [LoggerType.TENSORBOARD])
    trackers.check_installed("tensorboard")
    with pytest.raises(UserError) as refused:
        trackers.check_installed(["tensorboard", "mlflow", "comet_ml"])
    assert str(refused.value) == (
        "trainer.log_with: the mlflow, comet_ml trackers are not installed: pip install 'softprompt[mlflow]' comet_ml"
    )


@pytest.mark.slow
def test_a_tracker_not_installed_stops_the_command_with_nothing_written(tmp_path):
    available = {kind.value for kind in trackers.get_available_trackers()}
    missing = next((name for name in trackers.NAMES if name not in available), None)
    if missing is None:
        pytest.skip("every tracker Accelerate supports is installed")
    run_path = tmp_path / "new" / "run"
    result = run_cli(
        "softprompt.train", *TRACKED, f"trainer.log_with=[tensorboard,{missing}]", f"hydra.run.dir={run_path}"
    )
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: trainer.log_with: the {missing} tracker is not installed: pip install {missing}"], (
        result.stderr[-3000:]
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_tensorboard_and_mlflow_hold_the_config_losses_and_evaluations(train_run, tmp_path, monkeypatch, capfd):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    run_path, _ = train_run([*TRACKED, "trainer.log_with=[tensorboard,mlflow]"])
    # a new sqlite store is made without MLflow's notes on each table it creates
    assert "MLflow database" not in capfd.readouterr().err
    expected, metrics = expected_values(run_path)
    assert [step for step, _ in expected["train/loss"]] == [1, 2, 3, 4]
    evaluations = {0: metrics["initial_eval"]["accuracy"], metrics["best_step"]: metrics["eval"]["accuracy"]}

    scalars = tensorboard_scalars(run_path)
    assert set(scalars) == {"train/loss", "train/lr", "eval/accuracy"}
    assert_close(scalars["train/loss"], expected["train/loss"])
    assert_close(scalars["train/lr"], expected["train/lr"])
    assert [step for step, _ in scalars["eval/accuracy"]] == [0, 2, 4]
    assert_close([s for s in scalars["eval/accuracy"] if s[0] in evaluations], sorted(evaluations.items()))

    [(run, histories)] = mlflow_runs(run_path)
    assert run.info.run_name == run_path.name and run.info.status == "FINISHED"
    assert run.data.params["trainer.lr"] == "0.01" and run.data.params["model.name"] == "tiny-bert"
    assert histories["train/loss"] == expected["train/loss"]
    assert histories["train/lr"] == expected["train/lr"]
    assert [step for step, _ in histories["eval/accuracy"]] == [0, 2, 4]
    assert [s for s in histories["eval/accuracy"] if s[0] in evaluations] == sorted(evaluations.items())
    # MLflow's store is the run directory's, not the working directory's; the next run in this process (a sweep's
    # next job) has a store of its own
    assert list(tmp_path.iterdir()) == [run_path]
    next_path, _ = train_run([*TRACKED, "trainer.log_with=mlflow"], name="next")
    assert [run.info.run_name for run, _ in mlflow_runs(next_path)] == ["next"]
    assert len(mlflow_runs(run_path)) == 1


@pytest.mark.slow
def test_wandb_runs_offline_in_the_run_directory(train_run, tmp_path, monkeypatch):
    for variable in ("WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    run_path, _ = train_run([*TRACKED, "trainer.log_with=wandb"])
    expected, metrics = expected_values(run_path)

    [log_file] = (run_path / "wandb").glob("offline-run-*/run-*.wandb")
    history: dict[str, list[tuple[int, float]]] = {}
    config, name = {}, None
    for record in wandb_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            name = record.run.display_name
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            # a history key comes as a path of nested keys (one part here: "train/loss" is one name)
            row = {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for key, value in row.items():
                if "/" in key:
                    history.setdefault(key, []).append((row["_step"], value))
    assert name == run_path.name
    assert config["trainer.lr"] == 0.01 and config["model.name"] == "tiny-bert"
    assert history["train/loss"] == expected["train/loss"]
    assert history["train/lr"] == expected["train/lr"]
    assert history["eval/accuracy"][0] == (0, metrics["initial_eval"]["accuracy"])
    assert dict(history["eval/accuracy"])[metrics["best_step"]] == metrics["eval"]["accuracy"]


@pytest.mark.slow
def test_a_run_resumed_after_a_crash_logs_each_step_once(train_run, tmp_path, monkeypatch):
    """Killed after step 3 with its checkpoint at step 2: the resumed run is a second MLflow run from step 3,
    and TensorBoard shows every step once, the earlier attempt's step 3 hidden; a run started over hides all."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = [
        *quick_overrides("tiny-bert", steps=6, **{"trainer.log_every": "1", "trainer.checkpoint_every": "2"}),
        "trainer.log_with=[tensorboard,mlflow]",
    ]
    after_step = train._after_step

    def crash_at_step_3(run, bar):
        done = after_step(run, bar)
        if run.progress.step == 3:
            raise RuntimeError("killed")
        return done

    monkeypatch.setattr(train, "_after_step", crash_at_step_3)
    with pytest.raises(RuntimeError, match="killed"):
        train_run(overrides)
    monkeypatch.setattr(train, "_after_step", after_step)
    run_path, _ = train_run(overrides)
    expected, _ = expected_values(run_path)
    assert [step for step, _ in expected["train/loss"]] == [1, 2, 3, 4, 5, 6]

    assert_close(tensorboard_scalars(run_path)["train/loss"], expected["train/loss"])
    (first, crashed), (second, resumed) = mlflow_runs(run_path)
    assert first.info.run_name == second.info.run_name == run_path.name
    assert [step for step, _ in crashed["train/loss"]] == [1, 2, 3]
    assert resumed["train/loss"] == expected["train/loss"][2:]

    train_run([*overrides, "trainer.resume=never"])
    scalars = tensorboard_scalars(run_path)
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [step for step, _ in scalars["eval/accuracy"]] == [0, 3, 6]
    assert len(mlflow_runs(run_path)) == 3
