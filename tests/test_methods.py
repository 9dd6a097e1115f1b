"""Methods under one roof: model tuning, prompt design, prefix tuning, p-tuning and LoRA run through the same
configs, scorers, loop, checkpoints and report as prompt tuning, with exact trainable parameter counts."""

from __future__ import annotations

import ast
import json

import pandas as pd
import pytest
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf
from transformers.pytorch_utils import Conv1D

from helpers import ROOT, make_run, peft_scores, quick_overrides, run_cli
from softprompt import run_dir as records
from softprompt import train as train_module
from softprompt.cli import compose_config
from softprompt.config import MethodConfig, validate
from softprompt.errors import UserError
from softprompt.method import build_model, check_memory, memory_estimate
from softprompt.pipeline import build_pipeline, make_loader, predict
from softprompt.registry import METHODS, lora_targets
from softprompt.report import write_report
from softprompt.scorer import PromptedModel
from softprompt.sweep import config_key, job_name

TINY = ["tiny-bert", "tiny-gpt2", "tiny-llama", "tiny-t5"]
TRAINED = ["prompt_tuning", "model_tuning", "prefix_tuning", "p_tuning", "lora"]
LENGTH = 4


def expected_counts(method: str, model, pipeline) -> int:
    """The trainable parameters each method should have, from the backbone's shapes alone (head excluded)."""
    config, width = model.config, pipeline.backbone.width
    if method == "prompt_tuning":
        return LENGTH * width
    if method == "p_tuning":
        # embedding of the virtual tokens + PEFT's MLP encoder: width -> h -> h -> width, h = width
        hidden = width
        return LENGTH * width + (width * hidden + hidden) + (hidden * hidden + hidden) + (hidden * width + width)
    if method == "prefix_tuning":
        # a key and a value vector per layer and virtual token, as wide as the layer's keys (grouped-query
        # attention: kv heads x head dim); T5: the decoder's layers
        layers = (
            getattr(config, "num_decoder_layers", None) or getattr(config, "num_hidden_layers", None) or config.n_layer
        )
        heads = config.num_attention_heads if hasattr(config, "num_attention_heads") else config.n_head
        kv_width = getattr(config, "num_key_value_heads", heads) * (width // heads)
        return layers * 2 * LENGTH * kv_width
    if method == "lora":
        # r x (in + out) per adapted matrix
        targets = lora_targets(pipeline.cfg, config.model_type)
        total = 0
        for name, module in model.named_modules():
            if name.split(".")[-1] in targets:
                if isinstance(module, Conv1D):
                    fan_in, fan_out = module.weight.shape
                else:
                    fan_in, fan_out = module.in_features, module.out_features
                total += 8 * (fan_in + fan_out)
        return total
    raise AssertionError(method)


@pytest.mark.slow
@pytest.mark.parametrize("model", TINY)
@pytest.mark.parametrize("method", TRAINED)
def test_each_method_trains_each_architecture_with_exact_counts(train_run, model, method):
    overrides = quick_overrides(
        model, steps=2, **{"method": method, "prompt.length": str(LENGTH), "trainer.log_every": "1"}
    )
    cfg = validate(compose_config(overrides))
    pipeline = build_pipeline(cfg)
    fresh = {name: p.numel() for name, p in pipeline.backbone.model.named_parameters()}
    head = sum(n for name, n in fresh.items() if name.split(".")[0] in ("classifier", "score"))
    expected = (
        sum(fresh.values())
        if method == "model_tuning"
        else expected_counts(method, pipeline.backbone.model, pipeline) + head
    )

    run_dir, result = train_run(overrides)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    counts = metrics["trainable_params"]
    assert metrics["status"] == "completed" and metrics["method"] == method
    assert counts["total"] == expected, counts
    assert counts["head"] == head
    assert counts["fraction"] == pytest.approx(expected / metrics["model_params"], rel=1e-6)
    assert sum(counts[part] for part in ("prompt", "adapter", "backbone", "head")) == counts["total"]
    losses = [json.loads(line)["loss"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    # what was trained is saved in its library's own format
    saved = run_dir / "prompt"
    assert (saved / ("model.safetensors" if method == "model_tuning" else "adapter_model.safetensors")).is_file()


@pytest.mark.parametrize(
    "model,method",
    [(m, k) for m in ("tiny-bert", "tiny-gpt2", "tiny-llama") for k in ("prefix_tuning", "p_tuning", "lora")],
)
def test_shared_scorer_paths_match_peft_forward(model, method):
    """Batched, padded scoring with prefixes / encoded prompts / LoRA equals PEFT's own forward, one row at a time."""
    cfg = validate(
        compose_config(
            quick_overrides(
                model, **{"method": method, "prompt.length": str(LENGTH), "task.builtin_size.validation": "8"}
            )
        )
    )
    pipeline = build_pipeline(cfg)
    peft_model = build_model(pipeline.backbone, cfg, pipeline.label_token_ids, pipeline.scorer == "head", seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in peft_model.parameters():
            if parameter.requires_grad:  # LoRA's B starts at zero: move every adapter off its no-op start
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
    peft_model.eval()
    with torch.no_grad():
        ours = predict(
            PromptedModel(peft_model, pipeline.backbone.kind, pipeline.scorer).eval(),
            make_loader(pipeline, "validation", False),
            Accelerator(),
            progress=False,
        )
        theirs = torch.tensor(peft_scores(peft_model, pipeline))
    assert torch.allclose(torch.tensor(ours.scores), theirs, atol=1e-4), (ours.scores[:2], theirs[:2])


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-t5"])
def test_prompt_design_writes_the_rendered_prompt_and_trains_nothing(train_run, model):
    instruction = "Say whether each review is positive or negative."
    run_dir, result = train_run(
        quick_overrides(
            model,
            **{
                "method": "prompt_design",
                "method.instruction": f"'{instruction}'",
                "method.num_demonstrations": "2",
                "method.show_rows": "2",
            },
        )
    )
    assert result["method"] == "prompt_design" and result["steps"] == 0 and result["trainable_params"]["total"] == 0
    assert result["eval"] == result["initial_eval"] and not (run_dir / "checkpoint").exists()
    cfg = validate(
        compose_config(
            quick_overrides(
                model,
                **{
                    "method": "prompt_design",
                    "method.instruction": f"'{instruction}'",
                    "method.num_demonstrations": "2",
                },
            )
        )
    )
    pipeline = build_pipeline(cfg)
    first = pipeline.task.examples["validation"][0]
    text = (run_dir / "rendered_prompts.txt").read_text()
    # the exact text the model reads: instruction, two solved train rows, then the row itself
    assert first.text in text and first.text.startswith(instruction + "\n\n")
    demonstrations = first.text[len(instruction) + 2 :].split("\n\n")[:2]
    train_texts = {f"{e.text} {e.candidates[e.label]}" for e in pipeline.task.examples["train"]}
    assert len(demonstrations) == 2 and all(demo in train_texts for demo in demonstrations)
    assert text.count("===== validation row") == 2
    # the same seed draws the same demonstrations; the accuracy is that of the rendered rows
    again = build_pipeline(cfg)
    assert again.task.examples["validation"][0].text == first.text


def test_prompt_design_zero_shot_is_the_bare_template(train_run):
    run_dir, result = train_run(quick_overrides("tiny-llama", method="prompt_design"))
    cfg = validate(compose_config(quick_overrides("tiny-llama", method="prompt_design")))
    assert build_pipeline(cfg).context == ""
    assert "===== validation row 3" in (run_dir / "rendered_prompts.txt").read_text()


@pytest.mark.slow
def test_model_tuning_memory_check_refuses_in_one_line(tmp_path):
    # a llama of ~100B parameters, counted on the meta device: nothing is allocated
    huge = [
        "model=tiny-llama",
        "method=model_tuning",
        "model.from_config.hidden_size=16384",
        "model.from_config.num_hidden_layers=48",
        "model.from_config.intermediate_size=65536",
        "model.from_config.num_attention_heads=128",
        "model.from_config.num_key_value_heads=8",
    ]
    result = run_cli(
        "softprompt.train", *huge, f"hydra.run.dir={tmp_path / 'run'}", "trainer.progress_bar=false", timeout=300
    )
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert "method=model_tuning of tiny-llama needs about" in lines[0] and "GiB" in lines[0]
    assert "adamw states" in lines[0] and "method.ignore_memory_check=true" in lines[0]
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_memory_estimate_by_precision_and_optimiser():
    cfg = validate(compose_config(quick_overrides("tiny-gpt2", method="model_tuning")))
    pipeline = build_pipeline(cfg)
    model_config, params = pipeline.backbone.model.config, sum(p.numel() for p in pipeline.backbone.model.parameters())
    needed, count, _ = memory_estimate(cfg, model_config, "decoder", "rank")
    assert count == params and needed == params * (4 + 4 + 8)
    half = validate(compose_config(quick_overrides("tiny-gpt2", method="model_tuning", **{"model.dtype": "bfloat16"})))
    assert memory_estimate(half, model_config, "decoder", "rank")[0] == params * (2 + 2 + 4)
    factored = validate(
        compose_config(quick_overrides("tiny-gpt2", method="model_tuning", **{"trainer.optimizer": "adafactor"}))
    )
    assert params * 8 < memory_estimate(factored, model_config, "decoder", "rank")[0] < params * 10
    with pytest.raises(UserError, match=r"needs about .* but 0.0 GiB is free in this test"):
        check_memory(cfg, model_config, "decoder", "rank", available=(1000, "free in this test"))
    check_memory(cfg, model_config, "decoder", "rank", available=(needed, "free in this test"))


def test_the_memory_check_counts_each_process_share_when_sharded(monkeypatch):
    overrides = quick_overrides("tiny-gpt2", method="model_tuning")
    cfg = validate(compose_config(overrides))
    sharded = validate(compose_config([*overrides, "trainer.sharding=fsdp"]))
    pipeline = build_pipeline(cfg)
    model_config = pipeline.backbone.model.config
    needed, _, _ = memory_estimate(cfg, model_config, "decoder", "rank")
    room = (needed * 3 // 4, "free in this test")
    monkeypatch.setenv("WORLD_SIZE", "4")
    # a quarter of the weights, gradients and moments on each of 4 processes fits where the whole does not
    with pytest.raises(
        UserError, match=r"adamw states 8 bytes each\), not counting.*trainer.sharding=fsdp across several processes"
    ):
        check_memory(cfg, model_config, "decoder", "rank", available=room)
    check_memory(sharded, model_config, "decoder", "rank", available=room)
    with pytest.raises(UserError, match=r"1/4 of it per process, sharded"):
        check_memory(sharded, model_config, "decoder", "rank", available=(needed // 8, "free in this test"))


@pytest.mark.parametrize("method", ["p_tuning", "prefix_tuning", "lora"])
def test_methods_with_a_head_train_in_fp32_under_a_bf16_backbone(method):
    """Adapter and head learn in fp32 on a bf16 encoder; the head takes the bf16 features (a dtype clash before)."""
    cfg = validate(compose_config(quick_overrides("tiny-bert", method=method, **{"model.dtype": "bfloat16"})))
    pipeline = build_pipeline(cfg)
    model = build_model(pipeline.backbone, cfg, pipeline.label_token_ids, head=True, seed=0)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    scorer = PromptedModel(model, pipeline.backbone.kind, "head").train()
    loss = scorer(next(iter(make_loader(pipeline, "train", training=True)))).loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["model=tiny-bert", "method=prompt_design"],
            "method.name='prompt_design' is not allowed: a method that trains for the encoder 'tiny-bert'",
        ),
        (["method=adapters"], "method='adapters' is not allowed: one of: "),
        (["method=lora", "method.lora_r=0"], "method.lora_r=0 is not allowed: a number >= 1"),
        (
            ["model=tiny-gpt2", "method=lora", "method.target_modules=[nope]"],
            "method.target_modules=['nope'] is not allowed: module names of tiny-gpt2",
        ),
        # a random MPNet (what mpnet-base is) needs no installed weights
        (
            ["model=tiny-bert", "model.from_config.model_type=mpnet", "method=prefix_tuning"],
            "a method other than prefix_tuning for 'tiny-bert': MPNetModel's attention takes no past key values",
        ),
    ],
)
def test_method_mistakes_are_user_errors_before_training(overrides, message):
    """Each is a UserError (one `error:` line and exit status 2 from the command, as the memory check shows)."""
    with pytest.raises(UserError) as error:
        pipeline = build_pipeline(validate(compose_config(overrides)))
        build_model(pipeline.backbone, pipeline.cfg, pipeline.label_token_ids, pipeline.scorer == "head", seed=0)
    assert message in str(error.value)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "model_tuning"])
def test_preempted_run_resumes_exactly(train_run, monkeypatch, method):
    overrides = quick_overrides(
        "tiny-llama",
        steps=4,
        **{"method": method, "trainer.log_every": "1", "trainer.eval_every": "2", "trainer.lr": "0.01"},
    )
    whole, _ = train_run(overrides, "whole")
    calls = iter(range(1000))
    monkeypatch.setattr(train_module.Preemption, "requested", lambda self, accelerator: next(calls) == 1)
    with pytest.raises(SystemExit):
        train_run(overrides, "cut")
    assert records.status(whole.parent / "cut") == "preempted"
    monkeypatch.undo()
    cut, _ = train_run(overrides, "cut")

    def deterministic(path):
        return {
            k: v for k, v in json.loads((path / "metrics.json").read_text()).items() if k not in records.TIMING_KEYS
        }  # noqa: E731

    assert deterministic(cut) == deterministic(whole)
    assert (cut / "train_log.jsonl").read_text().count("\n") == 4
    losses = lambda path: [json.loads(line)["loss"] for line in (path / "train_log.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(cut) == losses(whole)


def test_default_method_keeps_config_keys_and_job_names():
    cfg = compose_config(["model=tiny-bert"])
    plain = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "method"])
    assert config_key(cfg) == config_key(plain), "prompt tuning with default knobs hashes as before methods existed"
    assert job_name(cfg).startswith("tiny-bert_reviews_len20_class_labels_seed0_")
    assert "_lora_r8_" in job_name(compose_config(["model=tiny-bert", "method=lora"]))
    assert "_prompt_design_k4_" in job_name(compose_config(["model=tiny-gpt2", "method=prompt_design_k4"]))
    lr = compose_config(["method=model_tuning"]).trainer
    assert (lr.optimizer, lr.lr) == ("adamw", 3e-5)
    assert compose_config(["method=model_tuning", "trainer.lr=1e-4"]).trainer.lr == 1e-4


def test_methods_preset_sweeps_methods_and_models():
    cfg = compose_config(["experiment=methods"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert set(params["method"].split(",")) == {
        "model_tuning",
        "prompt_tuning",
        "prefix_tuning",
        "p_tuning",
        "lora",
        "prompt_design",
        "prompt_design_k4",
    }
    assert set(params["model"].split(",")) == {"minilm-l6", "smollm2-135m", "gemma3-270m"}
    assert cfg.task.name == "sst2"


@pytest.mark.slow
def test_report_draws_metric_by_model_size_per_method(tmp_path):
    """Lester Fig. 1 from run folders: one line per method (prompt design per k), model size on a log axis."""
    points = {  # (model, params) x method -> accuracy, trainable
        ("smollm2-135m", 134_515_008): {
            "model_tuning": (0.9, 134_515_008),
            "prompt_tuning": (0.8, 11_520),
            "lora": (0.85, 460_800),
            "prompt_design": (0.6, 0),
        },
        ("gemma3-270m", 268_098_176): {
            "model_tuning": (0.92, 268_098_176),
            "prompt_tuning": (0.86, 12_800),
            "lora": (0.88, 737_280),
            "prompt_design": (0.7, 0),
        },
    }
    for (model, params), methods in points.items():
        for method, (value, trainable) in methods.items():
            for k in [0, 4] if method == "prompt_design" else [None]:
                overrides = [f"model={model}", f"method={method}", "task=reviews"] + (
                    [f"method.num_demonstrations={k}"] if k is not None else []
                )
                metrics = {
                    "status": "completed",
                    "method": method,
                    "model": model,
                    "model_params": params,
                    "task": "reviews",
                    "main_metric": "accuracy",
                    "eval": {"accuracy": value + (0.05 if k == 4 else 0)},
                    "initial_eval": {"accuracy": 0.5},
                    "best_step": 10,
                    "seed": 0,
                    "trainable_params": {"total": trainable, "fraction": trainable / params},
                    "train_seconds": 1.0,
                }
                make_run(tmp_path, f"{model}_{method}_{k}", overrides, metrics)
    written = write_report([tmp_path], tmp_path)
    table = pd.read_csv(written["results"])
    assert "method" in table.columns and "trainable_fraction" in table.columns
    assert table[table["method"] == "lora"]["prompt_length"].isna().all()
    assert "trainer.lr" not in table.columns, "a key each method sets itself is not a setting of its own"
    assert "method.num_demonstrations" in table.columns
    assert (tmp_path / "by_model_size.png").stat().st_size > 10_000 and (tmp_path / "by_trainable_params.png").is_file()
    svg = (tmp_path / "by_model_size.svg").read_text()
    for label in ("model tuning", "prompt tuning", "LoRA", "prompt design (k=0)", "prompt design (k=4)"):
        assert label in svg
    assert not (tmp_path / "by_prompt_length.png").exists()
    assert "![by_model_size](by_model_size.png)" in written["markdown"].read_text()


def test_each_method_is_one_registry_entry_and_one_yaml_file():
    """Adding a method is a registry entry and a conf/method file; no other module names a method."""
    files = sorted(path.stem for path in (ROOT / "conf" / "method").glob("*.yaml"))
    # a file is a registered method's own, or a preset of one (prompt_design_k4)
    assert {compose_config([f"method={name}"]).method.name for name in files} == set(METHODS)
    assert set(METHODS) <= set(files)
    for spec in METHODS.values():
        assert set(spec.knobs) <= set(MethodConfig.__dataclass_fields__), spec.name
    modules = sorted((ROOT / "src" / "softprompt").rglob("*.py"))
    mentions = [
        f"{path.name}:{node.lineno} {node.value!r}"
        for path in modules
        if path.name != "registry.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant) and node.value in METHODS
    ]
    assert not mentions, "method names outside the registry: " + ", ".join(mentions)
