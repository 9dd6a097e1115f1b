"""softprompt-report on hand-made run directories: the table, mean +- std over seeds, failures, figures."""

from __future__ import annotations

import importlib
import shutil
import statistics

import pandas as pd
import pytest
from omegaconf import OmegaConf

from helpers import make_run, run_cli
from softprompt import run_dir as records
from softprompt.report import write_report

# (model, parameters, prompt length, seed) -> accuracy
ACCURACY = {
    ("minilm-l6", 22_713_216, 1, 0): 0.70,
    ("minilm-l6", 22_713_216, 1, 1): 0.74,
    ("minilm-l6", 22_713_216, 20, 0): 0.80,
    ("minilm-l6", 22_713_216, 20, 1): 0.84,
    ("mpnet-base", 109_486_464, 1, 0): 0.81,
    ("mpnet-base", 109_486_464, 1, 1): 0.85,
    ("mpnet-base", 109_486_464, 20, 0): 0.90,
    ("mpnet-base", 109_486_464, 20, 1): 0.94,
}


def completed(model: str, params: int, length: int, seed: int, value: float) -> dict:
    return {
        "status": "completed",
        "model": model,
        "model_params": params,
        "task": "reviews",
        "main_metric": "accuracy",
        "eval": {"accuracy": value},
        "initial_eval": {"accuracy": 0.5},
        "best_step": 100,
        "seed": seed,
        "trainable_params": {"prompt": length * 384, "head": 770, "total": length * 384 + 770},
        "train_seconds": 12.5,
    }


@pytest.fixture
def sweep(tmp_path):
    """Two models x two prompt lengths x two seeds, plus one failed and one never-finished run."""
    for (model, params, length, seed), value in ACCURACY.items():
        make_run(
            tmp_path,
            f"{model}_{length}_{seed}",
            [f"model={model}", f"prompt.length={length}", f"seed={seed}"],
            completed(model, params, length, seed, value),
        )
    make_run(
        tmp_path,
        "failed",
        ["model=mpnet-base", "prompt.length=20", "seed=2"],
        {"status": "failed", "reason": "out of memory"},
    )
    make_run(tmp_path, "killed", ["model=minilm-l6", "prompt.length=20", "seed=2"], None)
    return tmp_path


def test_table_summary_and_failures(sweep):
    written = write_report([sweep], sweep)
    table = pd.read_csv(written["results"])
    assert len(table) == len(ACCURACY) + 2
    assert list(table.columns[:9]) == [
        "run",
        "model",
        "parameters",
        "task",
        "metric",
        "method",
        "prompt_length",
        "init",
        "seed",
    ]
    assert dict(zip(table["run"], table["status"]))["failed"] == "failed"
    assert dict(zip(table["run"], table["status"]))["killed"] == "incomplete"
    # a run that never loaded its model still gets the model's size from the runs that did
    assert table.set_index("run").loc["failed", "parameters"] == 109_486_464

    summary = pd.read_csv(written["summary"]).set_index(["model", "prompt_length"])
    row = summary.loc[("mpnet-base", 20)]
    assert row["mean"] == pytest.approx(0.92) and row["std"] == pytest.approx(statistics.stdev([0.90, 0.94]))
    assert row["seeds"] == 2 and row["not_completed"] == 1
    assert summary.loc[("minilm-l6", 1), "mean"] == pytest.approx(0.72)

    report = written["markdown"].read_text()
    assert "| mpnet-base" in report and "0.9200 ± 0.0283" in report
    assert "`failed`: **failed**: out of memory" in report and "`killed`: **incomplete**" in report


def test_figures_draw_the_means_against_model_size(sweep):
    written = write_report([sweep], sweep)
    assert (sweep / "by_prompt_length.png").stat().st_size > 10_000
    svg = (sweep / "by_prompt_length.svg").read_text()
    # one line per prompt length over the two model sizes, each point labelled with its mean
    for text in (
        "prompt length 1",
        "prompt length 20",
        "0.720",
        "0.820",
        "0.830",
        "0.920",
        "109.5M",
        "22.7M",
        "model parameters",
    ):
        assert text in svg, text
    assert not (sweep / "by_init.png").exists(), "a figure per initialisation only when the sweep varies it"
    assert "![by_prompt_length](by_prompt_length.png)" in written["markdown"].read_text()


def test_a_figure_redrawn_from_the_same_rows_is_the_same_file(sweep, tmp_path):
    first, again = (write_report([sweep], tmp_path / name) for name in ("first", "again"))
    figures = [name for name in first if name.endswith((".png", ".svg"))]
    assert {"by_prompt_length.png", "by_prompt_length.svg"} <= set(figures)
    assert all(first[name].read_bytes() == again[name].read_bytes() for name in figures)


def test_runs_differing_in_another_key_are_never_averaged(tmp_path):
    for steps, value in ((50, 0.6), (200, 0.9)):
        overrides = ["model=minilm-l6", "prompt.length=5", f"trainer.max_steps={steps}"]
        make_run(tmp_path, f"steps{steps}", overrides, completed("minilm-l6", 22_713_216, 5, 0, value))
    written = write_report([tmp_path], tmp_path)
    summary = pd.read_csv(written["summary"])
    assert sorted(summary["mean"]) == [0.6, 0.9] and set(summary["seeds"]) == {1}
    assert "trainer.max_steps" in pd.read_csv(written["results"]).columns


def test_legends_sit_beside_the_data_and_equal_values_stay_visible(tmp_path, monkeypatch):
    """Two tasks, two prompt lengths with equal accuracies on each model: every point is drawn at its own
    place with its value label covering no other, and no legend covers a panel."""
    for task in ("rte", "cb"):
        for (model, params, length, seed), _ in ACCURACY.items():
            record = {**completed(model, params, length, seed, 0.75), "task": task}
            overrides = [f"task={task}", f"model={model}", f"prompt.length={length}", f"seed={seed}"]
            make_run(tmp_path, f"{task}_{model}_{length}_{seed}", overrides, record)
    figures = []
    # each figure as saved, laid out: the report closes it right after
    monkeypatch.setattr(importlib.import_module("matplotlib.pyplot"), "close", figures.append)
    write_report([tmp_path], tmp_path)
    assert figures
    for figure in figures:
        figure.canvas.draw()
        renderer = figure.canvas.get_renderer()
        panels = [panel for panel in figure.axes if panel.has_data()]
        assert len(panels) == 2
        for panel in panels:
            legend = panel.get_legend().get_window_extent(renderer)
            for other in panels:
                assert not legend.overlaps(other.get_window_extent(renderer))
            points = [(x, y) for container in panel.containers for x, y in zip(*container.lines[0].get_data())]
            assert len(points) == 4 and len(set(points)) == len(points), points
            labels = [text.get_window_extent(renderer) for text in panel.texts]
            assert [text.get_text() for text in panel.texts] == ["0.750"] * 4
            assert not any(box.overlaps(other) for number, box in enumerate(labels) for other in labels[number + 1 :])


@pytest.mark.slow
def test_reference_points_are_overlaid_with_their_label(sweep, tmp_path):
    reference = tmp_path / "reference.csv"
    reference.write_text("task,parameters,value,label\n*,30000000,0.75,approximate readings of a paper figure\n")
    out = tmp_path / "report"
    result = run_cli("softprompt.report", str(sweep), "--out", str(out), "--reference", str(reference))
    assert result.returncode == 0, result.stderr
    assert "approximate readings of a paper figure" in (out / "by_prompt_length.svg").read_text()
    assert (out / "results.csv").is_file() and f"markdown: {out / 'report.md'}" in result.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["/no/such/dir"], "/no/such/dir is not a directory"),
        (["{tmp}", "{tmp}"], "--out is required when more than one directory is given"),
        (["{tmp}"], "no run directories"),
    ],
)
def test_mistakes_give_one_line_and_exit_2(tmp_path, args, message):
    result = run_cli("softprompt.report", *[arg.format(tmp=tmp_path) for arg in args])
    assert result.returncode == 2 and result.stderr.strip().startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_initialisations_are_drawn_from_least_to_most_informed(tmp_path, monkeypatch):
    """Lester et al.'s Fig. 3(b) order, on the x axis for one model and in the legend across model sizes."""
    for init, value in (("class_labels", 0.8), ("random_uniform", 0.7), ("sampled_vocab", 0.75)):
        for model, params in (("minilm-l6", 22_713_216), ("mpnet-base", 109_486_464)):
            record = completed(model, params, 20, 0, value)
            make_run(tmp_path / "sizes", f"{model}_{init}", [f"model={model}", f"prompt.init={init}"], record)
            if model == "minilm-l6":
                make_run(tmp_path / "one", init, [f"model={model}", f"prompt.init={init}"], record)
    figures = []
    monkeypatch.setattr(importlib.import_module("matplotlib.pyplot"), "close", figures.append)
    order = ["random_uniform", "sampled_vocab", "class_labels"]
    write_report([tmp_path / "one"], tmp_path / "one")
    (panel,) = [panel for panel in figures[-1].axes if panel.has_data()]
    assert [label.get_text() for label in panel.get_xticklabels()] == order
    assert list(panel.containers[0].lines[0].get_ydata()) == [0.7, 0.75, 0.8]
    write_report([tmp_path / "sizes"], tmp_path / "sizes")
    (panel,) = [panel for panel in figures[-1].axes if panel.has_data()]
    assert [text.get_text() for text in panel.get_legend().get_texts()] == [f"initialisation {init}" for init in order]


def test_dev_curves_from_metrics_and_from_older_runs_logs(tmp_path):
    """curves.csv and dev_curves: each evaluation of every run, from metrics.json's eval_curve or, for a run made
    before it existed or resumed from a checkpoint older than it, from its train.log (a resumed run's repeated step
    counted once)."""
    for seed, late in ((0, 0.80), (1, 0.84)):
        record = completed("minilm-l6", 22_713_216, 20, seed, late)
        record["eval_curve"] = [
            {"step": 0, "accuracy": 0.5},
            {"step": 150, "accuracy": 0.7},
            {"step": 300, "accuracy": late},
        ]
        make_run(tmp_path, f"new_{seed}", ["model=minilm-l6", "prompt.length=20", f"seed={seed}"], record)
    older = make_run(
        tmp_path, "older", ["model=minilm-l6", "prompt.length=1"], completed("minilm-l6", 22_713_216, 1, 0, 0.66)
    )
    bridged_record = completed("minilm-l6", 22_713_216, 1, 1, 0.66)
    bridged_record["eval_curve"] = [{"step": 300, "accuracy": 0.65}]  # the evaluations after the resume only
    bridged = make_run(tmp_path, "bridged", ["model=minilm-l6", "prompt.length=1", "seed=1"], bridged_record)
    for run in (older, bridged):
        (run / "train.log").write_text(
            "[2026-12-05 23:39:44,883][softprompt][INFO] - step 0: accuracy=0.4989\n"
            "[2026-12-05 23:39:45,000][softprompt][INFO] - step 0, whole split: accuracy=0.4900\n"
            "[2026-12-05 23:41:00,077][softprompt][INFO] - step 150: accuracy=0.6600\n"
            "[2026-12-05 23:41:30,000][softprompt][INFO] - resumed from checkpoint at step 100\n"
            "[2026-12-05 23:42:00,077][softprompt][INFO] - step 150: accuracy=0.6600\n"
            "[2026-12-05 23:43:32,632][softprompt][INFO] - step 300: accuracy=0.6500\n"
        )
    written = write_report([tmp_path], tmp_path)
    curves = pd.read_csv(written["curves"])
    by_run = {run: list(zip(rows["step"], rows["value"])) for run, rows in curves.groupby("run")}
    assert by_run == {
        "new_0": [(0, 0.5), (150, 0.7), (300, 0.8)],
        "new_1": [(0, 0.5), (150, 0.7), (300, 0.84)],
        "older": [(0, 0.4989), (150, 0.66), (300, 0.65)],
        "bridged": [(0, 0.4989), (150, 0.66), (300, 0.65)],
    }
    assert set(curves["prompt_length"]) == {1, 20} and set(curves["metric"]) == {"accuracy"}
    svg = (tmp_path / "dev_curves.svg").read_text()
    for text in ("prompt tuning (length 20), 2 seeds", "prompt tuning (length 1), 2 seeds", "training step", "22.7M"):
        assert text in svg, text
    assert "![dev_curves](dev_curves.png)" in written["markdown"].read_text()


def test_no_curve_figure_without_two_evaluations(sweep):
    written = write_report([sweep], sweep)
    assert len(pd.read_csv(written["curves"])) == 0 and not (sweep / "dev_curves.png").exists()


def test_a_key_older_runs_lack_is_a_setting_of_its_own(tmp_path):
    """Runs made before a config key existed are a setting of their own beside the runs that set it: a line
    each in the figures and the dev curves, never averaged together."""
    runs = {}
    for name, extra, late in (("newer", ["trainer.head_lr=0.001"], 0.9), ("older", [], 0.8)):
        record = completed("minilm-l6", 22_713_216, 5, 0, late)
        record["eval_curve"] = [{"step": 0, "accuracy": 0.5}, {"step": 150, "accuracy": late}]
        runs[name] = make_run(tmp_path, name, ["model=minilm-l6", "prompt.length=5", *extra], record)
    config_path = runs["older"] / ".hydra" / "config.yaml"
    config = OmegaConf.load(config_path)
    del config.trainer["head_lr"]
    OmegaConf.save(config, config_path)
    written = write_report([tmp_path], tmp_path)
    assert sorted(pd.read_csv(written["summary"])["mean"]) == [0.8, 0.9]
    for figure in ("by_prompt_length.svg", "dev_curves.svg"):
        text = (tmp_path / figure).read_text()
        assert "trainer.head_lr 0.001" in text and "trainer.head_lr unset" in text, figure


def test_dev_curves_of_several_methods_are_named_by_method(tmp_path):
    """A method without a prompt length (model tuning) beside prompt tuning: a curve each, named by its method
    alone; the length prompt tuning has and model tuning lacks does not split or name them."""
    for method, late in (("prompt_tuning", 0.8), ("model_tuning", 0.86)):
        record = completed("minilm-l6", 22_713_216, 20, 0, late)
        record["eval_curve"] = [{"step": 0, "accuracy": 0.5}, {"step": 150, "accuracy": late}]
        make_run(tmp_path, method, ["model=minilm-l6", f"method={method}"], record)
    write_report([tmp_path], tmp_path)
    svg = (tmp_path / "dev_curves.svg").read_text()
    assert "prompt tuning, 1 seed" in svg and "model tuning, 1 seed" in svg
    assert "length 20" not in svg and "unset" not in svg


def test_close_model_sizes_have_their_tick_labels_apart(tmp_path, monkeypatch):
    """mpnet-base (109.5M) and smollm2-135m (134.5M) sit close on a log axis: the second label goes lower."""
    for model, params in (("minilm-l6", 22_713_216), ("mpnet-base", 109_486_464), ("smollm2-135m", 134_515_008)):
        make_run(tmp_path, model, [f"model={model}"], completed(model, params, 20, 0, 0.8))
    figures = []
    monkeypatch.setattr(importlib.import_module("matplotlib.pyplot"), "close", figures.append)
    write_report([tmp_path], tmp_path)
    (panel,) = [panel for panel in figures[-1].axes if panel.has_data()]
    assert [label.get_text() for label in panel.get_xticklabels()] == [
        "22.7M\nminilm-l6",
        "109.5M\nmpnet-base",
        "\n\n134.5M\nsmollm2-135m",
    ]


def test_an_earlier_report_stands_in_for_run_directories_that_are_gone(sweep, tmp_path):
    """A report's results.csv (with its configs.jsonl and curves.csv) gives back the rows of runs whose
    directories were deleted; a run still on disk takes its row's place, and a new run that differs from an
    earlier one in a key the earlier report never showed is a setting of its own."""
    for run in ("mpnet-base_20_0", "minilm-l6_1_0"):
        record = records.read_json(sweep / run / records.METRICS)
        records.write_json(
            sweep / run / records.METRICS,
            {**record, "eval_curve": [{"step": 0, "accuracy": 0.5}, {"step": 100, "accuracy": 0.6}]},
        )
    first = write_report([sweep], tmp_path / "first")
    for run in ("mpnet-base_20_0", "mpnet-base_1_1", "failed"):
        shutil.rmtree(sweep / run)
    resumed = completed("minilm-l6", 22_713_216, 1, 0, 0.99)
    records.write_json(sweep / "minilm-l6_1_0" / records.METRICS, resumed)
    newer = make_run(
        tmp_path / "newer",
        "head",
        ["model=mpnet-base", "prompt.length=20", "seed=0", "trainer.head_lr=0.001"],
        completed("mpnet-base", 109_486_464, 20, 0, 0.5),
    )

    again = write_report([sweep, first["results"], newer.parent], tmp_path / "again")
    before, after = (pd.read_csv(written["results"]).set_index("run") for written in (first, again))
    assert set(after.index) == set(before.index) | {str(newer)}
    assert after.loc[str(sweep / "minilm-l6_1_0"), "value"] == 0.99, "the run on disk wins over its earlier row"
    gone = [str(sweep / run) for run in ("mpnet-base_20_0", "mpnet-base_1_1", "failed")]
    pd.testing.assert_frame_equal(after.loc[gone, before.columns], before.loc[gone])
    assert after.loc[gone, "trainer.head_lr"].isna().all() and after.loc[str(newer), "trainer.head_lr"] == 0.001
    summary = pd.read_csv(again["summary"])
    mpnet = summary[(summary["model"] == "mpnet-base") & (summary["prompt_length"] == 20)]
    assert sorted(mpnet["mean"]) == [0.5, pytest.approx(0.92)] and sorted(mpnet["not_completed"]) == [0, 1]
    curves = pd.read_csv(again["curves"])
    assert list(curves[curves["run"] == gone[0]]["value"]) == [0.5, 0.6]
    assert curves[curves["run"] == str(sweep / "minilm-l6_1_0")].empty, "the resumed run's curve is its own"


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda folder: (folder / "notes.txt").write_text("x"), "is not a directory or a report's results.csv"),
        (lambda folder: (folder / "configs.jsonl").unlink(), "no configs.jsonl beside it"),
        (
            lambda folder: (folder / "configs.jsonl").write_text('{"run": "elsewhere", "config": {}}\n'),
            "has no line in configs.jsonl",
        ),
    ],
)
def test_an_earlier_report_that_cannot_be_read_is_one_line(sweep, tmp_path, make, message):
    write_report([sweep], tmp_path / "first")
    make(tmp_path / "first")
    given = tmp_path / "first" / ("notes.txt" if "directory" in message else "results.csv")
    kept = {path.name: path.read_bytes() for path in (tmp_path / "first").iterdir()}
    result = run_cli("softprompt.report", str(given), "--out", str(tmp_path / "second"))
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert {path.name: path.read_bytes() for path in (tmp_path / "first").iterdir()} == kept
    assert not (tmp_path / "second").exists()
