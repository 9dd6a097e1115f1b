"""Prompt bank: many trained prompts on one frozen backbone, served in mixed batches.

PEFT batches several adapters only for LoRA; a soft prompt is just a (length, width) tensor,
so here each row of a batch picks its prompt from a stacked bank, and its own task's
candidates (rank classification) or its own task's head (encoders). One copy of the
backbone serves every prompt.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from peft import PeftModel
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from softprompt import run_dir as records
from softprompt.backbone import Backbone, head_module, load_backbone
from softprompt.batching import Encoded, encode
from softprompt.config import TrainConfig, validate
from softprompt.errors import UserError
from softprompt.pipeline import cut_at_stop, longest_target, stop_strings
from softprompt.registry import METHODS, method_spec
from softprompt.scorer import PromptedModel, resolve_scorer
from softprompt.soft_prompt import PROMPT_KEY, load_prompt_file, peft_quietly
from softprompt.task import Example, Task, load_task

HEAD_PREFIX = "base_model."


@dataclass
class BankEntry:
    name: str
    run_dir: Path
    cfg: TrainConfig
    task: Task
    prompt: torch.Tensor  # (length, width)
    head_state: dict[str, torch.Tensor]


def run_config(run_dir: Path) -> TrainConfig:
    """The resolved config a run was trained with (its .hydra/config.yaml)."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory: it has no .hydra/config.yaml")
    try:
        saved = OmegaConf.load(path)
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException) as error:
        raise UserError(
            f"{path} cannot be read ({type(error).__name__}: {' '.join(str(error).split())}): the run's config is "
            "damaged; give another run, or train this one again"
        ) from None
    try:
        return validate(OmegaConf.merge(OmegaConf.structured(TrainConfig), saved))
    except OmegaConfBaseException as error:
        raise UserError(f"{path}: {' '.join(str(error).split())} (a config this version cannot read)") from None


def _prompt_weights(name: str, run_dir: Path) -> dict[str, torch.Tensor]:
    """The run's saved prompt (and head), refused in one line when missing or damaged."""
    path = run_dir / "prompt" / "adapter_model.safetensors"
    try:
        weights = load_file(str(path)) if path.is_file() else {}
    except (OSError, SafetensorError) as error:
        raise UserError(
            f"prompt {name!r}: {path} is damaged ({error}); train the run again, or give another run"
        ) from None
    if PROMPT_KEY not in weights:
        raise UserError(f"prompt {name!r}: {run_dir} holds no trained prompt (prompt/adapter_model.safetensors)")
    return weights


def _backbone_identity(cfg: TrainConfig) -> str:
    model = cfg.model
    return json.dumps(
        {
            "name_or_path": model.name_or_path,
            "from_config": model.from_config,
            "tokenizer": model.tokenizer,
            "revision": model.revision,
        },
        sort_keys=True,
        default=str,
    )


def load_entry(name: str, path: str | Path) -> BankEntry:
    """One prompt from a run directory: its prompt tensor, its head (encoders) and its task."""
    run_dir = Path(path).expanduser()
    if run_dir.name == "prompt":
        run_dir = run_dir.parent
    cfg = run_config(run_dir)
    if not method_spec(cfg.method.name).bank:
        served = ", ".join(method for method, spec in METHODS.items() if spec.bank)
        raise UserError(
            f"prompt {name!r}: {run_dir} was trained with method={cfg.method.name}; a prompt bank serves {served} runs"
        )
    weights = _prompt_weights(name, run_dir)
    head_state = {key[len(HEAD_PREFIX) :]: value for key, value in weights.items() if key.startswith(HEAD_PREFIX)}
    return BankEntry(name, run_dir, cfg, Task(cfg.task), load_prompt_file(run_dir), head_state)


def _head_for(template: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of the head module carrying one task's weights (its class count may differ)."""
    # PEFT wraps the trained head; copy the plain module underneath
    head = copy.deepcopy(getattr(template, "original_module", template))
    prefix = next(iter(state)).split(".")[0] + "."
    for key, value in state.items():
        owner = head
        parts = key[len(prefix) :].split(".")
        for part in parts[:-1]:
            owner = getattr(owner, part)
        setattr(owner, parts[-1], nn.Parameter(value.clone(), requires_grad=False))
        if isinstance(owner, nn.Linear) and parts[-1] == "weight":
            owner.out_features, owner.in_features = value.shape
    return head.eval()


class PromptBank:
    """Several prompts sharing one frozen backbone; rows name their prompt by its index in `names`."""

    def __init__(self, entries: list[BankEntry]):
        if not entries:
            raise UserError("a prompt bank needs at least one prompt (NAME=RUN_DIR)")
        self.entries = entries
        self.names = [entry.name for entry in entries]
        first = entries[0]
        for entry in entries[1:]:
            if _backbone_identity(entry.cfg) != _backbone_identity(first.cfg):
                raise UserError(
                    f"prompts must share one backbone: {first.name!r} uses {first.cfg.model.name!r}, "
                    f"{entry.name!r} uses {entry.cfg.model.name!r}"
                )
        lengths = {entry.name: entry.prompt.shape[0] for entry in entries}
        if len(set(lengths.values())) > 1:
            raise UserError(
                "prompts in one bank must share a length: " + ", ".join(f"{k}={v}" for k, v in lengths.items())
            )
        self.cfg = first.cfg
        scorer_of = lambda entry, kind: resolve_scorer(entry.cfg.scorer, kind, list(entry.cfg.task.scorers))  # noqa: E731
        head_labels = first.task.num_classes if first.head_state else None
        self.backbone: Backbone = load_backbone(self.cfg.model, head_labels)
        scorers = {scorer_of(entry, self.backbone.kind) for entry in entries}
        if len(scorers) > 1:
            raise UserError(f"prompts in one bank must share a scorer; these use {', '.join(sorted(scorers))}")
        self.scorer = scorers.pop()
        if len({entry.task.generation for entry in entries}) > 1:
            raise UserError("prompts in one bank must all write answers (generation tasks) or all choose labels")
        for entry in entries:
            if entry.prompt.shape[1] != self.backbone.width:
                raise UserError(
                    f"prompt {entry.name!r} has width {entry.prompt.shape[1]}; the backbone {self.backbone.name!r} has width {self.backbone.width}"
                )
        with peft_quietly():
            peft_model = PeftModel.from_pretrained(self.backbone.model, first.run_dir / "prompt")
        self.model = PromptedModel(peft_model, self.backbone.kind, self.scorer, self.cfg.scorer.reduction).eval()
        self.prompts = torch.stack([entry.prompt for entry in entries])
        self.heads = (
            [_head_for(head_module(peft_model.base_model), entry.head_state) for entry in entries]
            if self.scorer == "head"
            else None
        )
        self.budgets = [self.answer_budget(entry) for entry in entries] if self.generation else []

    @property
    def generation(self) -> bool:
        return self.entries[0].task.generation

    @classmethod
    def load(cls, sources: dict[str, str | Path]) -> PromptBank:
        return cls([load_entry(name, path) for name, path in sources.items()])

    def index(self, name: str) -> int:
        if name not in self.names:
            raise UserError(f"unknown prompt {name!r}: the bank holds {', '.join(self.names)}")
        return self.names.index(name)

    def encode(self, examples: list[Example], prompt_indices: list[int]) -> list[Encoded]:
        """Tokenize rows for their prompts' tasks; each row remembers its prompt and its position."""
        encoded: list[Encoded | None] = [None] * len(examples)
        for index in sorted(set(prompt_indices)):
            positions = [i for i, p in enumerate(prompt_indices) if p == index]
            entry = self.entries[index]
            rows = encode(
                [examples[i] for i in positions],
                self.backbone.tokenizer,
                self.backbone.kind,
                self.scorer,
                entry.cfg.task.max_length,
            )
            for position, row in zip(positions, rows):
                row.index, row.prompt = position, index
                encoded[position] = row
        return encoded

    @torch.no_grad()
    def score(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(rows, choices) log-probabilities, every row with its own prompt, in one forward pass."""
        prompts = self.prompts[batch["prompt_index"]]
        return self.model(batch, prompts=prompts, heads=self.heads).scores

    def answer_budget(self, entry: BankEntry) -> int:
        """The most tokens a prompt's answers take: its generation.max_new_tokens, else what its run recorded
        (task.json), else its task's longest train target."""
        if entry.cfg.generation.max_new_tokens:
            return entry.cfg.generation.max_new_tokens
        path = entry.run_dir / records.TASK
        recorded = records.read_json(path).get("max_new_tokens") if path.is_file() else None
        if recorded:
            return int(recorded)
        task = load_task(entry.cfg.task, ("train",))
        return longest_target(task, self.backbone.tokenizer, self.backbone.kind)

    @torch.no_grad()
    def write(self, batch: dict[str, torch.Tensor]) -> list[str]:
        """Every row's answer under its own prompt, in one batched, cached decoding: the batch writes up to the
        largest budget, and each row is cut to its own prompt's budget and stop strings (passed to the decoder
        itself when every prompt in the batch shares them)."""
        tokenizer = self.backbone.tokenizer
        used = batch["prompt_index"].tolist()
        stops = {stop_strings(self.entries[index].cfg.generation.stop) for index in used}
        # one search serves the batch: the widest of its prompts' generation.num_beams
        beams = {self.entries[index].cfg.generation.num_beams for index in used}
        options = {"eos_token_id": tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else {}
        if len(stops) == 1 and next(iter(stops)):
            options.update(stop_strings=list(next(iter(stops))), tokenizer=tokenizer)
        tokens = self.model.generate(
            batch,
            self.prompts[batch["prompt_index"]],
            max(self.budgets[index] for index in used),
            max(beams),
            **options,
        )
        return [
            cut_at_stop(
                tokenizer.decode(row[: self.budgets[index]], skip_special_tokens=True),
                stop_strings(self.entries[index].cfg.generation.stop),
            )
            for row, index in zip(tokens, used)
        ]
