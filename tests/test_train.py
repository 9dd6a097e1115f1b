"""Training end to end on tiny models: run directory contract, PEFT reload, determinism."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator
from peft import PeftModel

from helpers import peft_scores, quick_overrides
from softprompt.cli import compose_config
from softprompt.config import validate
from softprompt.pipeline import build_pipeline, make_loader, predict
from softprompt.run_dir import TIMING_KEYS
from softprompt.scorer import PromptedModel
from softprompt.soft_prompt import attach_prompt

ARCHITECTURES = ["tiny-bert", "tiny-gpt2", "tiny-llama", "tiny-t5"]


@pytest.mark.parametrize("model", ARCHITECTURES)
def test_trains_saves_and_reloads_through_peft(train_run, model):
    overrides = quick_overrides(model, steps=6, **{"trainer.lr": "0.3"})
    run_dir, result = train_run(overrides)

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    for key in (
        "eval",
        "initial_eval",
        "eval_examples",
        "best_step",
        "trainable_params",
        "train_seconds",
        "train_samples_per_second",
    ):
        assert key in metrics
    assert metrics["eval_examples"] == 24
    assert metrics["trainable_params"]["prompt"] == 4 * 32
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [6] and {"loss", "lr", "samples_per_second"} <= set(log[0])
    env = json.loads((run_dir / "env.json").read_text())
    assert env["num_processes"] == 1 and env["effective_batch_size"] == 8 and env["seed"] == 0

    cfg = validate(compose_config(overrides))
    pipeline = build_pipeline(cfg)
    with torch.no_grad():
        reloaded = PeftModel.from_pretrained(pipeline.backbone.model, run_dir / "prompt").eval()
        ours = predict(
            PromptedModel(reloaded, pipeline.backbone.kind, pipeline.scorer).eval(),
            make_loader(pipeline, "validation", False),
            Accelerator(),
            progress=False,
        )
        theirs = torch.tensor(peft_scores(reloaded, pipeline))
    # batched-and-padded versus one row at a time: equal up to float rounding ...
    assert torch.allclose(torch.tensor(ours.scores), theirs, atol=1e-5)
    # ... so every prediction not decided by rounding is the same
    top2 = theirs.topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) > 1e-4
    assert decided.sum() >= len(decided) // 2
    assert torch.equal(torch.tensor(ours.predictions)[decided], theirs.argmax(-1)[decided])
    accuracy = sum(p == r for p, r in zip(ours.predictions, ours.references)) / len(ours.references)
    assert accuracy == pytest.approx(metrics["eval"]["accuracy"], abs=1e-6)


def test_metrics_keep_every_evaluation_as_the_dev_curve(train_run):
    """eval_curve holds step 0 and each trainer.eval_every step; the best of them is `eval`, at `best_step`."""
    run_dir, _ = train_run(quick_overrides("tiny-bert", steps=6, **{"trainer.lr": "0.3", "trainer.eval_every": "2"}))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    curve = metrics["eval_curve"]
    assert [point["step"] for point in curve] == [0, 2, 4, 6]
    assert curve[0] == {"step": 0, **metrics["initial_eval"]}
    accuracies = [point["accuracy"] for point in curve]
    assert len(set(accuracies)) > 1, "the tiny model's dev accuracy moves at this learning rate"
    first_best = accuracies.index(max(accuracies))
    assert metrics["eval"]["accuracy"] == max(accuracies) and metrics["best_step"] == curve[first_best]["step"]


def test_same_seed_gives_identical_metrics(train_run):
    overrides = quick_overrides("tiny-llama", steps=4)
    first, _ = train_run(overrides, "first")
    second, _ = train_run(overrides, "second")
    other, _ = train_run(overrides + ["seed=1"], "other")

    def deterministic(path):
        record = json.loads((path / "metrics.json").read_text())
        return {key: value for key, value in record.items() if key not in TIMING_KEYS}

    assert deterministic(first) == deterministic(second)
    losses = lambda path: [json.loads(line)["loss"] for line in (path / "train_log.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(first) == losses(second) != losses(other)


def test_zero_steps_only_evaluates(train_run):
    run_dir, result = train_run(quick_overrides("tiny-t5", steps=0))
    assert result["eval"] == result["initial_eval"] and result["best_step"] == 0 and result["steps"] == 0
    assert (run_dir / "prompt" / "adapter_model.safetensors").is_file()


def test_learning_moves_the_prompt_only(train_run):
    run_dir, result = train_run(
        quick_overrides("tiny-gpt2", steps=3, **{"trainer.lr": "0.5", "prompt.init": "random_uniform"})
    )
    from safetensors.torch import load_file

    saved = load_file(str(run_dir / "prompt" / "adapter_model.safetensors"))
    assert set(saved) == {"prompt_embeddings"}


@pytest.mark.parametrize("head_lr", ["0", "null"])
def test_head_trains_at_its_own_learning_rate(head_lr):
    """trainer.head_lr sets the encoder head's rate apart from the prompt's: at 0 an update moves the prompt and
    leaves the head as it was; unset, both move. It is part of the run's identity only when set."""
    from softprompt.identity import config_key
    from softprompt.train import make_optimizer, parameter_groups

    composed = compose_config(quick_overrides("tiny-bert", **{"trainer.lr": "0.5", "trainer.head_lr": head_lr}))
    cfg = validate(composed)
    pipeline = build_pipeline(cfg)
    peft_model = attach_prompt(pipeline.backbone, cfg.prompt, pipeline.label_token_ids, head=True, seed=0)
    model = PromptedModel(peft_model, pipeline.backbone.kind, pipeline.scorer)
    optimizer = make_optimizer(cfg.trainer, parameter_groups(cfg.trainer, peft_model))
    trainable = {name: parameter for name, parameter in peft_model.named_parameters() if parameter.requires_grad}
    before = {name: parameter.detach().clone() for name, parameter in trainable.items()}
    model(next(iter(make_loader(pipeline, "train", training=True)))).loss.backward()
    optimizer.step()
    moved = {name for name, parameter in trainable.items() if not torch.equal(parameter, before[name])}
    head = {name for name in trainable if "classifier" in name}
    assert head and "prompt_encoder.default.embedding.weight" in moved
    assert bool(moved & head) == (head_lr == "null")
    assert (
        config_key(composed) == config_key(compose_config(quick_overrides("tiny-bert", **{"trainer.lr": "0.5"})))
    ) == (head_lr == "null")


@pytest.mark.slow
def test_embedded_default_learns(tmp_path):
    """softprompt-train with no arguments: minilm-l6 on the generated reviews, >= 0.85 and >= +0.2 over step 0."""
    from helpers import run_cli

    result = run_cli("softprompt.train", f"hydra.run.dir={tmp_path / 'run'}", "trainer.progress_bar=false", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert metrics["eval"]["accuracy"] >= 0.85
    assert metrics["eval"]["accuracy"] - metrics["initial_eval"]["accuracy"] >= 0.2
    assert "accuracy:" in result.stdout and "trainable parameters" in result.stdout
    assert result.stdout.count("run: ") == 1


@pytest.mark.parametrize("backbone_dropout", [False, True])
def test_backbone_dropout_only_when_asked(backbone_dropout):
    """Training mode keeps the frozen backbone deterministic unless trainer.backbone_dropout turns its dropout on;
    evaluation after training mode is deterministic either way."""
    cfg = validate(compose_config(quick_overrides("tiny-bert", steps=1)))
    pipeline = build_pipeline(cfg)
    peft_model = attach_prompt(pipeline.backbone, cfg.prompt, pipeline.label_token_ids, head=True, seed=0)
    model = PromptedModel(peft_model, pipeline.backbone.kind, pipeline.scorer, backbone_dropout=backbone_dropout)
    batch = next(iter(make_loader(pipeline, "train", training=True)))
    model.train()
    first, second = model(batch).loss.item(), model(batch).loss.item()
    assert (first != second) == backbone_dropout
    assert model.training
    predict(model, make_loader(pipeline, "validation", False), Accelerator(), progress=False)
    assert model.training and model.backbone.training == backbone_dropout
