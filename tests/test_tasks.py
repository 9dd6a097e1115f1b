"""The task suite: official SuperGLUE/GLUE files load with their exact counts and train; custom files
work from the command line; bad data fails in one line; the generate scorer really uses the prompt."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import data_dir, quick_overrides, run_cli
from softprompt.batching import IGNORE
from softprompt.cli import compose_config
from softprompt.config import validate
from softprompt.errors import ConfigError, DataError, UserError
from softprompt.pipeline import build_pipeline, make_loader
from softprompt.scorer import PromptedModel, match_candidates
from softprompt.soft_prompt import attach_prompt, prompt_parameter
from softprompt.task import load_task

# task -> (data folder, official counts, first validation row rendered, its candidates, its label index)
OFFICIAL = {
    "cb": (
        ("superglue", "CB"),
        {"train": 250, "validation": 56},
        "Valence the void-brain, Valence the virtuous valet. Why couldn't the figger choose his own portion of titanic "
        "anatomy to shaft? Did he think he was helping?\nQuestion: Valence was helping. True, False, or Neither?\nAnswer:",
        ["True", "False", "Neither"],
        1,
    ),
    "copa": (
        ("superglue", "COPA"),
        {"train": 400, "validation": 100},
        "The man turned on the faucet.\nOption 1: The toilet filled with water.\nOption 2: Water flowed from the spout."
        "\nQuestion: What was the effect?\nAnswer:",
        ["The toilet filled with water.", "Water flowed from the spout."],
        1,
    ),
    "rte": (
        ("superglue", "RTE"),
        {"train": 2490, "validation": 277},
        "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, according to the "
        "Christopher Reeve Foundation.\nQuestion: Christopher Reeve had an accident. True or False?\nAnswer:",
        ["True", "False"],
        1,
    ),
    "wic": (
        ("superglue", "WiC"),
        {"train": 5428, "validation": 638},
        "Sentence 1: An emerging professional class.\nSentence 2: Apologizing for losing your temper, even though you "
        'were badly provoked, showed real class.\nQuestion: Is the word "class" used in the same sense in both '
        "sentences?\nAnswer:",
        ["No", "Yes"],
        0,
    ),
    "wsc": (
        ("superglue", "WSC"),
        {"train": 554, "validation": 104},
        "Bernard , who had not told the government official that he was less than 21 when he filed for a homestead "
        "claim, did not consider that he had done anything dishonest. Still, anyone who knew that he was 19 years old "
        'could take his claim away from him .\nQuestion: In the passage above, does "him" refer to "anyone"?\nAnswer:',
        ["No", "Yes"],
        0,
    ),
    "multirc": (
        ("superglue", "MultiRC"),
        {"train": 27243, "validation": 4848},
        None,
        ["No", "Yes"],
        0,
    ),
    "sst2": (
        ("sst2",),
        {"train": 67349, "validation": 872},
        "it 's a charming and often affecting journey . \nQuestion: Is this review positive or negative?\nAnswer:",
        ["negative", "positive"],
        1,
    ),
    "mrpc": (
        ("mrpc",),
        {"train": 3668, "validation": 408},
        "Sentence 1: He said the foodservice pie business doesn 't fit the company 's long-term growth strategy .\n"
        'Sentence 2: " The foodservice pie business does not fit our long-term growth strategy .\n'
        "Question: Do both sentences mean the same thing?\nAnswer:",
        ["No", "Yes"],
        1,
    ),
}
# each task trains on a different tiny model, so every scorer and model kind meets real task data
TRAIN_WITH = {
    "cb": ("tiny-llama", "generate"),
    "copa": ("tiny-gpt2", "rank"),
    "rte": ("tiny-t5", "rank"),
    "wic": ("tiny-bert", "head"),
    "wsc": ("tiny-gpt2", "rank"),
    "multirc": ("tiny-bert", "head"),
    "sst2": ("tiny-bert", "head"),
    "mrpc": ("tiny-llama", "rank"),
    "boolq": ("tiny-t5", "rank"),
}


def task_overrides(name: str, **extra: str) -> list[str]:
    """Five steps of a tiny model on a few rows of an official task."""
    model, scorer = TRAIN_WITH[name]
    overrides = quick_overrides(model, steps=5, **{"scorer.name": scorer, "task.max_length": "96"})
    overrides = [item for item in overrides if not item.startswith("task.builtin_size")]
    return [
        f"task={name}",
        *overrides,
        "task.max_train_rows=40",
        "task.max_eval_rows=24",
        *(f"{k}={v}" for k, v in extra.items()),
    ]


def check_training(train_run, name: str, overrides: list[str]) -> dict:
    run_path, result = train_run(overrides)
    assert result["steps"] == 5 and result["eval_examples"] == 24
    record = json.loads((run_path / "metrics.json").read_text())
    assert record["status"] == "completed"
    assert set(record["eval"]) >= set(validate(compose_config([f"task={name}"])).task.metrics)
    return json.loads((run_path / "task.json").read_text())


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_task_loads_exact_counts_renders_and_trains(train_run, name):
    folder, counts, text, candidates, label = OFFICIAL[name]
    data_dir(*folder)
    cfg = validate(compose_config([f"task={name}"]))
    task = load_task(cfg.task)
    assert {split: len(rows) for split, rows in task.rows.items()} == counts
    first = task.examples["validation"][0]
    if name == "multirc":
        # the nested passage is flattened to one row per answer, grouped by the question's idx
        assert first.text.startswith("What causes a change in motion? The application of a force.")
        assert first.text.endswith(
            '\nQuestion: Would the mass of a baseball affect how much force you have to use to pick it up?\nIs "No" a correct answer?\nAnswer:'
        )
        assert [example.group for example in task.examples["validation"][:5]] == [0, 0, 0, 0, 1]
    else:
        assert first.text == text
    assert first.candidates == candidates and first.label == label

    # COPA has no verbalizer words, so the prompt cannot start from class labels
    extra = {"prompt.init": "sampled_vocab"} if name == "copa" else {}
    provenance = check_training(train_run, name, task_overrides(name, **extra))
    assert provenance["counts"] == {"train": 40, "validation": 24}
    assert provenance["splits"]["validation"].endswith(("val.jsonl", "dev.tsv"))


def test_boolq_validation_counts_missing_train_is_clear_and_val_can_be_carved(train_run):
    # the folder as the task reads it: SOFTPROMPT_DATA made absolute (links resolved)
    folder = data_dir("superglue", "BoolQ").resolve()
    cfg = validate(compose_config(["task=boolq"]))
    assert len(load_task(cfg.task, ("validation",)).rows["validation"]) == 3270
    with pytest.raises(DataError) as error:
        load_task(cfg.task)
    assert str(error.value) == (
        f"{folder}: no train file (train.*) in this folder, which holds: test.jsonl, val.jsonl "
        "(set task.data_files.train=FILE, or task.splits.train=STEM to use another file)"
    )
    first = load_task(cfg.task, ("validation",)).examples["validation"][0]
    assert first.text.startswith("Ethanol fuel -- All biomass goes through")
    assert first.text.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert first.candidates == ["No", "Yes"] and first.label == 0

    # the workaround the config documents: train and dev both carved from val, with a recorded seed
    provenance = check_training(
        train_run, "boolq", task_overrides("boolq", **{"task.splits.train": "val", "task.dev_from_train": "0.2"})
    )
    assert "(dev: 654 rows carved with seed 0)" in provenance["splits"]["validation"]


def test_official_test_split_says_it_has_no_labels():
    folder = data_dir("superglue", "RTE").resolve()
    cfg = validate(compose_config(["task=rte"]))
    with pytest.raises(DataError, match="the test split has no labels .*official test files are unlabelled"):
        load_task(cfg.task, ("test",))
    assert str(folder / "test.jsonl") in str(pytest.raises(DataError, load_task, cfg.task, ("test",)).value)


def test_data_dir_default_is_absolute_and_follows_softprompt_data(monkeypatch, tmp_path):
    monkeypatch.setenv("SOFTPROMPT_DATA", "relative/data")
    monkeypatch.chdir(tmp_path)
    cfg = validate(compose_config(["task=cb"]))
    assert cfg.task.data_dir == str(tmp_path / "relative" / "data" / "superglue" / "CB")


def write_custom(tmp_path, kind: str) -> tuple[str, str, list[str]]:
    """A small learnable sentiment set of the user's own, as CSV (integer labels) or JSONL (string labels)."""
    good, bad = ["a wonderful film", "great acting", "loved it"], ["a dull film", "awful acting", "hated it"]
    rows = [(text, 1) for text in good] + [(text, 0) for text in bad]
    paths = []
    for split, repeat in (("train", 6), ("dev", 2)):
        path = tmp_path / f"{split}.{kind}"
        if kind == "csv":
            path.write_text("sentence,label\n" + "".join(f"{text},{label}\n" for text, label in rows * repeat))
        else:
            path.write_text(
                "".join(
                    json.dumps({"sentence": text, "label": ["neg", "pos"][label]}) + "\n"
                    for text, label in rows * repeat
                )
            )
        paths.append(str(path))
    labels = ["task.labels=[0,1]", "task.verbalizer=[bad,good]"] if kind == "csv" else ["task.labels=[neg,pos]"]
    return paths[0], paths[1], labels


CUSTOM_TEMPLATE = "task.template='Review: {sentence} Sentiment:'"


@pytest.mark.slow
@pytest.mark.parametrize("kind,model", [("csv", "tiny-bert"), ("jsonl", "tiny-gpt2")])
def test_custom_task_from_the_command_line(tmp_path, kind, model):
    train, dev, labels = write_custom(tmp_path, kind)
    args = [
        "task=custom",
        f"task.data_files.train={train}",
        f"task.data_files.validation={dev}",
        "task.text_fields=[sentence]",
    ]
    args += ["task.label_field=label", CUSTOM_TEMPLATE, *labels]
    args += [item for item in quick_overrides(model, steps=5) if not item.startswith("task.builtin_size")]
    run_path = tmp_path / "run"
    result = run_cli("softprompt.train", *args, f"hydra.run.dir={run_path}", timeout=300)
    assert result.returncode == 0, result.stderr
    record = json.loads((run_path / "metrics.json").read_text())
    assert record["status"] == "completed" and record["steps"] == 5 and record["eval_examples"] == 12
    assert json.loads((run_path / "task.json").read_text())["splits"] == {"train": train, "validation": dev}

    task = load_task(validate(compose_config(args)).task)
    first = task.examples["validation"][0]
    assert first.text == "Review: a wonderful film Sentiment:" and first.label == 1
    # the verbalizer defaults to the label names
    assert first.candidates == (["bad", "good"] if kind == "csv" else ["neg", "pos"])


BAD_DATA = {
    "missing file": (None, "{dir}/nope.csv: file not found"),
    "empty file": ("", "{path}: the file holds no rows"),
    "invalid json": (
        '{"sentence": "fine", "label": 1}\n{"sentence": "oops" "label": 0}\n',
        "{path}, row 2: not valid JSON (Expecting ',' delimiter)",
    ),
    "missing column": (
        "text,label\nfine,1\n",
        "{path}, row 1, column 'sentence': the template needs field 'sentence'; the row has: text, label",
    ),
    "unknown label": (
        "sentence,label\nfine,1\nodd,7\n",
        "{path}, row 2, column 'label': label 7 is not one of task.labels: 0, 1",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_one_line_and_exit_2(tmp_path, case):
    content, message = BAD_DATA[case]
    suffix = "jsonl" if case == "invalid json" else "csv"
    path = tmp_path / (f"nope.{suffix}" if content is None else f"train.{suffix}")
    if content is not None:
        path.write_text(content)
    run_path = tmp_path / "run"
    args = [
        "task=custom",
        f"task.data_files.train={path}",
        f"task.data_files.validation={path}",
        "task.text_fields=[sentence]",
    ]
    result = run_cli(
        "softprompt.train",
        *args,
        CUSTOM_TEMPLATE,
        "task.labels=[0,1]",
        "model=tiny-bert",
        f"hydra.run.dir={run_path}",
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: " + message.format(dir=tmp_path, path=path)]
    assert not run_path.exists()


def custom_task(path, *extra: str):
    return validate(
        compose_config(
            [
                "task=custom",
                f"task.data_files.train={path}",
                f"task.data_files.validation={path}",
                "task.text_fields=[sentence]",
                CUSTOM_TEMPLATE,
                "task.labels=[0,1]",
                *extra,
            ]
        )
    ).task


def test_files_in_another_encoding_load_with_task_encoding(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes("sentence,label\ncaf\xe9 cr\xe8me,1\nna\xefve plot,0\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"train.csv, row 2: not valid utf-8 text \(byte b'\\xe9'\): set task.encoding"):
        load_task(custom_task(path))
    task = load_task(custom_task(path, "task.encoding=latin-1"))
    assert task.examples["train"][0].text == "Review: caf\xe9 cr\xe8me Sentiment:"


def test_a_csv_field_over_128_kb_loads(tmp_path):
    path = tmp_path / "train.csv"
    long = "word " * 60_000
    path.write_text(f'sentence,label\n"{long}",1\nshort,0\n')
    task = load_task(custom_task(path))
    assert len(task.rows["train"][0]["sentence"]) == len(long) > 128 * 1024


def test_an_empty_train_split_says_why(tmp_path):
    path = tmp_path / "one.csv"
    path.write_text("sentence,label\nfine,1\n")
    cfg = custom_task(path, "task.dev_from_train=0.5")
    with pytest.raises(UserError, match="the train split is empty .*task.dev_from_train=0.5 carved every train row"):
        load_task(cfg)


def test_empty_labels_name_the_values_the_data_has(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("sentence,label\nfine,pos\nbad,neg\n")
    with pytest.raises(ConfigError, match=r"task.labels=\[\] is not allowed: .*\(the train split has: neg, pos\)$"):
        load_task(custom_task(path, "task.labels=[]"))


def test_generated_answers_map_to_candidates():
    # two rows, two candidates: "5" (one token) and "7 8" (two tokens), left-padded as decoders lay them out
    batch = {
        "labels": torch.tensor([0, 0, 0, 0]),
        "targets": torch.tensor([[IGNORE, 5], [7, 8]] * 4),
        "pair_row": torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]),
        "pair_choice": torch.tensor([0, 1] * 4),
        "num_choices": torch.tensor(2),
    }
    generated = torch.tensor([[7, 8, 9], [5, 3, 3], [7, 2, 2], [9, 9, 9]])
    # exact starts win; otherwise the longest shared start; no overlap at all falls to the first candidate
    assert match_candidates(batch, generated).scores.argmax(-1).tolist() == [1, 0, 1, 0]


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-t5"])
def test_generation_uses_the_prompt_with_the_kv_cache(model):
    cfg = validate(compose_config(quick_overrides(model, **{"scorer.name": "generate"})))
    pipeline = build_pipeline(cfg)
    peft_model = attach_prompt(pipeline.backbone, cfg.prompt, pipeline.label_token_ids, head=False, seed=0)
    scorer = PromptedModel(peft_model, pipeline.backbone.kind, "generate").eval()
    batch = next(iter(make_loader(pipeline, "validation", training=False)))
    rows = batch["labels"].shape[0]

    def answers(prompt: torch.Tensor, use_cache: bool, part: dict | None = None) -> torch.Tensor:
        part = part or batch
        count = part["labels"].shape[0]
        return scorer.generate(part, prompt.unsqueeze(0).expand(count, -1, -1), max_new_tokens=6, use_cache=use_cache)

    first = prompt_parameter(peft_model).detach().clone()
    second = torch.empty_like(first).uniform_(-4, 4, generator=torch.Generator().manual_seed(1))
    with_cache = answers(first, True)
    assert torch.equal(with_cache, answers(first, False))
    assert torch.equal(answers(second, True), answers(second, False))
    assert not torch.equal(with_cache, answers(second, True))
    # a row's answer does not depend on the padding its batch gives it
    keys = ("query_ids", "query_mask") if pipeline.backbone.kind == "decoder" else ("input_ids", "attention_mask")
    last = rows - 1
    ids, mask = (batch[key][last : last + 1] for key in keys)
    kept = mask[0].bool()
    alone = {"labels": batch["labels"][last:], keys[0]: ids[:, kept], keys[1]: mask[:, kept]}
    assert torch.equal(answers(first, True, alone)[0], with_cache[last][: answers(first, True, alone).shape[1]])
    # and for an unpadded row it is PEFT's own generation with the prompt
    with torch.no_grad():
        theirs = peft_model.generate(
            input_ids=alone[keys[0]], attention_mask=alone[keys[1]], max_new_tokens=6, do_sample=False
        )
    new = theirs[0, alone[keys[0]].shape[1] :] if pipeline.backbone.kind == "decoder" else theirs[0, 1:]
    assert torch.equal(new, answers(first, True, alone)[0][: new.shape[0]])
