"""Every config file composes, every sensible combination builds, and every mistake is one line."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from omegaconf import MISSING, OmegaConf

from helpers import ROOT, quick_overrides, run_cli
from softprompt.cli import compose_config
from softprompt.config import (
    INITS,
    GenerationConfig,
    MethodConfig,
    ModelConfig,
    PromptConfig,
    ScorerConfig,
    TaskConfig,
    TrainConfig,
    TrainerConfig,
    validate,
)
from softprompt.errors import UserError
from softprompt.method import parameter_counts
from softprompt.pipeline import build_pipeline
from softprompt.soft_prompt import attach_prompt

CONF = ROOT / "conf"
GROUPS = {
    group: sorted(path.stem for path in (CONF / group).glob("*.yaml"))
    for group in ("model", "task", "prompt", "trainer", "method", "experiment")
}
SCHEMAS = {
    "model": ModelConfig,
    "task": TaskConfig,
    "prompt": PromptConfig,
    "method": MethodConfig,
    "trainer": TrainerConfig,
    "scorer": ScorerConfig,
    "generation": GenerationConfig,
}
TINY = ["tiny-bert", "tiny-gpt2", "tiny-llama", "tiny-t5"]


@pytest.mark.parametrize("group,choice", [(g, c) for g, choices in GROUPS.items() for c in choices])
def test_every_config_file_composes(group, choice):
    cfg = compose_config([f"{group}={choice}"])
    # experiments are `@package _global_` presets: they have no node of their own
    assert group == "experiment" or cfg[group] is not None
    if group != "task" or choice != "custom":
        validate(cfg)


def dataclass_defaults(schema: type) -> dict:
    """A schema's default values, MISSING ones left out."""
    defaults = {}
    for field in dataclasses.fields(schema):
        if field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = field.default_factory()
        elif field.default is not dataclasses.MISSING and field.default is not MISSING:
            defaults[field.name] = field.default
    return defaults


def composed(overrides: list[str]) -> dict:
    return OmegaConf.to_container(compose_config(overrides), resolve=True)


@pytest.mark.slow
def test_yaml_files_own_the_defaults():
    """A schema default is MISSING or exactly the value the YAML files compose to, so no default lives in two
    places that can disagree. The default composition is train.yaml's defaults list: trainer/default.yaml,
    prompt/default.yaml, method/prompt_tuning.yaml, and the root's own keys."""
    root = composed([])
    for section in ("prompt", "method", "trainer", "scorer", "generation"):
        for key, value in dataclass_defaults(SCHEMAS[section]).items():
            assert root[section][key] == value, (
                f"{section}.{key}: the dataclass says {value!r}, the YAML {root[section][key]!r}"
            )
    for key, value in dataclass_defaults(TrainConfig).items():
        if key not in SCHEMAS:
            assert root[key] == value, key
    # a model or task file is a choice, not a default: a schema default that every file of the group sets
    # otherwise is never used, so it must be MISSING or the files' value
    for group in ("model", "task"):
        choices = [composed([f"{group}={choice}"])[group] for choice in GROUPS[group]]
        for key, value in dataclass_defaults(SCHEMAS[group]).items():
            assert any(choice[key] == value for choice in choices), (
                f"{group}.{key}: every file of conf/{group} overrides the dataclass default {value!r}"
            )
    # and every method file composes onto the schema's knobs without changing their type
    for choice in GROUPS["method"]:
        method = composed([f"method={choice}"])["method"]
        assert method.keys() == dataclass_defaults(MethodConfig).keys()


@pytest.mark.parametrize("model,init", list(itertools.product(TINY, INITS[:-1])))
def test_tiny_model_and_init_combinations_build(model, init):
    overrides = quick_overrides(model, **{"prompt.init": init, "prompt.text": "classify this review"})
    cfg = validate(compose_config(overrides))
    pipeline = build_pipeline(cfg)
    peft_model = attach_prompt(
        pipeline.backbone, cfg.prompt, pipeline.label_token_ids, pipeline.scorer == "head", cfg.seed
    )
    counts = parameter_counts(peft_model, "prompt_tuning", pipeline.backbone.num_params)
    assert counts["prompt"] == cfg.prompt.length * pipeline.backbone.width
    assert counts["head"] == (0 if pipeline.scorer != "head" else pipeline.backbone.width * 2 + 2)


def test_backbone_is_frozen():
    cfg = validate(compose_config(quick_overrides("tiny-t5")))
    pipeline = build_pipeline(cfg)
    attach_prompt(pipeline.backbone, cfg.prompt, pipeline.label_token_ids, False, 0)
    assert not [n for n, p in pipeline.backbone.model.named_parameters() if p.requires_grad and "prompt" not in n]


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model=nope"], "model='nope' is not allowed: one of: "),
        (["task=nope"], "task='nope' is not allowed: one of: "),
        (["experiment=fig3"], "experiment='fig3' is not allowed: one of: e2e, fig1_sst2, fig3a_rte, "),
        (
            ["prompt.init=zeros"],
            "prompt.init='zeros' is not allowed: one of: random_uniform, sampled_vocab, class_labels, text, from_file",
        ),
        (["scorer.name=vote"], "scorer.name='vote' is not allowed: one of: auto, head, rank, generate"),
        (["prompt.length=0"], "prompt.length=0 is not allowed: a number >= 1"),
        (["prompt.length=-3"], "prompt.length=-3 is not allowed: a number >= 1"),
        (["trainer.lr=0"], "trainer.lr=0.0 is not allowed: a learning rate > 0"),
        (["trainer.lr=-0.1"], "trainer.lr=-0.1 is not allowed: a learning rate > 0"),
        (["trainer.head_lr=-0.1"], "trainer.head_lr=-0.1 is not allowed: a learning rate >= 0"),
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


@pytest.mark.slow
def test_hydra_flags_are_not_taken_for_overrides():
    from softprompt.cli import split_argv

    argv = ["--cfg", "job", "a=1", "-i", "plugins", "b=2", "--info", "c=3", "-cd", "/x", "-m", "d=1,2"]
    assert split_argv(argv) == (["a=1", "b=2", "c=3", "d=1,2"], True)
    result = run_cli("softprompt.train", "--cfg", "job", "model=tiny-t5")
    assert result.returncode == 0 and "name: tiny-t5" in result.stdout, result.stderr[-1000:]
