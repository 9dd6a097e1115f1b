"""Method: what a run trains on top of the backbone, so every method shares tasks, scorers, loop and report.

Each method is one spec in registry.py; this module builds and checks what the spec describes:
- `prompt_tuning` (the default): the soft prompt of soft_prompt.py, PEFT's PromptTuningConfig;
- `model_tuning`: every backbone weight (no adapter), refused when it will not fit in memory;
- `prompt_design`: nothing; an optional instruction and k solved train rows go before each row's text;
- `prefix_tuning`: PEFT's PrefixTuningConfig, trainable keys and values in every attention layer;
- `p_tuning`: PEFT's PromptEncoderConfig, virtual tokens through an MLP (or LSTM) prompt encoder;
- `lora`: PEFT's LoraConfig, low-rank updates of the attention projections.

Encoders keep a trained classification head under every method but prompt design, which cannot
train one: prompt design needs a language model and rank classification (or generation).

Where PEFT would allocate parameters that never receive a gradient we ask it not to, as for the
soft prompt: prefix tuning and p-tuning on encoder-decoders use one copy
(`num_transformer_submodules=1`). Prefix tuning on T5 then puts its prefix on the decoder's
self-attention (the layers PEFT's seq2seq prefix reaches too); the encoder gets none.
"""

from __future__ import annotations

import inspect
import operator
import os
import random
from dataclasses import replace
from pathlib import Path

import torch
from peft import get_peft_model
from torch import nn
from transformers import AutoModel, PretrainedConfig

from softprompt import sharding
from softprompt.backbone import Backbone, _is_head, model_class
from softprompt.config import TrainConfig
from softprompt.distributed import world_size
from softprompt.errors import ConfigError, UserError
from softprompt.registry import method_spec
from softprompt.soft_prompt import attach_prompt, peft_quietly, task_type, train_in_fp32
from softprompt.task import Task

RENDERED_PROMPTS = "rendered_prompts.txt"
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 1024**3


def trains(cfg: TrainConfig) -> bool:
    return method_spec(cfg.method.name).trains


def check_method(cfg: TrainConfig, model_config: PretrainedConfig, kind: str, scorer: str) -> None:
    """What the chosen method cannot do with this model and scorer, before any weights load."""
    method = cfg.method.name
    spec = method_spec(method)
    if scorer == "head" and not spec.head:
        raise ConfigError(
            "method.name",
            method,
            f"a method that trains for the encoder {cfg.model.name!r}: {spec.label} scores answers with a language "
            "model (rank or generate), and an encoder's classification head would be untrained",
        )
    if scorer in spec.refused_scorers:
        raise ConfigError("scorer.name", scorer, spec.refused_scorers[scorer])
    if spec.past_key_values:
        try:
            mapped = AutoModel._model_mapping[type(model_config)]
        except (KeyError, AttributeError):
            mapped = None
        if mapped is not None and not _takes_past_key_values(mapped):
            raise ConfigError(
                "method.name",
                method,
                f"a method other than {method} for {cfg.model.name!r}: {mapped.__name__}'s attention takes no past key values",
            )
    if spec.memory_check and not cfg.method.ignore_memory_check:
        check_memory(cfg, model_config, kind, scorer)


def _takes_past_key_values(cls) -> bool:
    return "past_key_values" in inspect.signature(cls.forward).parameters


def parameter_shapes(cfg: TrainConfig, model_config: PretrainedConfig, kind: str, scorer: str) -> list[torch.Size]:
    """The shapes of every parameter of the model as it would load, built on the meta device (no memory)."""
    config = model_config.__class__.from_dict(model_config.to_dict())
    if scorer == "head":
        config.num_labels = 2
    with torch.device("meta"):
        model = model_class(kind, 2 if scorer == "head" else None).from_config(config)
    return [p.shape for p in model.parameters()]


def optimizer_state_bytes(shapes: list[torch.Size], optimizer: str, weight_bytes: int) -> int:
    """AdamW keeps two moments per weight (in the weight's dtype); Adafactor (no momentum) keeps row and
    column second moments of every matrix and a full one of every vector, in fp32."""
    if optimizer == "adamw":
        return sum(2 * weight_bytes * shape.numel() for shape in shapes)
    return sum(
        4 * ((shape[:-1].numel() + shape[:-2].numel() * shape[-1]) if len(shape) >= 2 else shape.numel())
        for shape in shapes
    )


def available_memory() -> tuple[int, str]:
    """Free bytes where the weights will live: the current CUDA device, else this machine's available RAM."""
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return free, f"free on {torch.cuda.get_device_name()}"
    try:
        import psutil

        free = psutil.virtual_memory().available
    except ImportError:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    # several processes on one machine without GPUs each hold a copy
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return free // processes, "of CPU memory available" + (
        f" per process ({processes} processes)" if processes > 1 else ""
    )


def memory_estimate(cfg: TrainConfig, model_config: PretrainedConfig, kind: str, scorer: str) -> tuple[int, int, str]:
    """(bytes, parameters, how the bytes were counted) for training every weight: weights + gradients + optimiser."""
    shapes = parameter_shapes(cfg, model_config, kind, scorer)
    count = sum(shape.numel() for shape in shapes)
    weight = BYTES[cfg.model.dtype]
    states = optimizer_state_bytes(shapes, cfg.trainer.optimizer, weight)
    total = count * 2 * weight + states
    how = f"{count:,} parameters: {cfg.model.dtype} weights {weight} + gradients {weight} + {cfg.trainer.optimizer} states {states / count:.2g} bytes each"
    return total, count, how


def check_memory(
    cfg: TrainConfig, model_config: PretrainedConfig, kind: str, scorer: str, available: tuple[int, str] | None = None
) -> None:
    needed, _, how = memory_estimate(cfg, model_config, kind, scorer)
    shards = world_size() if sharding.mode(cfg.trainer) == sharding.FSDP else 1
    if shards > 1:
        # sharded, each process holds its 1/N of the weights, gradients and optimiser state
        needed, how = needed // shards, f"{how}; 1/{shards} of it per process, sharded"
    free, where = available or available_memory()
    if needed > free:
        raise UserError(
            f"method={cfg.method.name} of {cfg.model.name} needs about {needed / GIB:,.1f} GiB ({how}), not counting activations, "
            f"but {free / GIB:,.1f} GiB is {where}: use a smaller model, model.dtype=bfloat16, trainer.optimizer=adafactor, "
            "trainer.sharding=fsdp across several processes, "
            "or set method.ignore_memory_check=true to try anyway"
        )


def build_model(
    backbone: Backbone, cfg: TrainConfig, label_token_ids: list[list[int]], head: bool, seed: int
) -> nn.Module:
    """The model to train: the backbone behind the method's PEFT adapter, or the backbone itself."""
    spec = method_spec(cfg.method.name)
    if spec.soft_prompt:
        return attach_prompt(backbone, cfg.prompt, label_token_ids, head=head, seed=seed)
    if spec.adapter is None:
        backbone.model.requires_grad_(spec.trains_backbone)
        return backbone.model
    peft_config = spec.adapter(cfg, backbone.width, task_type(backbone.kind, head), backbone.model.config.model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            with peft_quietly():
                model = get_peft_model(backbone.model, peft_config)
        except ValueError as error:
            if spec.adapter_key is not None:
                raise ConfigError(
                    spec.adapter_key,
                    operator.attrgetter(spec.adapter_key)(cfg),
                    f"module names of {backbone.name} ({str(error).splitlines()[0]})",
                ) from None
            raise
    train_in_fp32(model, backbone, head)
    return model


def parameter_part(name: str) -> str:
    """The part of a method's model a parameter belongs to: prompt (or prefix with its encoder), adapter, head or
    backbone; what is counted apart is also what may train at its own learning rate."""
    if "prompt_encoder" in name:
        return "prompt"
    if "lora_" in name:
        return "adapter"
    if "modules_to_save" in name or _is_head(name.removeprefix("base_model.model.")):
        return "head"
    return "backbone"


def parameter_counts(model: nn.Module, method: str, backbone_params: int) -> dict:
    """Trainable parameters by part (prompt or prefix with its encoder, LoRA adapter, backbone weights,
    head), their total, and the total as a fraction of the backbone's parameters.

    Only model tuning may train backbone weights; anything else with a trainable backbone weight is a bug.
    """
    parts = {"prompt": 0, "adapter": 0, "backbone": 0, "head": 0}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            parts[parameter_part(name)] += parameter.numel()
    if parts["backbone"] and not method_spec(method).trains_backbone:
        wrong = [
            n
            for n, p in model.named_parameters()
            if p.requires_grad and "prompt_encoder" not in n and "lora_" not in n and "modules_to_save" not in n
        ]
        raise UserError(
            f"backbone parameters are trainable but must be frozen under method={method}: {', '.join(wrong[:3])}"
        )
    total = sum(parts.values())
    return {**parts, "total": total, "fraction": round(total / backbone_params, 10) if backbone_params else None}


# --- prompt design -------------------------------------------------------------------------------


def design_context(task: Task, cfg: TrainConfig) -> str:
    """The text before every row: the instruction, then k solved train rows, each ended by the separator."""
    method = cfg.method
    parts = [method.instruction] if method.instruction else []
    if method.num_demonstrations:
        train = task.examples.get("train", [])
        if len(train) < method.num_demonstrations:
            raise ConfigError(
                "method.num_demonstrations",
                method.num_demonstrations,
                f"at most {len(train)}, the train rows of {task.name}",
            )
        picks = random.Random(method.demonstration_seed).sample(range(len(train)), method.num_demonstrations)
        for index in picks:
            example = train[index]
            parts.append(f"{example.text} {example.candidates[example.label]}")
    return "".join(part + method.separator for part in parts)


def apply_design(task: Task, context: str) -> Task:
    """A copy of the task whose scored rows start with the prompt-design context (train rows are what
    demonstrations are drawn from, and stay bare); the task itself is left as it is."""
    if not context:
        return task
    examples = {
        split: rows if split == "train" else [replace(example, text=context + example.text) for example in rows]
        for split, rows in task.examples.items()
    }
    return replace(task, examples=examples)


def write_rendered_prompts(path: Path, task: Task, tokenizer, max_length: int, rows: int, context: str) -> None:
    """The exact text the model reads for the first validation rows, with their candidates and gold answer."""
    examples = task.examples["validation"][:rows]
    scoring = (
        "the model writes its answer after the text, scored against the references"
        if task.generation
        else "each candidate answer is scored after the text (rank classification)"
    )
    lines = [
        f"# prompt design on {task.name}: instruction and demonstrations ({len(tokenizer(context, add_special_tokens=False)['input_ids'])} tokens) "
        f"then the row's template; {scoring}",
        "",
    ]
    for number, example in enumerate(examples, start=1):
        tokens = len(tokenizer(example.text)["input_ids"])
        note = f", cut to {max_length} tokens (task.max_length + the context)" if tokens > max_length else ""
        answers = (
            f"references: {' | '.join(example.references)}"
            if task.generation
            else f"candidates: {' | '.join(example.candidates)}; gold: {example.candidates[example.label]}"
        )
        lines += [f"===== validation row {number}: {tokens} tokens{note}; {answers} =====", example.text, ""]
    path.write_text("\n".join(lines), encoding="utf-8")
