"""The Python API: `softprompt.run` leaves the run directory softprompt-train leaves (so softprompt-report and
softprompt-predict accept it), raises the command's one-line errors, runs twice in one process, and the example
script in docs/examples runs."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import softprompt
from helpers import ROOT, quick_overrides, run_cli
from softprompt import run_dir as records

ROWS = [
    {"text": "a wonderful, moving film", "label": "positive"},
    {"text": "dull and far too long", "label": "negative"},
]


@pytest.fixture(scope="module")
def python_run(tmp_path_factory):
    """One tiny run trained through softprompt.run; (its directory, the record returned)."""
    path = tmp_path_factory.mktemp("api") / "python"
    return path, softprompt.run([*quick_overrides(), f"hydra.run.dir={path}"])


def _files(run_path: Path) -> set[str]:
    return {str(path.relative_to(run_path)) for path in run_path.rglob("*")}


def test_import_is_cheap_and_exports_the_api():
    """`import softprompt` loads neither torch nor the training code; the API names load on first use."""
    code = "import sys, softprompt; print(sorted(m for m in ('torch', 'transformers', 'softprompt.train') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
    from softprompt.prompt_bank import PromptBank
    from softprompt.report import write_report

    # the submodule softprompt.report, loaded above, does not take the function's name
    assert callable(softprompt.report) and softprompt.report.__module__ == "softprompt.api"
    assert softprompt.PromptBank is PromptBank and write_report.__module__ == "softprompt.report"
    assert set(softprompt.__all__) <= set(dir(softprompt))


def test_run_returns_its_metrics_record(python_run):
    path, result = python_run
    assert result == records.read_json(path / records.METRICS)
    assert result["status"] == "completed" and result["steps"] == 4
    assert {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "train.log"} <= _files(path)
    assert "step 4: accuracy=" in (path / "train.log").read_text()


def test_run_keeps_the_callers_logging(tmp_path):
    """Hydra configures logging for the job as for the command; the caller's root logger is as it was afterwards."""
    root = logging.getLogger()
    handler = logging.NullHandler()
    root.addHandler(handler)
    before = (list(root.handlers), root.level)
    try:
        softprompt.run([*quick_overrides(steps=1), f"hydra.run.dir={tmp_path / 'run'}"])
        assert (list(root.handlers), root.level) == before
    finally:
        root.removeHandler(handler)


def test_two_runs_in_one_process_and_the_default_run_dir(python_run, tmp_path, monkeypatch):
    """A second run in the process that trained python_run goes where the command puts it with no hydra.run.dir;
    the first run's config again returns its record, training nothing."""
    monkeypatch.chdir(tmp_path)
    result = softprompt.run(quick_overrides(seed="1"))
    (run_path,) = (tmp_path / "outputs" / "runs").iterdir()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_reviews_tiny-bert", run_path.name)
    assert result == records.read_json(run_path / records.METRICS) and result["seed"] == 1
    first, record = python_run
    assert softprompt.run([*quick_overrides(), f"hydra.run.dir={first}"]) == record


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.lr=fast"], "trainer.lr: Value 'fast'"),
        (["trainer.max_stepz=3"], "trainer.max_stepz"),
        (["-m", "seed=0,1"], "-m: softprompt.run trains one run"),
        (["hydra.mode=MULTIRUN"], "hydra.mode=MULTIRUN: softprompt.run trains one run"),
        (["--config-dir", "conf"], "--config-dir: softprompt.run takes overrides"),
        ("model=tiny-bert", "a list of overrides"),
    ],
)
def test_mistakes_raise_one_line_and_write_nothing(tmp_path, monkeypatch, overrides, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(softprompt.UserError, match=re.escape(message)) as raised:
        softprompt.run(overrides)
    assert "\n" not in str(raised.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_run_directory_is_the_commands(python_run, tmp_path):
    """softprompt-train with the same overrides writes the same files, the same .hydra records (but for the run
    directory and the working directory) and the same metrics."""
    path, result = python_run
    command = tmp_path / "command"
    finished = run_cli("softprompt.train", *quick_overrides(), f"hydra.run.dir={command}")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert _files(path) == _files(command)
    for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
        ours = (path / ".hydra" / name).read_text().replace(str(path), "RUN")
        theirs = (command / ".hydra" / name).read_text().replace(str(command), "RUN")
        cwd = re.compile(r"^    cwd: .*$", re.MULTILINE)
        assert cwd.sub("", ours) == cwd.sub("", theirs), name
    timing = set(records.TIMING_KEYS)
    theirs = records.read_json(command / records.METRICS)
    assert {k: v for k, v in result.items() if k not in timing} == {k: v for k, v in theirs.items() if k not in timing}


@pytest.mark.slow
def test_report_and_predict_commands_accept_the_run(python_run, tmp_path):
    path, result = python_run
    reported = run_cli("softprompt.report", str(path), "--out", str(tmp_path / "report"))
    assert reported.returncode == 0, reported.stderr[-3000:]
    (row,) = pd.read_csv(tmp_path / "report" / "results.csv").to_dict("records")
    assert row["status"] == "completed" and row["value"] == pytest.approx(result["eval"]["accuracy"])

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    served = run_cli(
        "softprompt.predict", "--prompts", f"p={path}", "--input", str(rows), "--output", str(tmp_path / "out.jsonl")
    )
    assert served.returncode == 0, served.stderr[-3000:]
    command = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    # load_run serves the same prompt on the same backbone: the same predictions and scores
    ours = softprompt.load_run(path).predict(ROWS)
    assert [row["prediction"] for row in ours] == [row["prediction"] for row in command]
    for mine, theirs in zip(ours, command):
        assert mine["scores"] == pytest.approx(theirs["scores"], abs=1e-5)


def test_report_writes_the_commands_files(python_run, tmp_path):
    path, result = python_run
    written = softprompt.report(path, out=tmp_path / "report")
    assert {"results", "summary", "markdown"} <= set(written) and all(p.is_file() for p in written.values())
    (row,) = pd.read_csv(written["results"]).to_dict("records")
    assert row["value"] == pytest.approx(result["eval"]["accuracy"])
    with pytest.raises(softprompt.UserError, match="out= is required"):
        softprompt.report(path, tmp_path)


def test_load_run_predicts_strings_and_rows(python_run):
    path, _ = python_run
    served = softprompt.load_run(path)
    assert served.cfg.model.name == "tiny-bert" and served.prompt.shape == (4, served.peft_model.config.hidden_size)
    assert served.tokenizer is served.bank.backbone.tokenizer
    from_strings = served.predict([row["text"] for row in ROWS])
    from_rows = served.predict(ROWS)
    assert [row["prediction"] for row in from_strings] == [row["prediction"] for row in from_rows]
    assert all(
        row["prediction"] in ("negative", "positive") and set(row["scores"]) == {"negative", "positive"}
        for row in from_rows
    )
    assert served.predict([]) == []
    with pytest.raises(softprompt.UserError, match="row 1: a int"):
        served.predict([3])


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [["trainer.lr=fast"], ["trainer.max_stepz=3"], ["model=no-such-model"], ["hydra.run.dir={tmp}/file/run"]],
)
def test_mistakes_raise_the_line_the_command_prints(tmp_path, overrides):
    (tmp_path / "file").write_text("in the way")
    overrides = [item.format(tmp=tmp_path) for item in overrides]
    with pytest.raises(softprompt.UserError) as raised:
        softprompt.run(overrides)
    finished = run_cli("softprompt.train", *overrides)
    assert finished.returncode == 2
    assert finished.stderr.strip().splitlines()[-1] == f"error: {raised.value}"


@pytest.mark.slow
def test_example_script_trains_reports_and_serves(tmp_path):
    finished = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "examples" / "python_api.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "trained: accuracy" in finished.stdout and "refused: trainer.lr" in finished.stdout
    assert (tmp_path / "report" / "report.md").is_file()
    assert finished.stdout.count("predicted ") == 2
    assert records.status(tmp_path / "run") == "completed"
