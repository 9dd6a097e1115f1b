"""Generation tasks: the official E2E, SQuAD and GSM8K files load as written-answer tasks; a custom one works from
the command line; decoding with the soft prompt is batched, cached and still exact; a run records its answers."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import data_dir, quick_overrides, run_cli
from softprompt.cli import compose_config
from softprompt.config import validate
from softprompt.errors import ConfigError
from softprompt.method import build_model
from softprompt.pipeline import (
    Decoding,
    build_pipeline,
    cut_at_stop,
    make_loader,
    score_answers,
    stop_strings,
    write_answers,
)
from softprompt.scorer import PromptedModel
from softprompt.task import load_task

E2E_QUICK = ["task=e2e", "task.max_train_rows=48", "task.max_eval_rows=40", "generation.max_new_tokens=6"]


def quick(model: str, steps: int = 4, **extra: str) -> list[str]:
    """quick_overrides without the embedded task's sizes, for the other tasks."""
    return [item for item in quick_overrides(model, steps, **extra) if not item.startswith("task.builtin_size")]


def test_e2e_scores_each_table_once_against_all_its_references():
    data_dir("e2e")
    task = load_task(validate(compose_config(["task=e2e"])).task)
    assert len(task.rows["train"]) == 42061 and len(task.examples["train"]) == 42061
    assert len(task.rows["validation"]) == 4672
    dev = task.examples["validation"]
    assert len(dev) == 547
    assert sum(len(example.references) for example in dev) == 4672
    first = dev[0]
    assert first.text == "Table: name[Alimentum], area[city centre], familyFriendly[no]\nDescription:"
    assert first.references[0] == "There is a place in the city centre, Alimentum, that is not family-friendly."
    assert len(first.references) == 6


def test_squad_carves_dev_by_whole_articles_with_a_recorded_seed():
    data_dir("squad")
    task = load_task(validate(compose_config(["task=squad"])).task)
    train_titles = {row["title"] for row in task.rows["train"]}
    dev_titles = {row["title"] for row in task.rows["validation"]}
    assert not train_titles & dev_titles
    assert len(train_titles) + len(dev_titles) == 48 and len(dev_titles) == 10
    assert len(task.rows["train"]) + len(task.rows["validation"]) == 10570
    assert "10 whole title groups carved with seed 0" in task.provenance["validation"]
    # every annotator's answer is a reference, and each question id is scored on its own (some are asked twice)
    assert all(1 <= len(example.references) <= 6 for example in task.examples["validation"])
    assert len(task.examples["validation"]) == len(task.rows["validation"])
    assert len({example.text for example in task.examples["validation"]}) < len(task.rows["validation"])
    assert task.examples["validation"][0].text.endswith("\nAnswer:")


def test_gsm8k_trains_on_whole_solutions_and_scores_the_final_number():
    data_dir("gsm8k")
    task = load_task(validate(compose_config(["task=gsm8k"])).task)
    assert (len(task.examples["train"]), len(task.examples["validation"])) == (7473, 1319)
    solution = task.examples["validation"][0].references[0]
    assert solution.endswith("#### 18")
    metrics, rows = score_answers(task_with(task, 2), {0: "She makes 9 * 2 = $18 every day.", 1: "#### 4"})
    assert metrics == {"exact_match": 50.0}
    assert [row["scores"]["exact_match"] for row in rows] == [100.0, 0.0]


def task_with(task, rows: int):
    """The task with only its first validation inputs."""
    task.examples["validation"] = task.examples["validation"][:rows]
    return task


def test_custom_generation_task_from_the_command_line(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"q": f"{n} plus one", "a": str(n + 1)}) + "\n" for n in range(12)))
    overrides = [
        "task=custom",
        f"task.data_files.train={data}",
        f"task.data_files.validation={data}",
        "task.target_field=a",
        'task.template="Q: {q} A:"',
        "task.metrics=[squad]",
        "task.main_metric=exact_match",
        "task.scorers=[generate]",
    ]
    result = run_cli("softprompt.train", *quick("tiny-llama", steps=2), *overrides, f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["scorer"] == "generate" and set(metrics["eval"]) == {"exact_match", "f1"}
    written = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert [row["input"] for row in written][:2] == ["Q: 0 plus one A:", "Q: 1 plus one A:"]
    assert written[0]["references"] == ["1"] and set(written[0]["scores"]) == {"exact_match", "f1"}
    # softprompt-predict serves the prompt, mixed with another in one batch, and writes what training wrote
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(
        "".join(json.dumps({"q": f"{n} plus one", "a": str(n + 1), "prompt": "ab"[n % 2]}) + "\n" for n in range(12))
    )
    run = str(tmp_path / "run")
    served = run_cli(
        "softprompt.predict", "--prompts", f"a={run}", f"b={run}", "--input", str(mixed), "--batch-size", "5"
    )
    assert served.returncode == 0, served.stderr[-2000:]
    assert "a exact_match" in served.stdout and "b exact_match" in served.stdout
    answers = [json.loads(line) for line in (tmp_path / "mixed.predictions.jsonl").read_text().splitlines()]
    assert [row["prediction"] for row in answers] == [row["generated"] for row in written]
    assert all(set(row["scores"]) == {"exact_match", "f1"} for row in answers)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-t5"])
@pytest.mark.parametrize(
    "method", ["prompt_tuning", "prefix_tuning", "p_tuning", "lora", "model_tuning", "prompt_design"]
)
def test_every_method_trains_on_written_targets(train_run, model, method):
    data_dir("e2e")
    overrides = [*quick(model, steps=2, method=method), *E2E_QUICK, "task.max_eval_rows=20", "task.max_length=32"]
    run_path, result = train_run(overrides)
    assert result["scorer"] == "generate" and set(result["eval"]) == {"bleu", "rouge_l"}
    assert result["steps"] == (0 if method == "prompt_design" else 2)
    written = [json.loads(line) for line in (run_path / "predictions.jsonl").read_text().splitlines()]
    assert len(written) == result["eval_examples"] == 4
    if method == "prompt_design":
        rendered = (run_path / "rendered_prompts.txt").read_text()
        assert "the model writes its answer" in rendered and f"references: {written[0]['references'][0]}" in rendered


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["task=e2e", "task.metrics=[accuracy]"], "task.metrics='accuracy' is not allowed: one of bleu, rouge_l"),
        (["task=sst2", "task.metrics=[bleu]"], "task.metrics='bleu' is not allowed: one of accuracy"),
        (["task=e2e", "task.main_metric=accuracy"], "task.main_metric='accuracy' is not allowed: one of the keys"),
        (["task=e2e", "task.labels=[0,1]"], "task.target_field='ref' is not allowed: null for a classification task"),
        (["task=e2e", "task.scorers=[rank]"], "task.scorers=['rank'] is not allowed: [generate] for a generation"),
        (["task=e2e", "generation.num_beams=0"], "generation.num_beams=0 is not allowed: a number >= 1"),
        (["task=e2e", "generation.stop=['']"], "generation.stop=[''] is not allowed: non-empty strings"),
        (["task=e2e", "task.eval_rows=0"], "task.eval_rows=0 is not allowed: a number of rows >= 1"),
    ],
)
def test_generation_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match="^" + message.replace("[", r"\[").replace("]", r"\]")):
        validate(compose_config(overrides))


def test_an_encoder_cannot_write_answers():
    data_dir("e2e")
    cfg = validate(compose_config(["model=tiny-bert", *E2E_QUICK]))
    with pytest.raises(ConfigError, match="scorer.name='auto' is not allowed: none for an encoder"):
        build_pipeline(cfg)


def test_answers_stop_at_the_first_stop_string():
    # what the command line gives for 'generation.stop=["\n"]': Hydra keeps the backslash
    assert stop_strings(["\\n", "###", "a\\tb"]) == ("\n", "###", "a\tb")
    assert compose_config(['generation.stop=["\\n"]']).generation.stop == ["\\n"]
    assert cut_at_stop(" Paris.\nQuestion: next", ("\n",)) == "Paris."
    assert cut_at_stop("a b", ("\n", "###")) == "a b"
    assert cut_at_stop("x ### y \n z", ("\n", "###")) == "x"


def prompted(model: str, method: str = "prompt_tuning", **extra: str):
    """A pipeline on a few E2E rows and its prompted model with a random (not zero) prompt."""
    data_dir("e2e")
    overrides = quick(model, **{"method": method, "trainer.eval_batch_size": "8", **extra})
    cfg = validate(compose_config([*overrides, *E2E_QUICK]))
    pipeline = build_pipeline(cfg)
    peft_model = build_model(pipeline.backbone, cfg, pipeline.label_token_ids, head=False, seed=0)
    with torch.no_grad():
        for parameter in peft_model.parameters():
            if parameter.requires_grad:
                parameter.uniform_(-1, 1, generator=torch.Generator().manual_seed(3))
    return pipeline, PromptedModel(peft_model, pipeline.backbone.kind, "generate").eval()


def one_row(batch: dict, row: int, decoder: bool) -> dict:
    """Row `row` of a batch alone, its padding removed."""
    ids, mask = ("query_ids", "query_mask") if decoder else ("input_ids", "attention_mask")
    kept = batch[mask][row].bool()
    return {
        "labels": batch["labels"][row : row + 1],
        ids: batch[ids][row : row + 1, kept],
        mask: batch[mask][row : row + 1, kept],
    }


def assert_batched_equals_alone(model, batch, decoder: bool, cached_alone: bool, **options):
    together = model.generate(batch, max_new_tokens=6, **options)
    pad = model.backbone.generation_config.pad_token_id or 0
    for row in range(batch["labels"].shape[0]):
        alone = model.generate(one_row(batch, row, decoder), max_new_tokens=6, use_cache=cached_alone, **options)[0]
        assert torch.equal(together[row][: alone.shape[0]], alone), row
        # the batch pads a shorter answer after its end
        assert (together[row][alone.shape[0] :] == pad).all()


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-t5"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_batches_write_what_uncached_single_rows_write(model, num_beams):
    pipeline, scorer = prompted(model)
    batch = next(iter(make_loader(pipeline, "validation", training=False)))
    decoder = pipeline.backbone.kind == "decoder"
    assert (batch["query_mask" if decoder else "attention_mask"] == 0).any(), "the batch must hold padding"
    assert_batched_equals_alone(scorer, batch, decoder, cached_alone=False, num_beams=num_beams)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-t5"])
def test_prefix_tuning_writes_from_its_prefix_in_batches(model):
    pipeline, scorer = prompted(model, "prefix_tuning")
    batch = next(iter(make_loader(pipeline, "validation", training=False)))
    decoder = pipeline.backbone.kind == "decoder"
    # a prefix is a cache: one row alone is decoded with it too
    assert_batched_equals_alone(scorer, batch, decoder, cached_alone=True)
    assert_batched_equals_alone(scorer, batch, decoder, cached_alone=True, num_beams=2)
    # and the prefix is used: another prefix writes something else
    before = scorer.generate(batch, max_new_tokens=6)
    with torch.no_grad():
        for parameter in scorer.peft_model.parameters():
            if parameter.requires_grad:
                parameter.mul_(-3)
    assert not torch.equal(before, scorer.generate(batch, max_new_tokens=6))


@pytest.mark.slow
def test_smollm2_batched_cached_decoding_is_exact_on_real_rows():
    pipeline, scorer = prompted("smollm2-135m", **{"prompt.length": "8"})
    batch = next(iter(make_loader(pipeline, "validation", training=False)))
    rows = {key: value[:4] for key, value in batch.items() if key != "num_choices"}
    assert_batched_equals_alone(scorer, rows, decoder=True, cached_alone=False)


def test_answers_are_gathered_in_split_order_and_cut_at_stops():
    from accelerate import Accelerator

    pipeline, scorer = prompted("tiny-llama")
    loader = make_loader(pipeline, "validation", training=False)
    decoding = Decoding(pipeline.tokenizer, 6, stop=("e",))
    answers = write_answers(scorer, loader, Accelerator(cpu=True), decoding, progress=False)
    assert sorted(answers) == list(range(len(pipeline.task.examples["validation"])))
    assert not any("e" in text for text in answers.values())


@pytest.mark.slow
def test_a_sweep_of_a_generation_task_reports_its_metric(tmp_path):
    data_dir("e2e")
    sweep = tmp_path / "sweep"
    result = run_cli(
        "softprompt.train",
        "-m",
        *quick("tiny-llama", steps=2),
        *E2E_QUICK,
        "task.eval_rows=3",
        "prompt.length=2,4",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    table = (sweep / "results.csv").read_text()
    assert table.count("\n") == 3 and ",bleu," in table
    for job in (path for path in sweep.iterdir() if (path / "metrics.json").is_file()):
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["eval_subset"]["rows"] == 3 and metrics["eval_examples"] == 6
        assert json.loads((job / "task.json").read_text())["eval_subset"]["indices"] == [0, 3, 5]
        logged = [json.loads(line) for line in (job / "train_log.jsonl").read_text().splitlines()]
        assert [entry["step"] for entry in logged if "eval_subset" in entry] == [0, 1, 2]


@pytest.mark.slow
def test_two_processes_write_each_answer_once_as_one_process_does(tmp_path):
    data_dir("e2e")
    # 7 inputs over 2 processes with batches of 2: the last batch is padded, and its padding must not count
    overrides = [*quick("tiny-llama"), *E2E_QUICK, "task.max_eval_rows=70", "task.eval_rows=5"]
    single = run_cli("softprompt.train", *overrides, "trainer.eval_batch_size=2", f"hydra.run.dir={tmp_path / 'one'}")
    assert single.returncode == 0, single.stderr[-2000:]
    launch = ["torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "softprompt.train"]
    # the same global batch: 4 rows on each of 2 processes
    both = run_cli(
        *launch, *overrides, "trainer.batch_size=4", "trainer.eval_batch_size=2", f"hydra.run.dir={tmp_path / 'two'}"
    )
    assert both.returncode == 0, both.stderr[-3000:]
    written = (tmp_path / "two" / "predictions.jsonl").read_text()
    assert [json.loads(line)["index"] for line in written.splitlines()] == list(range(7))
    assert written == (tmp_path / "one" / "predictions.jsonl").read_text()
