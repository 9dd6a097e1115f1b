"""The optimisations of the training and evaluation paths change no result (beyond float rounding)."""

from __future__ import annotations

import json
from dataclasses import replace
from unittest import mock

import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers.activations import GELUTanh, NewGELUActivation
from transformers.integrations import sdpa_attention

from helpers import quick_overrides
from softprompt.backbone import GROUPED_SDPA, load_backbone
from softprompt.batching import Collator, encode
from softprompt.cli import compose_config
from softprompt.config import register_configs, validate
from softprompt.errors import ConfigError
from softprompt.pipeline import build_pipeline, make_loader, predict
from softprompt.scorer import PromptedModel
from softprompt.soft_prompt import attach_prompt
from softprompt.task import Example

TEXTS = [
    "a gem of a film",
    "dull",
    "the plot goes nowhere and the actors seem to know it",
    "fine",
    "an utterly charming, funny ride",
]
# candidates of one, two and three tokens, so answers of different lengths share a batch
CANDIDATES = ["yes", "not at all", "maybe so"]


def prompted(model: str) -> tuple[PromptedModel, object]:
    register_configs()
    cfg = validate(compose_config([f"model={model}", "prompt.length=4", "prompt.init=random_uniform"]))
    backbone = load_backbone(cfg.model)
    peft_model = attach_prompt(backbone, cfg.prompt, [], head=False, seed=0)
    return PromptedModel(peft_model, backbone.kind, "rank").eval(), backbone


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_shared_input_scoring_equals_one_sequence_per_candidate(model):
    """Evaluation scores every candidate on top of its row's cached input; the training layout (input and
    answer as one sequence) scoring each candidate as if it were gold must give the same log-probabilities."""
    scorer, backbone = prompted(model)
    examples = [Example(text, CANDIDATES, label=i % len(CANDIDATES)) for i, text in enumerate(TEXTS)]
    rows = encode(examples, backbone.tokenizer, backbone.kind, "rank", max_length=32)
    assert len({len(ids) for ids in rows[0].candidate_ids}) == 3
    pad = backbone.tokenizer.pad_token_id
    # each row its own prompt, as in a prompt bank
    prompts = torch.randn(len(rows), 4, backbone.width, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        shared_batch = Collator(backbone.kind, "rank", pad, all_candidates=True)(rows)
        assert shared_batch["input_ids"].shape[0] == len(rows)
        shared = scorer(shared_batch, prompts=prompts).scores
        one_sequence = torch.stack(
            [
                scorer(
                    Collator(backbone.kind, "rank", pad, all_candidates=False)([_as_gold(row, choice) for row in rows]),
                    prompts=prompts,
                ).scores[:, choice]
                for choice in range(len(CANDIDATES))
            ],
            dim=1,
        )
    assert torch.isfinite(shared).all()
    torch.testing.assert_close(shared, one_sequence, atol=1e-5, rtol=1e-5)


def test_shared_input_scoring_single_token_candidates_needs_one_pass():
    """With one-token answers the input's last position scores them all: one forward pass per batch."""
    scorer, backbone = prompted("tiny-llama")
    examples = [Example(text, ["yes", "no"], label=0) for text in TEXTS]
    rows = encode(examples, backbone.tokenizer, backbone.kind, "rank", max_length=32)
    batch = Collator(backbone.kind, "rank", backbone.tokenizer.pad_token_id, all_candidates=True)(rows)
    calls = []
    hook = scorer.backbone.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        with torch.no_grad():
            scores = scorer(batch).scores
    finally:
        hook.remove()
    assert len(calls) == 1 and scores.shape == (len(rows), 2) and torch.isfinite(scores).all()


def _as_gold(row, choice):
    return replace(row, label=choice)


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-llama"])
def test_length_ordered_evaluation_gives_split_order_and_same_scores(model):
    """Evaluation batches rows of similar length (less padding); predictions still come in split order,
    equal to scoring the rows in their own order up to float rounding."""
    register_configs()
    cfg = validate(
        compose_config(quick_overrides(model, **{"task.builtin_size.validation": "40", "trainer.eval_batch_size": "8"}))
    )
    pipeline = build_pipeline(cfg)
    peft_model = attach_prompt(
        pipeline.backbone, cfg.prompt, pipeline.label_token_ids, head=pipeline.scorer == "head", seed=0
    )
    scorer = PromptedModel(peft_model, pipeline.backbone.kind, pipeline.scorer).eval()
    loader = make_loader(pipeline, "validation", training=False)
    lengths = [int(batch["attention_mask"].sum(-1).max()) for batch in loader]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]
    rows = encode(
        pipeline.task.examples["validation"],
        pipeline.tokenizer,
        pipeline.backbone.kind,
        pipeline.scorer,
        cfg.task.max_length,
    )
    in_split_order = DataLoader(rows, batch_size=8, collate_fn=loader.collate_fn)
    ordered = predict(scorer, loader, Accelerator(cpu=True), progress=False)
    plain = predict(scorer, in_split_order, Accelerator(cpu=True), progress=False)
    assert ordered.indices == plain.indices == list(range(len(rows)))
    assert ordered.references == plain.references
    torch.testing.assert_close(torch.tensor(ordered.scores), torch.tensor(plain.scores), atol=1e-5, rtol=1e-5)


def saved_bytes_and_gradient(model: PromptedModel, batch: dict) -> tuple[int, torch.Tensor]:
    """Bytes autograd keeps for backward (distinct storages; parameters excluded), and the trainable gradients."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(batch).loss
    loss.backward()
    return sum(kept.values()), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-llama", "tiny-t5"])
@pytest.mark.parametrize("backbone_dropout", [False, True])
def test_gradient_checkpointing_keeps_gradients_and_frees_activations(model, backbone_dropout):
    """trainer.gradient_checkpointing: the same gradients reach the prompt (and head), from fewer kept activations,
    with the backbone's dropout off (layers marked training, their insides not) or on (same random masks replayed)."""
    register_configs()
    cfg = validate(compose_config(quick_overrides(model)))
    pipeline = build_pipeline(cfg)
    batch = next(iter(make_loader(pipeline, "train", training=True)))
    results = []
    for checkpointed in (False, True):
        backbone = pipeline.load_backbone_copy()
        peft_model = attach_prompt(
            backbone, cfg.prompt, pipeline.label_token_ids, head=pipeline.scorer == "head", seed=0
        )
        scorer = PromptedModel(
            peft_model,
            backbone.kind,
            pipeline.scorer,
            backbone_dropout=backbone_dropout,
            gradient_checkpointing=checkpointed,
        )
        scorer.train()
        torch.manual_seed(0)
        results.append(saved_bytes_and_gradient(scorer, batch))
        assert not any(m.training for m in scorer.modules() if isinstance(m, torch.nn.Dropout)) or backbone_dropout
    (plain_bytes, plain_grad), (checkpointed_bytes, checkpointed_grad) = results
    assert plain_grad.abs().sum() > 0
    torch.testing.assert_close(checkpointed_grad, plain_grad, atol=1e-6, rtol=1e-5)
    # what stays outside the layers (scored logits, masks) is a large share of so small a model
    assert checkpointed_bytes < 0.8 * plain_bytes


def test_gradient_checkpointing_refused_with_prefix_tuning():
    register_configs()
    with pytest.raises(
        ConfigError, match="trainer.gradient_checkpointing=True is not allowed: false with method=prefix_tuning"
    ):
        validate(
            compose_config(
                quick_overrides("tiny-llama", **{"method": "prefix_tuning", "trainer.gradient_checkpointing": "true"})
            )
        )


def test_length_grouped_training_batches():
    """trainer.group_by_length: every row once per epoch, in batches of similar length (less padding than a plain
    shuffle), in an order fixed by the seed."""
    register_configs()

    def epoch(group: bool, seed: int) -> tuple[list[list[int]], list[list[int]]]:
        """Each batch's row lengths and row numbers, from one pass over the loader."""
        cfg = validate(
            compose_config(
                quick_overrides(
                    "tiny-bert", **{"task.builtin_size.train": "400", "trainer.group_by_length": str(group).lower()}
                )
            )
        )
        batches = list(make_loader(build_pipeline(cfg), "train", training=True, seed=seed))
        return [batch["attention_mask"].sum(-1).tolist() for batch in batches], [
            batch["index"].tolist() for batch in batches
        ]

    (grouped_lengths, grouped_rows), (plain_lengths, plain_rows) = epoch(True, 0), epoch(False, 0)
    assert sorted(sum(grouped_rows, [])) == sorted(sum(plain_rows, [])) == list(range(400))

    def padded(batches):
        return sum(max(lengths) * len(lengths) for lengths in batches)

    assert padded(grouped_lengths) < 0.9 * padded(plain_lengths)
    assert epoch(True, 0)[1] == grouped_rows != epoch(True, 1)[1]


@pytest.mark.parametrize("model", ["tiny-t5", "tiny-gpt2"])
def test_fused_gelu_computes_the_same_function(model):
    """gelu_new (Python ops) is swapped for torch's tanh GELU kernel at load: no Python GELU is left, and the
    backbone's outputs are those of the model as transformers builds it, up to float rounding."""
    register_configs()
    cfg = validate(compose_config([f"model={model}"]))
    fused = load_backbone(cfg.model).model
    assert not any(isinstance(m, NewGELUActivation) for m in fused.modules())
    assert any(isinstance(m, GELUTanh) for m in fused.modules())
    torch.manual_seed(0)
    plain = type(fused)(fused.config)
    plain.load_state_dict(fused.state_dict())
    plain.eval()
    assert any(isinstance(m, NewGELUActivation) for m in plain.modules())
    ids = torch.randint(5, 1000, (2, 12))
    extra = {"decoder_input_ids": ids[:, :3]} if fused.config.is_encoder_decoder else {}
    with torch.no_grad():
        torch.testing.assert_close(
            fused(input_ids=ids, **extra).logits, plain(input_ids=ids, **extra).logits, atol=1e-5, rtol=1e-4
        )


def attention_kernels_and_gradient(model: PromptedModel, batch: dict) -> tuple[set[str], set[str], torch.Tensor]:
    """SDPA kernels run by a training step (forward, backward) and by an inference forward, and the prompt's gradient."""
    model.train()
    model.zero_grad()
    with torch.profiler.profile() as training:
        model(batch).loss.backward()
    model.eval()
    with torch.profiler.profile() as inference, torch.no_grad():
        model(batch)

    def kernels(profile):
        return {event.key for event in profile.key_averages() if "scaled_dot_product" in event.key}

    return (
        kernels(training),
        kernels(inference),
        torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]),
    )


@pytest.mark.parametrize("checkpointed", [False, True])
def test_short_half_precision_training_runs_math_attention(checkpointed, monkeypatch):
    """A bf16 backbone on CPU trains short sequences with SDPA's math kernel, also when checkpointed layers recompute
    in backward (flash's backward costs ~20 forwards there); inference keeps flash; the prompt's gradient is flash's
    to bf16 precision."""
    register_configs()
    cfg = validate(compose_config(quick_overrides("tiny-llama", **{"model.dtype": "bfloat16"})))
    pipeline = build_pipeline(cfg)
    batch = next(iter(make_loader(pipeline, "train", training=True)))
    peft_model = attach_prompt(pipeline.backbone, cfg.prompt, pipeline.label_token_ids, head=False, seed=0)
    model = PromptedModel(peft_model, pipeline.backbone.kind, "rank", gradient_checkpointing=checkpointed)
    assert pipeline.backbone.model.dtype == torch.bfloat16
    training, inference, gradient = attention_kernels_and_gradient(model, batch)
    assert "aten::_scaled_dot_product_attention_math" in training
    assert not any("flash" in kernel for kernel in training)
    assert any("flash" in kernel for kernel in inference)
    monkeypatch.setattr("softprompt.backbone.MATH_ATTENTION_MAX_POSITIONS", 0)
    flash_training, _, flash_gradient = attention_kernels_and_gradient(model, batch)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in flash_training
    assert gradient.abs().sum() > 0
    assert (gradient - flash_gradient).norm() < 0.03 * flash_gradient.norm()


def test_rank_scoring_projects_the_last_position_with_one_matrix_product():
    """Evaluation keeps only the last position's logits by gathering it: a strided slice made a bf16 matmul on CPU
    run a batched product over one copy of the output embeddings per row (3.4x slower on smollm2-135m)."""
    register_configs()
    cfg = validate(compose_config(quick_overrides("tiny-llama", **{"model.dtype": "bfloat16"})))
    pipeline = build_pipeline(cfg)
    peft_model = attach_prompt(pipeline.backbone, cfg.prompt, pipeline.label_token_ids, head=False, seed=0)
    model = PromptedModel(peft_model, pipeline.backbone.kind, "rank").eval()
    batch = next(iter(make_loader(pipeline, "validation", training=False)))
    assert "answer_ids" in batch
    with torch.profiler.profile() as profile, torch.no_grad():
        model(batch)
    assert "aten::bmm" not in {event.key for event in profile.key_averages()}


@pytest.mark.slow
def test_compiled_backbone_trains_the_same(train_run):
    """trainer.compile: the backbone's forward and backward run as torch.compile'd graphs (dynamic shapes: batches of
    every length) and the run logs the same losses and dev metric as without."""

    def compiled_frames():
        return torch._dynamo.utils.counters["frames"]["ok"]

    before = compiled_frames()
    runs = {}
    for compiled in (False, True):
        overrides = quick_overrides(
            "tiny-llama", **{"trainer.compile": str(compiled).lower(), "trainer.log_every": "1"}
        )
        run_path, result = train_run(overrides, name=f"compile-{compiled}")
        losses = [json.loads(line)["loss"] for line in (run_path / "train_log.jsonl").read_text().splitlines()]
        runs[compiled] = (losses, result["eval"]["accuracy"])
    assert compiled_frames() > before
    assert len(runs[True][0]) == 4
    torch.testing.assert_close(torch.tensor(runs[True][0]), torch.tensor(runs[False][0]), rtol=1e-4, atol=1e-5)
    assert runs[True][1] == runs[False][1]


def test_grouped_key_value_heads_reach_sdpa_unrepeated():
    """A backbone with grouped key/value heads (4 query heads, 2 key/value heads) trains through `grouped_sdpa` on
    CPU: a padded batch (so a mask) never repeats keys/values per query head, and gives transformers' SDPA loss and
    prompt gradient."""
    register_configs()
    heads = {
        "model.from_config.hidden_size": "32",
        "model.from_config.num_attention_heads": "4",
        "model.from_config.num_key_value_heads": "2",
    }
    cfg = validate(compose_config(quick_overrides("tiny-llama", **heads)))
    pipeline = build_pipeline(cfg)
    batch = next(iter(make_loader(pipeline, "train", training=True)))
    assert (batch["attention_mask"] == 0).any()
    backbone = pipeline.backbone
    assert backbone.model.config._attn_implementation == GROUPED_SDPA
    model = PromptedModel(
        attach_prompt(backbone, cfg.prompt, pipeline.label_token_ids, head=False, seed=0), backbone.kind, "rank"
    ).train()
    results = {}
    for implementation in (GROUPED_SDPA, "sdpa"):
        backbone.model.set_attn_implementation(implementation)
        model.zero_grad()
        with mock.patch.object(sdpa_attention, "repeat_kv", wraps=sdpa_attention.repeat_kv) as repeat_kv:
            loss = model(batch).loss
            loss.backward()
        gradient = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        results[implementation] = (repeat_kv.call_count, loss.detach(), gradient)
    assert results[GROUPED_SDPA][0] == 0
    assert results["sdpa"][0] > 0  # transformers does repeat them: the mask reached attention
    assert results["sdpa"][2].abs().sum() > 0
    torch.testing.assert_close(results[GROUPED_SDPA][1], results["sdpa"][1], atol=1e-5, rtol=0)
    torch.testing.assert_close(results[GROUPED_SDPA][2], results["sdpa"][2], atol=1e-5, rtol=0)


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-t5"])
def test_backbones_without_grouped_heads_keep_sdpa(model):
    register_configs()
    assert load_backbone(validate(compose_config([f"model={model}"])).model).model.config._attn_implementation == "sdpa"
