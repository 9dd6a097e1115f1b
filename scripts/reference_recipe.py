"""The baseline softprompt is measured against: PEFT's documented prompt-tuning setup with the HF Trainer.

    python scripts/reference_recipe.py model=minilm-l6 trainer.max_steps=50   # any softprompt-train overrides

`PromptTuningConfig` + `AutoModelFor...` + `Trainer`, as in PEFT's task guides: the causal-LM and
seq2seq recipes pad every row to `max_length` (here `task.max_length`) and let the model compute its
own loss from logits at every position; the classification recipe pads each batch to its longest
row. Model, rows, answer tokens, batch size, steps, optimiser (AdamW, constant LR), clipping and
precision come from the same softprompt config, so only the training machinery differs. The prompt
can start from given vectors, so both recipes begin at the same point.
"""

from __future__ import annotations

import sys
import tempfile
import time

import torch
from peft import PeftModel, PromptTuningConfig, PromptTuningInit, get_peft_model
from transformers import (
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

from softprompt.backbone import Backbone
from softprompt.batching import IGNORE, Encoded, encode
from softprompt.cli import compose_config
from softprompt.config import TrainConfig, register_configs, validate
from softprompt.pipeline import build_pipeline
from softprompt.soft_prompt import prompt_parameter, task_type


def documented_rows(rows: list[Encoded], backbone: Backbone, scorer: str, max_length: int) -> list[dict]:
    """Rows tokenized the way PEFT's guides do it, from the same token ids softprompt trains on."""
    pad = backbone.tokenizer.pad_token_id
    longest_answer = max((len(row.candidate_ids[row.label]) for row in rows if row.candidate_ids), default=0)
    out = []
    for row in rows:
        if scorer == "head":
            item = {"input_ids": row.input_ids, "attention_mask": [1] * len(row.input_ids), "labels": row.label}
            if row.token_type_ids is not None:
                item["token_type_ids"] = row.token_type_ids
        elif backbone.kind == "decoder":
            # input then answer, left-padded to max_length; the loss only on the answer tokens
            answer = row.candidate_ids[row.label]
            ids = (row.input_ids + answer)[-max_length:]
            labels = ([IGNORE] * len(row.input_ids) + answer)[-max_length:]
            fill = max_length - len(ids)
            item = {
                "input_ids": [pad] * fill + ids,
                "attention_mask": [0] * fill + [1] * len(ids),
                "labels": [IGNORE] * fill + labels,
            }
        else:
            answer = row.candidate_ids[row.label]
            fill = max_length - len(row.input_ids)
            item = {
                "input_ids": row.input_ids + [pad] * fill,
                "attention_mask": [1] * len(row.input_ids) + [0] * fill,
                "labels": answer + [IGNORE] * (longest_answer - len(answer)),
            }
        out.append(item)
    return out


class StepClock(TrainerCallback):
    """Wall-clock time of every optimiser step, so steady-state throughput can be read off."""

    def __init__(self) -> None:
        self.marks: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.marks:
            self.marks.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append(time.perf_counter())


def run_reference(
    cfg: TrainConfig,
    backbone: Backbone,
    rows: list[Encoded],
    scorer: str,
    initial_prompt: torch.Tensor | None = None,
) -> tuple[PeftModel, list[float]]:
    """Train with the documented recipe; returns the tuned PEFT model and the seconds of each step."""
    peft_config = PromptTuningConfig(
        task_type=task_type(backbone.kind, scorer == "head"),
        num_virtual_tokens=cfg.prompt.length,
        token_dim=backbone.width,
        # the encoder input only, as softprompt and the paper do (PEFT's seq2seq default also prompts the decoder)
        num_transformer_submodules=1,
        prompt_tuning_init=PromptTuningInit.RANDOM,
    )
    model = get_peft_model(backbone.model, peft_config)
    if initial_prompt is not None:
        with torch.no_grad():
            prompt_parameter(model).copy_(initial_prompt)
    train_rows = documented_rows(rows, backbone, scorer, cfg.task.max_length)
    collator = DataCollatorWithPadding(backbone.tokenizer) if scorer == "head" else default_data_collator
    clock = StepClock()
    trainer_cfg = cfg.trainer
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=trainer_cfg.batch_size,
            gradient_accumulation_steps=trainer_cfg.grad_accum,
            max_steps=trainer_cfg.max_steps,
            learning_rate=trainer_cfg.lr,
            weight_decay=trainer_cfg.weight_decay,
            lr_scheduler_type="constant",
            optim="adamw_torch",
            max_grad_norm=trainer_cfg.max_grad_norm or 0.0,
            bf16=trainer_cfg.mixed_precision == "bf16",
            fp16=trainer_cfg.mixed_precision == "fp16",
            use_cpu=not torch.cuda.is_available(),
            seed=cfg.seed,
            logging_strategy="no",
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            dataloader_num_workers=trainer_cfg.num_workers,
        )
        Trainer(model=model, args=args, train_dataset=train_rows, data_collator=collator, callbacks=[clock]).train()
    return model, [b - a for a, b in zip(clock.marks, clock.marks[1:])]


def main(overrides: list[str]) -> None:
    register_configs()
    cfg = validate(compose_config(overrides))
    pipeline = build_pipeline(cfg, ("train",))
    rows = encode(
        pipeline.task.examples["train"],
        pipeline.tokenizer,
        pipeline.backbone.kind,
        pipeline.scorer,
        cfg.task.max_length,
    )
    _, steps = run_reference(cfg, pipeline.backbone, rows, pipeline.scorer)
    steady = sorted(steps[1:] or steps)[len(steps[1:] or steps) // 2]
    print(
        f"reference recipe: {len(steps)} steps, median {steady:.3f}s/step, {cfg.trainer.batch_size / steady:.1f} samples/s"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
