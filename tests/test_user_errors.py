"""Every bad input gets one line: `error: ...` on stderr naming what is wrong and the way out, exit status 2, no
traceback, and every file that was there before is byte-identical after. Hydra's own flags work with the user's
own config folder."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from helpers import completed_run, quick_overrides, run_cli
from softprompt import predict, sweep
from softprompt.cli import precheck
from softprompt.config import unknown_key_message
from softprompt.errors import UserError
from softprompt.report import main as report_main

# a few steps of a tiny model on a task chosen by each test
TINY = [item for item in quick_overrides("tiny-bert", steps=2) if not item.startswith(("task.builtin_size", "model="))]
BUILTIN = quick_overrides(
    "tiny-bert", steps=2, **{"task.builtin_size.train": "16", "task.builtin_size.validation": "8"}
)


def tree(root: Path) -> dict[str, str]:
    """Every file under root (hidden ones included) and the hash of its bytes."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def assert_refused(result, root: Path, before: dict[str, str], *fragments: str) -> str:
    """Exit status 2, one `error:` line holding every fragment, no traceback, and nothing that was there changed."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    after = tree(root)
    assert {name: after.get(name) for name in before} == before
    return lines[0]


def refused_in_process(main, argv: list[str], capsys) -> str:
    """A command's main() run here: exit status 2 and one line, returned."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def user_config_dir(root: Path) -> Path:
    """The user's own folder: a model (a copy of tiny-bert named my-bert) and a CSV task, as Hydra config groups."""
    folder = root / "myconf"
    (folder / "model").mkdir(parents=True)
    (folder / "task").mkdir()
    model = (Path(__file__).resolve().parents[1] / "conf" / "model" / "tiny-bert.yaml").read_text()
    (folder / "model" / "my-bert.yaml").write_text(model.replace("name: tiny-bert", "name: my-bert"))
    rows = [("a wonderful film", 1), ("a dull film", 0), ("great acting", 1), ("awful acting", 0)]
    for split, repeat in (("train", 6), ("dev", 2)):
        (folder / f"{split}.csv").write_text("sentence,label\n" + "".join(f"{t},{y}\n" for t, y in rows * repeat))
    (folder / "task" / "mytask.yaml").write_text(
        "name: mytask\n"
        f"data_files: {{train: {folder / 'train.csv'}, validation: {folder / 'dev.csv'}}}\n"
        "text_fields: [sentence]\nlabel_field: label\n"
        'template: "Review: {sentence} It was"\n'
        "labels: [0, 1]\nverbalizer: [bad, good]\nmetrics: [accuracy]\nmain_metric: accuracy\nmax_length: 32\n"
    )
    return folder


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A completed tiny run, copied by each test that damages it."""
    return completed_run(tmp_path_factory.mktemp("finished") / "run", BUILTIN, timeout=300)


def copy_run(finished: Path, tmp_path: Path, name: str = "run") -> Path:
    target = tmp_path / name
    shutil.copytree(finished, target)
    return target


# --- damaged or unusual records -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_with_a_truncated_metrics_json_names_the_file(finished, tmp_path):
    run_path = copy_run(finished, tmp_path)
    metrics = run_path / "metrics.json"
    metrics.write_bytes(metrics.read_bytes()[:25])
    before = tree(tmp_path)
    result = run_cli("softprompt.train", *BUILTIN, f"hydra.run.dir={run_path}", timeout=300)
    assert_refused(result, tmp_path, before, f"{metrics} is damaged", "move it out of the run directory")


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_resume_with_a_broken_checkpoint_suggests_resume_never(finished, tmp_path, damage):
    run_path = copy_run(finished, tmp_path)
    # a checkpoint written mid-run: the run has not completed yet
    state_path = run_path / "checkpoint" / "state.json"
    state = json.loads(state_path.read_text())
    state["progress"]["result"] = None
    state_path.write_text(json.dumps(state))
    tensors = run_path / "checkpoint" / "tensors.safetensors"
    if damage == "missing":
        tensors.unlink()
    else:
        tensors.write_bytes(tensors.read_bytes()[:-100])
    before = tree(tmp_path)
    result = run_cli("softprompt.train", *BUILTIN, f"hydra.run.dir={run_path}", timeout=300)
    line = assert_refused(result, tmp_path, before, str(tensors), "trainer.resume=never")
    assert ("is missing" if damage == "missing" else "is damaged") in line
    # found before the model loaded: no evaluation ran
    assert "step 0" not in result.stderr


def test_sweep_job_with_a_damaged_record_is_named(finished, tmp_path):
    run_path = copy_run(finished, tmp_path)
    (run_path / "metrics.json").write_text('{"status": "compl')
    with pytest.raises(UserError, match=r"metrics.json is damaged \(JSONDecodeError.*move it out of the job's folder"):
        sweep.completed_record(run_path, "anykey")


@pytest.mark.slow
def test_a_sweep_with_a_damaged_job_runs_the_others_and_exits_1(tmp_path):
    """A rerun of a sweep one of whose jobs has a truncated metrics.json: that job gets one line and is counted as
    failed, its folder stays byte-identical, the other job is found completed, and the report is written."""
    args = ["softprompt.train", "-m", *BUILTIN, "prompt.length=2,3", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    first = run_cli(*args, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    damaged = next((tmp_path / "sweep").glob("*len2*")) / "metrics.json"
    damaged.write_bytes(damaged.read_bytes()[:25])
    before = tree(damaged.parent)
    again = run_cli(*args, timeout=600)
    assert again.returncode == 1, again.stderr[-3000:]
    assert "Traceback" not in again.stderr
    assert f"error: {damaged} is damaged" in again.stderr
    assert f"1 of 1 jobs failed: {damaged.parent.name}: {damaged} is damaged" in again.stderr
    assert again.stdout.count("skipped, completed earlier") == 1
    assert tree(damaged.parent) == before
    assert "damaged" in (tmp_path / "sweep" / "report.md").read_text()


def test_report_lists_a_damaged_run_and_reports_the_others(finished, tmp_path, capsys):
    runs = tmp_path / "runs"
    good, cut, listed = (copy_run(finished, runs, name) for name in ("good", "cut", "listed"))
    (cut / "metrics.json").write_bytes((cut / "metrics.json").read_bytes()[:40])
    (listed / "metrics.json").write_text("[1, 2]\n")
    (runs / "ensemble.json").write_text('{"task": ')
    before = tree(runs)
    report_main([str(runs), "--out", str(tmp_path / "report")])
    table = (tmp_path / "report" / "results.csv").read_text()
    assert tree(runs) == before
    rows = {Path(line.split(",")[0]).name: line for line in table.splitlines()[1:]}
    assert ",completed," in rows[good.name]
    assert ",damaged," in rows[cut.name] and "metrics.json is damaged (JSONDecodeError" in rows[cut.name]
    assert "metrics.json is damaged (a JSON list, not an object)" in rows[listed.name]
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "**damaged**" in markdown and "ensemble.json is damaged (JSONDecodeError" in markdown


@pytest.mark.parametrize("damaged", [".hydra/config.yaml", "prompt/adapter_model.safetensors"])
def test_predict_with_a_damaged_run_names_the_file(finished, tmp_path, capsys, damaged):
    run_path = copy_run(finished, tmp_path)
    path = run_path / damaged
    path.write_bytes(path.read_bytes()[:30] if damaged.endswith("safetensors") else b"model: {name: [tiny\n")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a fine film"}\n')
    before = tree(tmp_path)
    line = refused_in_process(predict.main, ["--prompts", f"a={run_path}", "--input", str(rows)], capsys)
    assert str(path) in line and ("train the run again" in line or "train this one again" in line)
    assert tree(tmp_path) == before


@pytest.mark.slow
def test_latin1_csv_names_the_file_and_task_encoding(tmp_path):
    data = tmp_path / "train.csv"
    data.write_bytes("sentence,label\ncaf\xe9 cr\xe8me,1\nna\xefve plot,0\n".encode("latin-1"))
    before = tree(tmp_path)
    args = ["task=custom", f"task.data_files.train={data}", f"task.data_files.validation={data}"]
    args += ["task.text_fields=[sentence]", "task.template='{sentence}'", "task.labels=[0,1]", "model=tiny-bert", *TINY]
    result = run_cli("softprompt.train", *args, f"hydra.run.dir={tmp_path / 'run'}", timeout=300)
    assert_refused(result, tmp_path, before, str(data), "not valid utf-8 text", "set task.encoding")
    assert not (tmp_path / "run").exists()


# --- a closed schema, ranges checked before anything loads ---------------------------------------------------------


@pytest.mark.parametrize(
    "override,message",
    [
        ("+trainer.lrr=0.1", "trainer.lrr is not a config key: trainer has: optimizer, lr,"),
        ("+foo=1", "foo is not a config key: the root has: model, task,"),
        ("trainer.lrr=0.1", "trainer.lrr is not a config key: trainer has: optimizer, lr,"),
        ("model=nope", "model='nope' is not allowed: one of:"),
        ("seed=-1", "seed=-1 is not allowed: a whole number from 0 to 4294967295"),
        ("seed=99999999999", "seed=99999999999 is not allowed: a whole number from 0 to 4294967295"),
        ("task.dev_seed=-3", "task.dev_seed=-3 is not allowed"),
        ("trainer.lr=nan", "trainer.lr=nan is not allowed"),
        ("task.max_train_rows=0", "task.max_train_rows=0 is not allowed: a number of rows >= 1 (0 leaves the split"),
        ("task.encoding=klingon", "task.encoding='klingon' is not allowed: a text encoding"),
    ],
)
def test_unknown_keys_and_out_of_range_values_are_refused_before_hydra_writes(tmp_path, override, message):
    from softprompt import train

    (tmp_path / "mine.txt").write_text("the user's own file")
    before = tree(tmp_path)
    argv = [*BUILTIN, override, f"hydra.run.dir={tmp_path / 'run'}"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.argv", ["softprompt-train", *argv])
        with pytest.raises(SystemExit) as stopped:
            train.main()
    assert stopped.value.code == 2
    assert tree(tmp_path) == before and not (tmp_path / "run").exists()
    with pytest.raises(UserError, match=re.escape(message)):
        precheck_and_validate(argv)


def test_resume_must_without_a_run_directory_creates_none(tmp_path, capsys):
    from softprompt import train

    run_path = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.argv", ["softprompt-train", *BUILTIN, "trainer.resume=must", f"hydra.run.dir={run_path}"])
        line = refused_in_process(lambda argv: train.main(), [], capsys)
    assert f"trainer.resume=must but {run_path} holds no checkpoint" in line and not run_path.exists()


def precheck_and_validate(argv: list[str]) -> None:
    from softprompt.cli import without_hydra
    from softprompt.config import validate

    _, cfg = precheck(argv)
    validate(without_hydra(cfg))


def test_a_key_under_an_open_mapping_may_be_added():
    _, cfg = precheck(["model=tiny-bert", "+model.from_config.hidden_dropout_prob=0", "+task.builtin_size.test=3"])
    assert cfg.model.from_config.hidden_dropout_prob == 0 and cfg.task.builtin_size.test == 3


def test_a_key_under_a_value_or_a_group_is_named():
    assert unknown_key_message("task.labels.x") == "task.labels.x is not a config key: task.labels is a value"
    assert unknown_key_message("trainer.lr") is None and unknown_key_message("task.data_files.extra") is None
    assert unknown_key_message("prompt.lenght").startswith("prompt.lenght is not a config key: prompt has: length,")


# --- wrong diagnoses -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_wrong_diagnoses_are_right(tmp_path):
    one_row = tmp_path / "one.csv"
    one_row.write_text("sentence,label\nfine,1\n")
    empty_labels = tmp_path / "labels.csv"
    empty_labels.write_text("sentence,label\nfine,1\nbad,0\n")
    before = tree(tmp_path)
    custom = ["task=custom", "task.text_fields=[sentence]", "task.template='{sentence}'", "model=tiny-bert", *TINY]
    cases = [
        (
            [f"task.data_files.train={one_row}", "task.dev_from_train=0.5", "task.labels=[0,1]"],
            ["the train split is empty", "task.dev_from_train=0.5 carved every train row into the dev split"],
        ),
        (
            [f"task.data_files.train={empty_labels}", f"task.data_files.validation={empty_labels}"],
            [
                "task.labels=[] is not allowed: the label values of column 'label' in class order (the train split has: 0, 1)"
            ],
        ),
    ]
    for extra, fragments in cases:
        result = run_cli("softprompt.train", *custom, *extra, f"hydra.run.dir={tmp_path / 'run'}", timeout=300)
        line = assert_refused(result, tmp_path, before, *fragments)
        assert not line.endswith(":") and "has no labels" not in line
    result = run_cli("softprompt.train", *BUILTIN, "task.max_length=100000000000", timeout=300, cwd=tmp_path)
    assert_refused(
        result, tmp_path, before, "task.max_length=100000000000 is not allowed: at most 252", "256 positions"
    )


@pytest.mark.slow
def test_an_unquoted_template_names_its_key(tmp_path):
    before = tree(tmp_path)
    result = run_cli("softprompt.train", *BUILTIN, "task.template={sentence}", timeout=300, cwd=tmp_path)
    assert_refused(result, tmp_path, before, "task.template={sentence}", "Hydra's quotes")


# --- outputs under a file --------------------------------------------------------------------------------------------


def test_outputs_under_a_file_are_one_line(finished, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a fine film"}\n')
    run_path = copy_run(finished, tmp_path)
    before = tree(tmp_path)
    line = refused_in_process(
        predict.main,
        ["--prompts", f"a={run_path}", "--input", str(rows), "--output", str(afile / "pred.jsonl")],
        capsys,
    )
    assert f"{afile} is a file" in line and "--output" in line
    line = refused_in_process(report_main, [str(run_path), "--out", str(afile / "rep")], capsys)
    assert f"{afile} is a file" in line and "--out" in line
    assert tree(tmp_path) == before


# --- Hydra's own flags -----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("how", ["--config-dir", "hydra.searchpath"])
def test_a_model_and_task_of_the_users_own_folder_train(tmp_path, how):
    folder = user_config_dir(tmp_path)
    flags = ["--config-dir", str(folder)] if how == "--config-dir" else [f"hydra.searchpath=[file://{folder}]"]
    run_path = tmp_path / "run"
    result = run_cli(
        "softprompt.train", *flags, "model=my-bert", "task=mytask", *TINY, f"hydra.run.dir={run_path}", timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run_path / "metrics.json").read_text())
    assert record["status"] == "completed" and record["model"] == "my-bert" and record["task"] == "mytask"
    assert record["eval_examples"] == 8


@pytest.mark.slow
def test_hydra_commands_go_to_hydra(tmp_path):
    folder = user_config_dir(tmp_path)
    completion = run_cli("softprompt.train", "--shell-completion", "install=bash", cwd=tmp_path)
    assert completion.returncode == 0 and "complete -o nospace" in completion.stdout, completion.stderr[-2000:]
    info = run_cli("softprompt.train", "-cd", str(folder), "--info", "searchpath", cwd=tmp_path)
    assert info.returncode == 0 and f"file://{folder}" in info.stdout, info.stderr[-2000:]
    shown = run_cli(
        "softprompt.train", "-cd", str(folder), "--cfg", "job", "model=my-bert", "task=mytask", cwd=tmp_path
    )
    assert shown.returncode == 0 and "name: my-bert" in shown.stdout, shown.stderr[-2000:]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["myconf"]


def test_config_path_and_name_choose_the_primary_config(tmp_path):
    folder = user_config_dir(tmp_path)
    train_yaml = (Path(__file__).resolve().parents[1] / "conf" / "train.yaml").read_text()
    (folder / "mytrain.yaml").write_text(train_yaml.replace("model: minilm-l6", "model: my-bert"))
    _, cfg = precheck(["-cd", str(folder), "-cn", "mytrain", "task=mytask"])
    assert cfg.model.name == "my-bert" and cfg.task.name == "mytask"
    primary = tmp_path / "primary"
    shutil.copytree(Path(__file__).resolve().parents[1] / "conf", primary)
    (primary / "model" / "my-bert.yaml").write_text((folder / "model" / "my-bert.yaml").read_text())
    _, cfg = precheck(["-cp", str(primary), "model=my-bert"])
    assert cfg.model.name == "my-bert"
    with pytest.raises(UserError, match="task='mytask' is not allowed"):
        precheck(["-cp", str(primary), "task=mytask"])


@pytest.mark.parametrize(
    "sweep_values",
    ["trainer.lr=interval(0.001,0.3)", "trainer.lr=tag(log,interval(0.001,0.3))", "prompt.length=range(1,3)"],
)
def test_every_sweepers_grammar_passes_the_precheck(sweep_values):
    found, cfg = precheck(["-m", "model=tiny-bert", sweep_values, "seed=0,1"])
    assert found.multirun and cfg.model.name == "tiny-bert"
    with pytest.raises(UserError, match="trainer.lrr is not a config key"):
        precheck(["-m", "trainer.lrr=interval(0.001,0.3)"])
