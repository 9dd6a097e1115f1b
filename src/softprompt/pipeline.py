"""Pipeline: config to task, backbone and scorer, and the loaders and predictions every command shares.

Check, then load: the config and the model's config file (its architecture, no weights) decide the
model kind, the scorer, and what the method and the precision allow; the task's rows then decide the
answer and context lengths; only then do the weights load, once. A mistake costs seconds, not a model load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator, PartialState
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase
from transformers.trainer_pt_utils import LengthGroupedSampler

from softprompt.backbone import Backbone, infer_kind, load_backbone, load_model_config, load_tokenizer, max_positions
from softprompt.batching import Collator, encode, verbalizer_tokens
from softprompt.config import TrainConfig
from softprompt.errors import ConfigError
from softprompt.method import apply_design, check_method, design_context
from softprompt.metrics import compute_metrics, row_scores
from softprompt.registry import method_spec
from softprompt.scorer import resolve_scorer
from softprompt.task import Task, load_task


@dataclass
class Pipeline:
    cfg: TrainConfig
    task: Task
    tokenizer: PreTrainedTokenizerBase
    backbone: Backbone
    scorer: str
    # verbalizer token ids per label (empty when a task's candidates come from each row)
    label_token_ids: list[list[int]]
    # method=prompt_design: the instruction and demonstrations put before every row, and their token count
    context: str = ""
    context_tokens: int = 0
    # a generation task: the most tokens an answer may take (generation.max_new_tokens, or the longest train target)
    max_new_tokens: int = 0

    @property
    def max_length(self) -> int:
        """Tokens kept of each row's text: task.max_length, plus the prompt-design context."""
        return self.cfg.task.max_length + self.context_tokens

    def load_backbone_copy(self) -> Backbone:
        """An independent copy of the backbone as loaded here (same head size), to run two setups side by side."""
        return load_backbone(self.cfg.model, self.task.num_classes if self.scorer == "head" else None, self.tokenizer)


def check_lengths(cfg: TrainConfig, limit: int | None, answer_tokens: int, context_tokens: int = 0) -> None:
    """Prompt plus input (plus the answer, for decoders) must fit the model's position embeddings."""
    if limit is None:
        return
    prompt = cfg.prompt.length if method_spec(cfg.method.name).has_length else 0
    needed = prompt + cfg.task.max_length + answer_tokens + context_tokens
    if context_tokens and needed > limit:
        raise ConfigError(
            "method.num_demonstrations",
            cfg.method.num_demonstrations,
            f"fewer: the instruction and demonstrations take {context_tokens} tokens, and with task.max_length"
            f"{' + answer tokens' if answer_tokens else ''} that is {needed}, more than the model's {limit} positions",
        )
    if needed > limit and cfg.task.max_length + answer_tokens >= limit:
        # the rows alone leave no room: the prompt is not what is too long
        raise ConfigError(
            "task.max_length",
            cfg.task.max_length,
            f"at most {limit - prompt - answer_tokens}: the model has {limit} positions"
            + (f", {prompt} taken by prompt.length" if prompt else "")
            + (f" and {answer_tokens} by the answer tokens" if answer_tokens else ""),
        )
    if needed > limit:
        raise ConfigError(
            "prompt.length",
            cfg.prompt.length,
            f"prompt.length + task.max_length{' + answer tokens' if answer_tokens else ''} = {needed} "
            f"must be at most {limit}, the model's maximum positions",
        )


def check_precision(cfg: TrainConfig, model_type: str) -> None:
    precision = cfg.trainer.mixed_precision
    if precision == "fp16" and model_type in ("t5", "mt5", "umt5"):
        raise ConfigError(
            "trainer.mixed_precision", precision, "no or bf16 for T5 models (T5 activations overflow fp16's range)"
        )
    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("trainer.mixed_precision", precision, "no or bf16 on a machine without a CUDA GPU")


def build_pipeline(cfg: TrainConfig, splits: tuple[str, ...] = ("train", "validation")) -> Pipeline:
    # what the config and the model's architecture decide
    tokenizer = load_tokenizer(cfg.model)
    model_config = load_model_config(cfg.model, tokenizer)
    kind = cfg.model.kind or infer_kind(model_config)
    scorer = resolve_scorer(cfg.scorer, kind, list(cfg.task.scorers))
    label_token_ids = [] if cfg.task.choices_fields else verbalizer_tokens(tokenizer, kind, Task(cfg.task).verbalizer)
    check_method(cfg, model_config, kind, scorer)
    check_precision(cfg, model_config.model_type)
    # what the rows decide
    task = load_task(cfg.task, splits)
    context = design_context(task, cfg) if method_spec(cfg.method.name).design_context else ""
    task = apply_design(task, context)
    # one token of slack: the context and the row may merge differently where they meet
    context_tokens = len(tokenizer(context, add_special_tokens=False)["input_ids"]) + 1 if context else 0
    answer_tokens = max_new_tokens = 0
    if task.generation:
        max_new_tokens = cfg.generation.max_new_tokens or longest_target(task, tokenizer, kind)
        answer_tokens = max_new_tokens if kind == "decoder" else 0
    elif kind == "decoder" and scorer != "head":
        longest = max((len(c) for e in task.examples[splits[-1]] for c in e.candidates), default=0)
        answer_tokens = max([len(ids) for ids in label_token_ids] + [longest]) + 1
    check_lengths(cfg, max_positions(model_config), answer_tokens, context_tokens)
    backbone = load_backbone(cfg.model, task.num_classes if scorer == "head" else None, tokenizer, model_config)
    return Pipeline(cfg, task, tokenizer, backbone, scorer, label_token_ids, context, context_tokens, max_new_tokens)


def longest_target(task: Task, tokenizer: PreTrainedTokenizerBase, kind: str) -> int:
    """Tokens of the longest target a generation task trains on (its end-of-sequence token included): the
    answers the model learns are no longer, so decoding needs no more (the train split, else the one loaded)."""
    examples = task.examples.get("train") or next(iter(task.examples.values()))
    texts = sorted({reference for example in examples for reference in example.references or []})
    decoder = kind == "decoder"
    lengths = tokenizer([" " + text if decoder else text for text in texts], add_special_tokens=False)["input_ids"]
    return max(len(ids) for ids in lengths) + 1


def make_loader(
    pipeline: Pipeline, split: str, training: bool, seed: int = 0, indices: list[int] | None = None
) -> DataLoader:
    """Training batches are shuffled from a seeded generator and hold the gold answer only; with
    trainer.group_by_length, shuffled groups of 50 optimiser steps are sorted by length, so a batch
    holds rows of similar length (the groups span a whole step, so its rows do not depend on how many
    processes share it).

    Evaluation rows go in order of length, so a batch holds rows of similar length and little
    padding; `predict` puts the results back in split order. `indices`: only these rows of the split.
    """
    cfg = pipeline.cfg
    rows = encode(
        pipeline.task.examples[split], pipeline.tokenizer, pipeline.backbone.kind, pipeline.scorer, pipeline.max_length
    )
    if indices is not None:
        rows = [rows[index] for index in indices]
    generator = torch.Generator().manual_seed(seed) if training else None
    sampler = None
    if training and cfg.trainer.group_by_length:
        step_rows = cfg.trainer.batch_size * cfg.trainer.grad_accum * PartialState().num_processes
        sampler = LengthGroupedSampler(step_rows, lengths=[len(row.input_ids) for row in rows], generator=generator)
    elif not training:
        rows = sorted(rows, key=lambda row: len(row.input_ids))
    return DataLoader(
        rows,
        batch_size=cfg.trainer.batch_size if training else cfg.trainer.eval_batch_size,
        shuffle=training and sampler is None,
        sampler=sampler,
        generator=generator,
        collate_fn=Collator(
            pipeline.backbone.kind,
            pipeline.scorer,
            pipeline.tokenizer.pad_token_id,
            all_candidates=not training,
            written=pipeline.task.generation,
        ),
        num_workers=cfg.trainer.num_workers,
    )


@dataclass
class Predictions:
    predictions: list[int]
    references: list[int]
    # row numbers in the split, so groups (MultiRC questions) and inputs can be looked up
    indices: list[int]
    scores: list[list[float]]


@torch.no_grad()
def predict(model, loader: DataLoader, accelerator: Accelerator, progress: bool = True) -> Predictions:
    """Score every row once across processes (gather_for_metrics drops the padding of the last batch), in split order."""
    was_training = model.training
    model.eval()
    out = Predictions([], [], [], [])
    for batch in tqdm(loader, desc="eval", leave=False, disable=not (progress and accelerator.is_main_process)):
        scores = model(batch).scores
        gathered = accelerator.gather_for_metrics((scores.argmax(-1), batch["labels"], batch["index"], scores))
        for store, values in zip((out.predictions, out.references, out.indices, out.scores), gathered):
            store.extend(values.tolist())
    model.train(was_training)
    order = sorted(range(len(out.indices)), key=out.indices.__getitem__)
    return Predictions(
        *([store[i] for i in order] for store in (out.predictions, out.references, out.indices, out.scores))
    )


def evaluate(
    model, loader: DataLoader, accelerator: Accelerator, task: Task, progress: bool = True
) -> dict[str, float]:
    result = predict(model, loader, accelerator, progress)
    examples = task.examples["validation"]
    groups = [examples[i].group for i in result.indices] if task.cfg.group_field else None
    metrics = compute_metrics(task.cfg.metrics, result.predictions, result.references, groups=groups)
    return {key: round(float(value), 6) for key, value in metrics.items()}


@dataclass
class Decoding:
    """How answers are written: the token budget, beams, stop strings, and the tokenizer that reads them."""

    tokenizer: PreTrainedTokenizerBase
    max_new_tokens: int
    num_beams: int = 1
    stop: tuple[str, ...] = ()

    @classmethod
    def of(cls, pipeline: Pipeline) -> Decoding:
        stop = list(stop_strings(pipeline.cfg.generation.stop))
        separator = pipeline.cfg.method.separator
        if pipeline.context and separator.strip(" ") and separator not in stop:
            # prompt design: after its answer the model goes on with another demonstration; the separator ends it
            stop.append(separator)
        return cls(pipeline.tokenizer, pipeline.max_new_tokens, pipeline.cfg.generation.num_beams, tuple(stop))

    def write(self, model, batch: dict[str, torch.Tensor], prompts: torch.Tensor | None = None) -> list[str]:
        """The answers of a batch as text, each cut before its first stop string."""
        tokenizer = self.tokenizer
        options = {"eos_token_id": tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else {}
        if self.stop:
            options.update(stop_strings=list(self.stop), tokenizer=tokenizer)
        tokens = model.generate(batch, prompts, self.max_new_tokens, self.num_beams, **options)
        texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return [cut_at_stop(text, self.stop) for text in texts]


def stop_strings(stop: list[str]) -> tuple[str, ...]:
    """generation.stop as the strings it means: `\\n` and `\\t` typed on a command line, which Hydra keeps as two
    characters each, are a newline and a tab."""
    return tuple(string.replace("\\n", "\n").replace("\\t", "\t") for string in stop)


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """The text before its first stop string, without surrounding whitespace."""
    ends = [text.find(string) for string in stop if string in text]
    return (text[: min(ends)] if ends else text).strip()


@torch.no_grad()
def write_answers(
    model, loader: DataLoader, accelerator: Accelerator, decoding: Decoding, progress: bool = True
) -> dict[int, str]:
    """Each row's written answer by its index in the split, from every process (the last batch's padding dropped)."""
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    answers: dict[int, str] = {}
    for batch in tqdm(loader, desc="write", leave=False, disable=not (progress and accelerator.is_main_process)):
        written = list(zip(batch["index"].tolist(), decoding.write(unwrapped, batch)))
        answers.update(accelerator.gather_for_metrics(written))
    unwrapped.train(was_training)
    return answers


def score_answers(
    task: Task, answers: dict[int, str], split: str = "validation"
) -> tuple[dict[str, float], list[dict]]:
    """A generation task's metrics over the written answers, and one record per input (in split order): the
    input, its references, the answer and the answer's own scores."""
    examples = task.examples[split]
    indices = sorted(answers)
    texts = [answers[index] for index in indices]
    references = [examples[index].references for index in indices]
    metrics = compute_metrics(task.cfg.metrics, texts, references)
    per_row = row_scores(task.cfg.metrics, texts, references)
    records = [
        {
            "index": index,
            "input": examples[index].text,
            "references": examples[index].references,
            "generated": text,
            "scores": {key: round(float(value), 4) for key, value in scores.items()},
        }
        for index, text, scores in zip(indices, texts, per_row)
    ]
    return {key: round(float(value), 6) for key, value in metrics.items()}, records
