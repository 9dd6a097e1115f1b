"""Each initialisation produces exactly what it promises, and the prompt is counted as length x width."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from helpers import quick_overrides
from softprompt.backbone import load_backbone
from softprompt.cli import compose_config
from softprompt.config import ModelConfig, PromptConfig, validate
from softprompt.errors import ConfigError
from softprompt.method import parameter_counts
from softprompt.pipeline import build_pipeline
from softprompt.soft_prompt import (
    PROMPT_KEY,
    attach_prompt,
    embed_tokens,
    frequency_ranked_ids,
    initial_prompt,
)


@pytest.fixture(scope="module")
def pipeline():
    return build_pipeline(validate(compose_config(quick_overrides("tiny-llama"))))


def start(pipeline, seed=0, **prompt):
    cfg = PromptConfig(**{"length": 6, **prompt})
    return initial_prompt(cfg, pipeline.backbone, pipeline.label_token_ids, torch.Generator().manual_seed(seed))


def vocab_rows(pipeline, ids):
    return embed_tokens(pipeline.backbone.model.get_input_embeddings(), ids)


def rows_of(matrix, candidates):
    """For each row of `matrix`, the index of the identical row in `candidates` (or -1)."""
    equal = (matrix[:, None, :] == candidates[None, :, :]).all(-1)
    return torch.where(equal.any(1), equal.float().argmax(1), torch.tensor(-1))


def test_random_uniform_bounds_and_spread(pipeline):
    weights = start(pipeline, length=50, init="random_uniform", init_range=0.5)
    assert weights.shape == (50, pipeline.backbone.width)
    assert weights.min() >= -0.5 and weights.max() <= 0.5
    assert weights.min() < -0.45 and weights.max() > 0.45  # fills the interval, not N(0, 1)
    assert abs(weights.mean()) < 0.05
    narrow = start(pipeline, length=50, init="random_uniform", init_range=0.1)
    assert narrow.abs().max() <= 0.1


def test_sampled_vocab_rows_come_from_the_top_k(pipeline):
    top = frequency_ranked_ids(pipeline.tokenizer, 50)
    assert len(top) == 50
    assert not set(top.tolist()) & set(pipeline.tokenizer.all_special_ids)
    weights = start(pipeline, length=40, init="sampled_vocab", vocab_top_k=50)
    found = rows_of(weights, vocab_rows(pipeline, top))
    assert (found >= 0).all(), "every prompt row is the embedding of one of the 50 most frequent tokens"
    assert not torch.equal(weights, start(pipeline, seed=1, length=40, init="sampled_vocab", vocab_top_k=50))


def test_class_labels_are_label_embeddings_then_vocab(pipeline):
    weights = start(pipeline, length=6, init="class_labels", vocab_top_k=100)
    for position, ids in enumerate(pipeline.label_token_ids):
        expected = vocab_rows(pipeline, ids).mean(0)
        assert torch.allclose(weights[position], expected)
    rest = weights[len(pipeline.label_token_ids) :]
    assert (rows_of(rest, vocab_rows(pipeline, frequency_ranked_ids(pipeline.tokenizer, 100))) >= 0).all()


def test_class_labels_average_multi_token_words(pipeline):
    ids = pipeline.tokenizer(" unbelievably", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    weights = initial_prompt(PromptConfig(length=1, init="class_labels"), pipeline.backbone, [ids], torch.Generator())
    assert torch.allclose(weights[0], vocab_rows(pipeline, ids).mean(0))


def test_text_repeats_or_cuts(pipeline):
    ids = pipeline.tokenizer("good movie", add_special_tokens=False)["input_ids"]
    weights = start(pipeline, length=5, init="text", text="good movie")
    expected = vocab_rows(pipeline, (ids * 5)[:5])
    assert torch.equal(weights, expected)
    assert torch.equal(start(pipeline, length=1, init="text", text="good movie"), expected[:1])


def test_from_file_loads_and_checks_width(pipeline, tmp_path):
    saved = torch.randn(6, pipeline.backbone.width)
    (tmp_path / "prompt").mkdir()
    save_file({PROMPT_KEY: saved}, str(tmp_path / "prompt" / "adapter_model.safetensors"))
    assert torch.equal(start(pipeline, init="from_file", path=str(tmp_path)), saved)
    save_file({PROMPT_KEY: torch.randn(6, 7)}, str(tmp_path / "prompt" / "adapter_model.safetensors"))
    with pytest.raises(ConfigError, match=f"a prompt of width {pipeline.backbone.width}"):
        start(pipeline, init="from_file", path=str(tmp_path))


def test_attached_prompt_holds_the_initial_vectors(pipeline):
    cfg = PromptConfig(length=6, init="random_uniform")
    expected = initial_prompt(cfg, pipeline.backbone, pipeline.label_token_ids, torch.Generator().manual_seed(3))
    peft_model = attach_prompt(pipeline.backbone, cfg, pipeline.label_token_ids, head=False, seed=3)
    assert torch.equal(peft_model.prompt_encoder["default"].embedding.weight.detach(), expected)
    assert peft_model.prompt_encoder["default"].embedding.weight.dtype == torch.float32


def test_prompt_and_head_learn_in_fp32_under_a_bf16_backbone():
    """With model.dtype=bfloat16 the backbone stays bf16 while prompt and head train in fp32, so a step of 1e-5,
    below bf16's resolution at the head's weights, still moves them."""
    cfg = validate(compose_config(quick_overrides("tiny-bert", **{"model.dtype": "bfloat16"})))
    pipeline = build_pipeline(cfg)
    peft_model = attach_prompt(pipeline.backbone, cfg.prompt, pipeline.label_token_ids, head=True, seed=0)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert {p.dtype for p in trainable} == {torch.float32}
    assert pipeline.backbone.model.get_input_embeddings().weight.dtype == torch.bfloat16
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.0)
    ids = torch.randint(5, 500, (4, 10))
    logits = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert logits.dtype == torch.float32
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 0, 1])).backward()
    optimizer.step()
    # (a few prompt entries get exactly zero gradient through the bf16 backbone)
    assert all((p.detach() != b).float().mean() > 0.5 for p, b in zip(trainable, before))


def test_t5_xxl_width_prompt_of_100_counts_409600():
    """The paper's T5-XXL figure: one copy of the prompt, on the encoder only (PEFT's default doubles it)."""
    cfg = ModelConfig(
        name="t5-xxl-width",
        from_config={
            "model_type": "t5",
            "d_model": 4096,
            "d_kv": 4,
            "d_ff": 8,
            "num_layers": 1,
            "num_heads": 1,
            "vocab_size": 64,
        },
        tokenizer="minilm-l6",
    )
    backbone = load_backbone(cfg)
    peft_model = attach_prompt(backbone, PromptConfig(length=100, init="random_uniform"), [], head=False, seed=0)
    counts = parameter_counts(peft_model, "prompt_tuning", backbone.num_params)
    assert (counts["prompt"], counts["head"], counts["total"]) == (409_600, 0, 409_600)
