"""task.source=hub: each built-in task's hub dataset gives the same examples as its local files, and offline the
hub source fails in one line that names the local alternative.

The hub cannot be reached here, so `datasets.load_dataset` answers with the local rows rewritten in the hub
dataset's own schema (its column names, nested columns, ClassLabel integers): what the task's hub_* keys undo."""

from __future__ import annotations

import datasets
import pytest

from helpers import data_dir, run_cli
from softprompt.cli import compose_config
from softprompt.config import validate
from softprompt.errors import ConfigError, UserError
from softprompt.identity import config_key
from softprompt.task import load_task

# task -> (hub dataset args, our split -> hub split, local row -> hub row, the hub's ClassLabel names or None)
HUB_SCHEMAS = {
    "sst2": (
        ("nyu-mll/glue", "sst2"),
        {"train": "train", "validation": "validation"},
        lambda row, i: {"sentence": row["sentence"], "label": row["label"], "idx": i},
        ["negative", "positive"],
    ),
    "cb": (
        ("aps/super_glue", "cb"),
        {"train": "train", "validation": "validation"},
        lambda row, i: {
            "premise": row["premise"],
            "hypothesis": row["hypothesis"],
            "idx": i,
            "label": ["entailment", "contradiction", "neutral"].index(row["label"]),
        },
        ["entailment", "contradiction", "neutral"],
    ),
    "multirc": (
        ("aps/super_glue", "multirc"),
        {"train": "train", "validation": "validation"},
        lambda row, i: {
            "paragraph": row["passage"],
            "question": row["question"],
            "answer": row["answer"],
            "idx": {"paragraph": row["passage_idx"], "question": row["question_idx"], "answer": row["idx"]},
            "label": row["label"],
        },
        ["False", "True"],
    ),
    "squad": (
        ("rajpurkar/squad",),
        {"train": "train", "validation": "validation"},
        lambda row, i: {
            "id": row["id"],
            "title": row["title"],
            "context": row["context"],
            "question": row["question"],
            "answers": {"text": row["answers"], "answer_start": [0] * len(row["answers"])},
        },
        None,
    ),
    "e2e": (
        ("tuetschek/e2e_nlg",),
        {"train": "train", "validation": "validation"},
        lambda row, i: {"meaning_representation": row["mr"], "human_reference": row["ref"]},
        None,
    ),
}
DATA_FOLDERS = {"sst2": ("sst2",), "cb": ("superglue", "CB"), "multirc": ("superglue", "MultiRC"), "squad": ("squad",)}


def _hub_dataset(rows: list[dict], to_hub, names: list[str] | None) -> datasets.Dataset:
    data = datasets.Dataset.from_list([to_hub(row, index) for index, row in enumerate(rows)])
    if names is not None:
        data = data.cast_column("label", datasets.ClassLabel(names=names))
    return data


@pytest.mark.parametrize("name", sorted(HUB_SCHEMAS))
def test_hub_source_gives_the_local_examples(monkeypatch, name):
    data_dir(*DATA_FOLDERS.get(name, (name,)))
    args, splits, to_hub, names = HUB_SCHEMAS[name]
    limits = ["task.max_train_rows=60", "task.max_eval_rows=40"]
    local = load_task(validate(compose_config([f"task={name}", *limits])).task)
    hub = {splits[split]: _hub_dataset(local.rows[split], to_hub, names) for split in ("train", "validation")}
    calls = []

    def load_dataset(*given, split):
        calls.append((given, split))
        return hub[split]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cfg = validate(compose_config([f"task={name}", "task.source=hub", *limits]))
    from_hub = load_task(cfg.task)
    assert calls == [(args, splits["train"]), (args, splits["validation"])]
    for split in ("train", "validation"):
        assert [vars(example) for example in from_hub.examples[split]] == [
            vars(example) for example in local.examples[split]
        ]
    assert from_hub.provenance["validation"] == f"hub:{'/'.join(args)}:{splits['validation']}"


def test_hub_rows_without_a_label_are_unlabelled(monkeypatch):
    """The hub's test splits mark unlabelled rows with -1: they must not become the last class."""
    _, _, to_hub, names = HUB_SCHEMAS["sst2"]
    test_rows = _hub_dataset([{"sentence": "a fine film ", "label": 0}], to_hub, names)
    test_rows = test_rows.cast_column("label", datasets.Value("int64")).map(lambda row: {"label": -1})
    test_rows = test_rows.cast_column("label", datasets.ClassLabel(names=names))
    monkeypatch.setattr(datasets, "load_dataset", lambda *given, split: test_rows)
    cfg = validate(compose_config(["task=sst2", "task.source=hub"]))
    with pytest.raises(UserError, match="label"):
        load_task(cfg.task, ("test",))


def test_every_builtin_file_task_names_a_hub_source():
    for name in ("boolq", "cb", "copa", "multirc", "rte", "wic", "wsc", "sst2", "mrpc", "e2e", "squad", "gsm8k"):
        task = validate(compose_config([f"task={name}", "task.source=hub"])).task
        assert task.hub_dataset and {"train", "validation"} <= set(task.hub_splits), name


def test_a_task_without_a_hub_source_says_so():
    with pytest.raises(ConfigError, match=r"task.hub_dataset=None .*task reviews has none"):
        validate(compose_config(["task.source=hub"]))
    with pytest.raises(ConfigError, match="task.source='web' is not allowed: one of: files, hub"):
        validate(compose_config(["task.source=web"]))


def test_the_hub_source_leaves_file_runs_their_config_key():
    """Runs that read files keep the key they had before tasks named a hub source."""
    with_hub = validate(compose_config(["task=sst2"]))
    without = validate(compose_config(["task=sst2", "task.hub_dataset=null", "task.hub_splits=null"]))
    assert config_key(with_hub) == config_key(without)
    assert config_key(validate(compose_config(["task=sst2", "task.source=hub"]))) != config_key(with_hub)


@pytest.mark.slow
def test_offline_hub_source_is_one_line_naming_the_local_files(tmp_path):
    run = tmp_path / "run"
    result = run_cli(
        "softprompt.train",
        "model=tiny-bert",
        "task=sst2",
        "task.source=hub",
        f"hydra.run.dir={run}",
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert "task.source=hub could not load nyu-mll/glue/sst2" in lines[-1]
    assert "task.source=files with task.data_dir=FOLDER" in lines[-1]
    assert not run.exists()
