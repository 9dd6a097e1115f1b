"""Many prompts on one frozen model: mixed batches equal each prompt alone; ensembles; errors."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from accelerate import Accelerator
from peft import PeftModel

from helpers import quick_overrides, run_cli
from softprompt.cli import compose_config
from softprompt.config import validate
from softprompt.errors import UserError
from softprompt.pipeline import build_pipeline, make_loader, predict
from softprompt.predict import score_rows
from softprompt.prompt_bank import PromptBank
from softprompt.report import write_report
from softprompt.scorer import PromptedModel

WORDS = {"red": ["fire", "blood", "rose"], "green": ["grass", "leaf", "frog"], "blue": ["sky", "sea", "ice"]}


def colour_task(tmp_path) -> list[str]:
    """A 3-class task from files the test writes: the bank mixes it with the 2-class reviews task."""
    for split, count in (("train", 60), ("validation", 21)):
        with open(tmp_path / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["sentence", "colour"])
            for i in range(count):
                colour = list(WORDS)[i % 3]
                writer.writerow([f"the {WORDS[colour][i % 3]} number {i}", colour])
    return [
        "task=custom",
        "task.name=colours",
        f"task.data_files.train={tmp_path / 'train.csv'}",
        f"task.data_files.validation={tmp_path / 'validation.csv'}",
        "task.text_fields=[sentence]",
        "task.label_field=colour",
        'task.template="{sentence} is"',
        "task.labels=[red,green,blue]",
    ]


def alone(run_dir, overrides):
    """Predictions of one prompt on its own validation rows, through its own single-prompt model."""
    pipeline = build_pipeline(validate(compose_config(overrides)))
    model = PeftModel.from_pretrained(pipeline.backbone.model, run_dir / "prompt")
    scorer = PromptedModel(model, pipeline.backbone.kind, pipeline.scorer).eval()
    return pipeline, predict(scorer, make_loader(pipeline, "validation", False), Accelerator(), progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-bert", "tiny-gpt2", "tiny-t5"])
def test_mixed_batch_equals_each_prompt_alone(train_run, tmp_path, model):
    reviews = quick_overrides(model, steps=4, **{"trainer.lr": "0.3"})
    colours = [o for o in quick_overrides(model, steps=4, **{"trainer.lr": "0.3", "seed": "1"}) if "builtin" not in o]
    colours += colour_task(tmp_path)
    run_a, _ = train_run(reviews, "reviews")
    run_b, _ = train_run(colours, "colours")
    pipe_a, own_a = alone(run_a, reviews)
    pipe_b, own_b = alone(run_b, colours)
    bank = PromptBank.load({"reviews": run_a, "colours": run_b})
    examples_a, examples_b = pipe_a.task.examples["validation"], pipe_b.task.examples["validation"]
    # interleave the two tasks' rows so nearly every batch mixes prompts, tasks and class counts
    examples, indices, origin = [], [], []
    for i in range(max(len(examples_a), len(examples_b))):
        for index, rows in ((0, examples_a), (1, examples_b)):
            if i < len(rows):
                examples.append(rows[i])
                indices.append(index)
                origin.append(i)
    mixed = score_rows(bank, examples, indices, batch_size=8, progress=False)

    for index, own in ((0, own_a), (1, own_b)):
        positions = [p for p, k in enumerate(indices) if k == index]
        ours = mixed[positions][:, : len(own.scores[0])]
        theirs = torch.tensor(own.scores)[[origin[p] for p in positions]]
        assert torch.allclose(ours, theirs, atol=1e-5)
        assert ours.argmax(-1).tolist() == theirs.argmax(-1).tolist()
        assert torch.isinf(mixed[positions][:, len(own.scores[0]) :]).all()


def test_bank_refuses_prompts_of_other_backbones(train_run):
    run_a, _ = train_run(quick_overrides("tiny-gpt2", steps=0), "a")
    run_b, _ = train_run(quick_overrides("tiny-llama", steps=0), "b")
    with pytest.raises(UserError, match="prompts must share one backbone: 'a' uses 'tiny-gpt2', 'b' uses 'tiny-llama'"):
        PromptBank.load({"a": run_a, "b": run_b})


@pytest.mark.slow
def test_predict_cli_mixed_file_and_ensemble(tmp_path):
    """From the command line: two runs trained by softprompt-train, served mixed, then ensembled."""
    runs = []
    for seed in (0, 1):
        run_dir = tmp_path / f"seed{seed}"
        result = run_cli(
            "softprompt.train", *quick_overrides("tiny-llama", steps=4, seed=str(seed)), f"hydra.run.dir={run_dir}"
        )
        assert result.returncode == 0, result.stderr[-2000:]
        runs.append(run_dir)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "\n".join(
            json.dumps({"prompt": f"s{i % 2}", "text": text, "label": label})
            for i, (text, label) in enumerate(
                [("Great screen.", "positive"), ("Awful battery.", "negative"), ("Lovely design.", "positive")]
            )
        )
        + "\n"
    )
    result = run_cli(
        "softprompt.predict",
        "--prompts",
        f"s0={runs[0]}",
        f"s1={runs[1]}",
        "--input",
        str(rows),
        "--output",
        str(tmp_path / "out.jsonl"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in written] == ["s0", "s1", "s0"]
    assert all(
        row["prediction"] in ("negative", "positive") and set(row["scores"]) == {"negative", "positive"}
        for row in written
    )

    result = run_cli("softprompt.predict", "--ensemble", *map(str, runs), "--output", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    ensemble = json.loads((tmp_path / "ensemble.json").read_text())
    per_prompt = [ensemble["per_prompt"][run.name]["accuracy"] for run in runs]
    for run, value in zip(runs, per_prompt):
        assert value == pytest.approx(json.loads((run / "metrics.json").read_text())["eval"]["accuracy"], abs=1e-6)
    assert ensemble["mean"] == pytest.approx(sum(per_prompt) / 2) and ensemble["best"] == max(per_prompt)
    assert 0 <= ensemble["vote"]["accuracy"] <= 1 and ensemble["eval_examples"] == 24
    # the sweep's report shows the ensemble beside its members' mean and best
    report = write_report([tmp_path], tmp_path / "report")["markdown"].read_text()
    ensemble_row = report[report.index("## Ensembles") :].splitlines()[4]
    assert f"{ensemble['mean']:.4f}" in ensemble_row and f"{ensemble['vote']['accuracy']:.4f}" in ensemble_row


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,message",
    [
        (["--prompts", "broken"], "--prompts 'broken' is not allowed: NAME=RUN_DIR"),
        (["--prompts", "a=/nonexistent/run", "--input", "x.jsonl"], "/nonexistent/run is not a run directory"),
        ([], "give either --prompts NAME=RUN_DIR ... with --input FILE, or --ensemble RUN_DIR ..."),
    ],
)
def test_predict_mistakes_are_one_line(args, message):
    result = run_cli("softprompt.predict", *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_inspect_lists_neighbours_and_label_positions(train_run, tmp_path):
    """A class_labels prompt before training sits exactly on its label words: both positions say so."""
    overrides = quick_overrides("tiny-gpt2", steps=0, **{"prompt.length": "3", "prompt.init": "class_labels"})
    run_dir, _ = train_run(overrides)
    result = run_cli("softprompt.inspect_prompt", str(run_dir), "-k", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    import pandas as pd

    table = pd.read_csv(run_dir / "inspect.csv")
    assert list(table["position"]) == [0, 1, 2]
    assert table["neighbours"].iloc[0].split()[0] == "negative" and table["neighbours"].iloc[1].split()[0] == "positive"
    assert table["verbalizer_neighbour"].tolist()[:2] == [True, True]
    assert "positions have a verbalizer token among their 3 nearest neighbours" in result.stdout


def test_transfer_starts_from_another_runs_prompt(train_run):
    """SPoT-style transfer: prompt.init=from_file prompt.path=OTHER_RUN/prompt starts from that prompt exactly."""
    from safetensors.torch import load_file

    source, _ = train_run(quick_overrides("tiny-t5", steps=3, **{"trainer.lr": "0.3"}), "source")
    target, _ = train_run(
        quick_overrides("tiny-t5", steps=0, **{"prompt.init": "from_file", "prompt.path": str(source / "prompt")}),
        "target",
    )
    read = lambda run: load_file(str(run / "prompt" / "adapter_model.safetensors"))["prompt_embeddings"]  # noqa: E731
    assert torch.equal(read(source), read(target))
