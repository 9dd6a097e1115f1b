"""Every config file composes, every sensible combination builds, and every mistake is one line."""

from __future__ import annotations

import itertools

import pytest

from helpers import ROOT, quick_overrides, run_cli
from softprompt.cli import compose_config
from softprompt.config import INITS, validate
from softprompt.errors import UserError
from softprompt.pipeline import build_pipeline
from softprompt.soft_prompt import attach_prompt, trainable_counts

CONF = ROOT / "conf"
GROUPS = {
    group: sorted(path.stem for path in (CONF / group).glob("*.yaml"))
    for group in ("model", "task", "prompt", "trainer")
}
TINY = ["tiny-bert", "tiny-gpt2", "tiny-llama", "tiny-t5"]


@pytest.mark.parametrize("group,choice", [(g, c) for g, choices in GROUPS.items() for c in choices])
def test_every_config_file_composes(group, choice):
    cfg = compose_config([f"{group}={choice}"])
    assert cfg[group] is not None
    if group != "task" or choice != "custom":
        validate(cfg)


@pytest.mark.parametrize("model,init", list(itertools.product(TINY, INITS[:-1])))
def test_tiny_model_and_init_combinations_build(model, init):
    overrides = quick_overrides(model, **{"prompt.init": init, "prompt.text": "classify this review"})
    cfg = validate(compose_config(overrides))
    pipeline = build_pipeline(cfg)
    peft_model = attach_prompt(
        pipeline.backbone, cfg.prompt, pipeline.label_token_ids, pipeline.scorer == "head", cfg.seed
    )
    counts = trainable_counts(peft_model)
    assert counts["prompt"] == cfg.prompt.length * pipeline.backbone.width
    assert counts["head"] == (0 if pipeline.scorer != "head" else pipeline.backbone.width * 2 + 2)


def test_backbone_is_frozen():
    cfg = validate(compose_config(quick_overrides("tiny-t5")))
    pipeline = build_pipeline(cfg)
    attach_prompt(pipeline.backbone, cfg.prompt, pipeline.label_token_ids, False, 0)
    assert not [n for n, p in pipeline.backbone.model.named_parameters() if p.requires_grad and "prompt" not in n]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model=nope"], "model='nope' is not allowed: one of: "),
        (["task=nope"], "task='nope' is not allowed: one of: "),
        (
            ["prompt.init=zeros"],
            "prompt.init='zeros' is not allowed: one of: random_uniform, sampled_vocab, class_labels, text, from_file",
        ),
        (["scorer.name=vote"], "scorer.name='vote' is not allowed: one of: auto, head, rank, generate"),
        (["prompt.length=0"], "prompt.length=0 is not allowed: a number >= 1"),
        (["prompt.length=-3"], "prompt.length=-3 is not allowed: a number >= 1"),
        (["trainer.lr=0"], "trainer.lr=0.0 is not allowed: a learning rate > 0"),
        (["trainer.lr=-0.1"], "trainer.lr=-0.1 is not allowed: a learning rate > 0"),
        (["model=tiny-bert", "prompt.length=200"], "must be at most 256, the model's maximum positions"),
        (["model=tiny-gpt2", "prompt.length=191"], "prompt.length + task.max_length + answer tokens"),
        (["trainer.foo=1"], "trainer.foo is not a config key: trainer has: optimizer, lr,"),
        (["prompt.length=abc"], "prompt.length: Value 'abc' of type 'str' could not be converted to Integer"),
        (
            ["model=tiny-t5", "scorer.name=head"],
            "scorer.name='head' is not allowed: rank or generate for a encoder_decoder model",
        ),
        (["model.name_or_path=no-such-org/no-such-model"], "could not be loaded: it is not a zoo name"),
    ],
)
def test_user_mistakes_give_one_line_and_exit_2(tmp_path, overrides, message):
    run_dir = tmp_path / "run"
    result = run_cli(
        "softprompt.train", *overrides, f"hydra.run.dir={run_dir}", "trainer.progress_bar=false", timeout=300
    )
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    assert not run_dir.exists(), "a failed fresh run must leave no run directory"


def test_validate_rejects_values_types_allow():
    cfg = compose_config(["trainer.mixed_precision=fp8"])
    with pytest.raises(UserError, match="trainer.mixed_precision='fp8' is not allowed: one of: no, bf16, fp16"):
        validate(cfg)


def test_hydra_flags_are_not_taken_for_overrides():
    from softprompt.cli import split_argv

    argv = ["--cfg", "job", "a=1", "-i", "plugins", "b=2", "--info", "c=3", "-cd", "/x", "-m", "d=1,2"]
    assert split_argv(argv) == (["a=1", "b=2", "c=3", "d=1,2"], True)
    result = run_cli("softprompt.train", "--cfg", "job", "model=tiny-t5")
    assert result.returncode == 0 and "name: tiny-t5" in result.stdout, result.stderr[-1000:]
