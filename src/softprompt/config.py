"""Config schemas: Hydra structured configs, checked before any model or data loads.

The YAML files in `conf/` fill these dataclasses and own the default values: a field's default here is
MISSING, or exactly what the YAML files give it (tests/test_config.py composes every file and checks).
The defaults left here fill keys that configs saved by older versions lack. Hydra rejects unknown keys
and wrong types on its own, and `validate` adds the rules types cannot express (ranges, allowed names).
"""

from __future__ import annotations

import codecs
import math
from dataclasses import dataclass, field, is_dataclass
from typing import Any, Optional, Union, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from softprompt.errors import ConfigError, UserError
from softprompt.metrics import METRIC_KEYS, METRICS, TEXT_METRICS
from softprompt.registry import DEFAULT_METHOD, METHODS, method_spec
from softprompt.search import register_sweeper

INITS = ("random_uniform", "sampled_vocab", "class_labels", "text", "from_file")
SCORERS = ("auto", "head", "rank", "generate")
KINDS = ("encoder", "decoder", "encoder_decoder")
OPTIMIZERS = ("adafactor", "adamw")
SCHEDULERS = ("constant", "linear", "cosine")
PRECISIONS = ("no", "bf16", "fp16")
DTYPES = ("float32", "bfloat16", "float16")
REDUCTIONS = ("sum", "mean")
RESUME_MODES = ("auto", "never", "must")
SHARDINGS = ("none", "fsdp")
SOURCES = ("files", "hub")
P_TUNING_ENCODERS = ("MLP", "LSTM")


@dataclass
class ModelConfig:
    """A frozen backbone: an offline zoo entry, a hub id, a local folder, or a random model built from a config."""

    name: str = MISSING
    # zoo name, hub id or local directory; null together with `from_config` builds a random model
    name_or_path: Optional[str] = None
    # config of a randomly initialised model: `model_type` plus any overrides (hidden_size, ...)
    from_config: Optional[dict[str, Any]] = None
    # where the tokenizer comes from when it differs from name_or_path (required with from_config)
    tokenizer: Optional[str] = None
    # encoder | decoder | encoder_decoder; null infers it from the model config
    kind: Optional[str] = None
    dtype: str = "float32"
    # parameter count used as the x-axis of size plots; null measures it at load time
    num_params: Optional[int] = None
    revision: Optional[str] = None
    trust_remote_code: bool = False


@dataclass
class TaskConfig:
    """A labelled text task: where rows come from, how a row becomes text, how labels become words."""

    name: str = MISSING
    # a generator shipped with the package (the embedded default task)
    builtin: Optional[str] = None
    builtin_size: dict[str, int] = field(default_factory=dict)
    # where rows come from: files (task.data_dir / data_files, or task.builtin) | hub (task.hub_dataset, via datasets)
    source: str = "files"
    # hub dataset: [path] or [path, config name]
    hub_dataset: Optional[list[str]] = None
    # with task.source=hub: our split name -> the hub's split name (null: task.splits); train and validation on the
    # hub means no dev split is carved from train
    hub_splits: Optional[dict[str, str]] = None
    # with task.source=hub: our field name -> the hub's column, so one template serves both sources; a dotted name
    # reaches into a nested column (SQuAD's answers.text)
    hub_columns: dict[str, str] = field(default_factory=dict)
    # folder holding the official files (SuperGLUE *.jsonl, GLUE *.tsv)
    data_dir: Optional[str] = None
    # split name -> file, for the user's own CSV / TSV / JSON lines
    data_files: dict[str, Optional[str]] = field(default_factory=dict)
    # file format: jsonl | csv | tsv | superglue_jsonl | glue_tsv | squad_json; null guesses from the file extension
    format: Optional[str] = None
    # text encoding of the task's files (Python's codec names: utf-8, latin-1, cp1252, ...)
    encoding: str = "utf-8"
    # our split name -> name in the source (file stem or hub split)
    splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "validation": "validation"})
    # carve a dev split from train when the source has none: fraction of train, fixed seed
    dev_from_train: Optional[float] = None
    dev_seed: int = 0
    # carve that dev split by whole groups of this field (SQuAD's article titles), so no group is in both splits
    carve_by: Optional[str] = None
    text_fields: list[str] = field(default_factory=lambda: ["text"])
    label_field: str = "label"
    template: str = "{text}"
    # label values as they appear in the data, in class-index order
    labels: list[Any] = field(default_factory=list)
    # one word (or phrase) per label; empty means the label names themselves
    verbalizer: list[str] = field(default_factory=list)
    # field holding candidate answer texts per row (COPA's choices); overrides the verbalizer
    choices_fields: list[str] = field(default_factory=list)
    # field grouping rows into questions (MultiRC); a generation task scores each group as one input
    group_field: Optional[str] = None
    # a generation task: the field holding the text to write (a string, or a list of reference texts); it
    # replaces labels and verbalizer. Rows with the same rendered input are scored once, against all their references
    target_field: Optional[str] = None
    metrics: list[str] = field(default_factory=lambda: ["accuracy"])
    main_metric: str = "accuracy"
    scorers: list[str] = field(default_factory=lambda: ["head", "rank", "generate"])
    max_length: int = 128
    max_train_rows: Optional[int] = None
    max_eval_rows: Optional[int] = None
    # evaluate during training on this many validation inputs (a fixed sample, seeded by dev_seed) to pick the
    # best step, then the best prompt on the whole split; null: every evaluation reads the whole split
    eval_rows: Optional[int] = None


@dataclass
class PromptConfig:
    """The soft prompt: its length and how its vectors start."""

    length: int = 20
    init: str = "class_labels"
    # random_uniform: U[-init_range, init_range]
    init_range: float = 0.5
    # sampled_vocab and class_labels' leftover positions: rows drawn from the k most frequent tokens
    vocab_top_k: int = 5000
    # init=text: the string whose token embeddings start the prompt
    text: Optional[str] = None
    # init=from_file: a run's prompt/ folder or a PEFT adapter folder
    path: Optional[str] = None


@dataclass
class MethodConfig:
    """What is trained: the soft prompt (the default), all weights, nothing, or another PEFT method.

    prefix_tuning and p_tuning take their number of virtual tokens from prompt.length; every other
    knob of a method is here (a key that does not apply to the chosen method is ignored).
    """

    # a method registered in registry.py (a config saved before methods existed names none: prompt tuning)
    name: str = DEFAULT_METHOD
    # prefix_tuning: reparameterise the prefix through a 2-layer MLP (Li & Liang 2021) of encoder_hidden_size
    prefix_projection: bool = False
    # p_tuning's prompt encoder (and prefix_tuning's projection) hidden size; null: the model width
    encoder_hidden_size: Optional[int] = None
    # p_tuning: MLP | LSTM
    encoder_reparameterization_type: str = "MLP"
    # p_tuning LSTM layers (PEFT's MLP always has 2 hidden layers)
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    # lora: rank, scaling alpha (scale = alpha / r), dropout, and the module names to adapt (null: PEFT's default
    # for the architecture, e.g. query/value projections)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: Optional[list[str]] = None
    # prompt_design: a hand-written instruction put first, and k demonstrations (solved train rows) after it
    instruction: Optional[str] = None
    num_demonstrations: int = 0
    demonstration_seed: int = 0
    separator: str = "\n\n"
    # prompt_design: how many validation rows' rendered prompts go to rendered_prompts.txt
    show_rows: int = 3
    # model_tuning: refuse a run whose weights, gradients and optimiser states would not fit in memory
    ignore_memory_check: bool = False


@dataclass
class ScorerConfig:
    """How a label is predicted: a classification head, rank classification, or generation."""

    name: str = "auto"
    # rank classification: a candidate's score is the sum or the mean of its token log-probabilities
    reduction: str = "sum"
    # read in configs saved by earlier versions; the generate scorer writes as many tokens as the longest answer
    max_new_tokens: int = 8


@dataclass
class GenerationConfig:
    """How a generation task's answers are written: batched, KV-cached decoding after the soft prompt."""

    # null: as many as the longest train target has (plus its end-of-sequence token)
    max_new_tokens: Optional[int] = None
    # 1: greedy; more: beam search
    num_beams: int = 1
    # strings that end an answer (it is cut before them), besides the end-of-sequence token
    stop: list[str] = field(default_factory=list)


@dataclass
class TrainerConfig:
    """The Accelerate training loop; the defaults are conf/trainer/default.yaml's."""

    optimizer: str = "adamw"
    lr: float = 0.01
    weight_decay: float = 0.0
    # learning rate of an encoder's classification head (null: lr); a fresh head at a prompt's rate of 0.03 can
    # swing or stall a run. Models scored without a head have nothing it applies to
    head_lr: Optional[float] = None
    scheduler: str = "constant"
    warmup_steps: int = 0
    batch_size: int = 16
    eval_batch_size: int = 64
    grad_accum: int = 1
    max_grad_norm: Optional[float] = 1.0
    max_steps: int = 150
    eval_every: int = 25
    # stop after this many evaluations without improvement; null never stops early
    early_stopping_patience: Optional[int] = None
    mixed_precision: str = "no"
    # dropout inside the frozen backbone while the prompt trains; off, the backbone computes the same
    # function in training as in evaluation (less noise, and a cheaper backward)
    backbone_dropout: bool = False
    # training batches of similar lengths (shuffled groups, as HF's LengthGroupedSampler): less padding
    group_by_length: bool = True
    # recompute each backbone layer's activations during backward instead of keeping them: training
    # memory close to inference for about one more forward pass per step
    gradient_checkpointing: bool = False
    # torch.compile the backbone (dynamic shapes): element-wise work fused in forward and backward, after a
    # compilation of seconds to minutes per new batch shape class
    compile: bool = False
    log_every: int = 10
    # null, a tracker Accelerate supports (tensorboard, wandb, mlflow, ...) or a list of them; typed Any because
    # OmegaConf has no union of a string and a list
    log_with: Any = None
    num_workers: int = 0
    progress_bar: bool = True
    # write run_dir/checkpoint/ every this many optimiser steps; null: every eval_every steps
    checkpoint_every: Optional[int] = None
    # starting an existing run directory: auto resumes from its checkpoint if any, never starts over,
    # must fails when there is no checkpoint
    resume: str = "auto"
    # none: every process holds the whole backbone (data parallel) | fsdp: each transformer layer and the rest of
    # the model sharded across the launch's processes (FSDP2); the same results either way
    sharding: str = "none"
    # fsdp: free each layer's gathered weights after its forward (gathered again for backward): least memory
    reshard_after_forward: bool = True


@dataclass
class TrainConfig:
    """The root config of `softprompt-train`."""

    model: ModelConfig = MISSING
    task: TaskConfig = MISSING
    prompt: PromptConfig = field(default_factory=PromptConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0
    # where run directories go: Hydra's run dir is ${output_root}/...
    output_root: str = "outputs"


def register_configs() -> None:
    """Make the schemas known to Hydra, so YAML files are typed and checked against them; and softprompt's
    defaults for the Optuna sweeper (softprompt.search)."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    register_sweeper()


def _one_of(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(key, value, "one of: " + ", ".join(map(str, allowed)))


def _at_least(key: str, value, minimum) -> None:
    if value is None or not value >= minimum:
        raise ConfigError(key, value, f"a number >= {minimum}")


def _positive(key: str, value, what: str = "a number > 0") -> None:
    if value is None or not (value > 0 and math.isfinite(value)):
        raise ConfigError(key, value, what)


def _seed(key: str, value) -> None:
    # numpy's generators (seeded by accelerate's set_seed) take 0 <= seed < 2**32
    if not 0 <= value < 2**32:
        raise ConfigError(key, value, f"a whole number from 0 to {2**32 - 1}")


def _schema_path(key: str) -> tuple[str, Any] | str:
    """The schema type a dotted key names, or the one-line reason it names none."""
    node: Any = TrainConfig
    for depth, part in enumerate(key.split(".")):
        parent = ".".join(key.split(".")[:depth])
        if not is_dataclass(node):
            # a value, or a mapping the schema leaves open (model.from_config.*, task.builtin_size.*)
            return ("open", node) if _is_mapping(node) else f"{key} is not a config key: {parent} is a value"
        hints = get_type_hints(node)
        if part not in hints:
            return f"{key} is not a config key: {parent or 'the root'} has: {', '.join(hints)}"
        node = hints[part]
    return "known", node


def _is_mapping(hint: Any) -> bool:
    """dict[...], Optional[dict[...]] or Any: a node that takes keys the schema does not list."""
    if hint is Any:
        return True
    origin = getattr(hint, "__origin__", None)
    if origin is Union:
        return any(_is_mapping(arg) for arg in hint.__args__ if arg is not type(None))
    return origin is dict


def unknown_key_message(key: str) -> str | None:
    """One line naming a dotted key the schema does not have and what its parent has; None for a known key."""
    found = _schema_path(key)
    return found if isinstance(found, str) else None


def check_known_keys(cfg: DictConfig) -> None:
    """A closed schema: a key added with `+key=value` that the schema does not have is refused like a typo."""

    def walk(node: Any, prefix: str) -> None:
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            found = _schema_path(dotted)
            if isinstance(found, str):
                raise UserError(found)
            if found[0] == "known" and is_dataclass(found[1]):
                walk(value, f"{dotted}.")

    walk(OmegaConf.to_container(cfg, resolve=False), "")


def flatten(tree: dict[str, Any], scalars: bool = False) -> dict[str, Any]:
    """Dotted key -> value: the form checkpoints compare, and with `scalars` (lists and mappings as text)
    the form trackers log and report tables hold."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            plain = not scalars or isinstance(node, (int, float, str, bool, type(None)))
            flat[prefix[:-1]] = node if plain else str(node)

    walk(tree, "")
    return flat


def validate(cfg: DictConfig | TrainConfig) -> TrainConfig:
    """Check every rule a type cannot express, so a mistake fails before anything heavy loads."""
    if isinstance(cfg, DictConfig):
        check_known_keys(cfg)
        try:
            cfg = OmegaConf.to_object(cfg)
        except OmegaConfBaseException as error:
            # an interpolation naming no key, or resolving to the wrong type (${nope}, ${oc.env:HOME} for an int)
            raise UserError(f"{error.full_key}: {str(error).splitlines()[0]}") from None
    model, task, prompt, scorer, trainer, method = cfg.model, cfg.task, cfg.prompt, cfg.scorer, cfg.trainer, cfg.method
    generation = cfg.generation
    _seed("seed", cfg.seed)

    if model.name_or_path is None and model.from_config is None:
        raise ConfigError("model.name_or_path", None, "a zoo name, hub id or local folder (or set model.from_config)")
    if model.from_config is not None and (
        not isinstance(model.from_config, dict) or "model_type" not in model.from_config
    ):
        raise ConfigError("model.from_config", model.from_config, "a mapping with a model_type key")
    if model.from_config is not None and not model.tokenizer:
        raise ConfigError(
            "model.tokenizer", model.tokenizer, "a zoo name, hub id or folder for a random model's tokenizer"
        )
    if model.kind is not None:
        _one_of("model.kind", model.kind, KINDS)
    _one_of("model.dtype", model.dtype, DTYPES)
    if model.num_params is not None:
        _at_least("model.num_params", model.num_params, 1)

    _at_least("prompt.length", prompt.length, 1)
    _one_of("prompt.init", prompt.init, INITS)
    _positive("prompt.init_range", prompt.init_range)
    _at_least("prompt.vocab_top_k", prompt.vocab_top_k, 1)
    if prompt.init == "text" and not prompt.text:
        raise ConfigError("prompt.text", prompt.text, "a non-empty string when prompt.init=text")
    if prompt.init == "from_file" and not prompt.path:
        raise ConfigError("prompt.path", prompt.path, "a prompt folder when prompt.init=from_file")

    _one_of("method.name", method.name, tuple(METHODS))
    if method.encoder_hidden_size is not None:
        _at_least("method.encoder_hidden_size", method.encoder_hidden_size, 1)
    _one_of("method.encoder_reparameterization_type", method.encoder_reparameterization_type, P_TUNING_ENCODERS)
    _at_least("method.encoder_num_layers", method.encoder_num_layers, 1)
    if not 0 <= method.encoder_dropout < 1:
        raise ConfigError("method.encoder_dropout", method.encoder_dropout, "a probability in [0, 1)")
    _at_least("method.lora_r", method.lora_r, 1)
    _positive("method.lora_alpha", method.lora_alpha)
    if not 0 <= method.lora_dropout < 1:
        raise ConfigError("method.lora_dropout", method.lora_dropout, "a probability in [0, 1)")
    if method.target_modules is not None and not method.target_modules:
        raise ConfigError(
            "method.target_modules",
            [],
            "module names to adapt (q_proj, query, c_attn, ...), or null for PEFT's default",
        )
    _at_least("method.num_demonstrations", method.num_demonstrations, 0)
    _seed("method.demonstration_seed", method.demonstration_seed)
    _at_least("method.show_rows", method.show_rows, 0)

    _one_of("scorer.name", scorer.name, SCORERS)
    _one_of("scorer.reduction", scorer.reduction, REDUCTIONS)
    _at_least("scorer.max_new_tokens", scorer.max_new_tokens, 1)
    if generation.max_new_tokens is not None:
        _at_least("generation.max_new_tokens", generation.max_new_tokens, 1)
    _at_least("generation.num_beams", generation.num_beams, 1)
    if any(not stop for stop in generation.stop):
        raise ConfigError(
            "generation.stop", list(generation.stop), "non-empty strings (an answer is cut before the first)"
        )

    _one_of("trainer.optimizer", trainer.optimizer, OPTIMIZERS)
    _positive("trainer.lr", trainer.lr, "a learning rate > 0")
    if not (trainer.weight_decay >= 0 and math.isfinite(trainer.weight_decay)):
        raise ConfigError("trainer.weight_decay", trainer.weight_decay, "a number >= 0")
    if trainer.head_lr is not None and not (trainer.head_lr >= 0 and math.isfinite(trainer.head_lr)):
        raise ConfigError("trainer.head_lr", trainer.head_lr, "a learning rate >= 0 (0 keeps the head as it starts)")
    _one_of("trainer.scheduler", trainer.scheduler, SCHEDULERS)
    _at_least("trainer.warmup_steps", trainer.warmup_steps, 0)
    _at_least("trainer.batch_size", trainer.batch_size, 1)
    _at_least("trainer.eval_batch_size", trainer.eval_batch_size, 1)
    _at_least("trainer.grad_accum", trainer.grad_accum, 1)
    if trainer.max_grad_norm is not None and not (trainer.max_grad_norm > 0 and math.isfinite(trainer.max_grad_norm)):
        raise ConfigError("trainer.max_grad_norm", trainer.max_grad_norm, "a number > 0, or null for no clipping")
    _at_least("trainer.max_steps", trainer.max_steps, 0)
    _at_least("trainer.eval_every", trainer.eval_every, 1)
    if trainer.early_stopping_patience is not None:
        _at_least("trainer.early_stopping_patience", trainer.early_stopping_patience, 1)
    _one_of("trainer.mixed_precision", trainer.mixed_precision, PRECISIONS)
    _at_least("trainer.log_every", trainer.log_every, 1)
    if trainer.log_with is not None:
        # Accelerate (and torch) load only for a config that logs to trackers
        from softprompt.trackers import tracker_names

        tracker_names(trainer.log_with)
    _at_least("trainer.num_workers", trainer.num_workers, 0)
    if trainer.checkpoint_every is not None:
        _at_least("trainer.checkpoint_every", trainer.checkpoint_every, 1)
    _one_of("trainer.resume", trainer.resume, RESUME_MODES)
    _one_of("trainer.sharding", trainer.sharding, SHARDINGS)
    if trainer.sharding == "fsdp" and trainer.mixed_precision == "fp16":
        raise ConfigError(
            "trainer.mixed_precision",
            "fp16",
            "no or bf16 with trainer.sharding=fsdp (fp16's loss scaling is not sharded)",
        )
    if trainer.sharding == "fsdp" and trainer.optimizer == "adafactor" and method_spec(method.name).trains_backbone:
        raise ConfigError(
            "trainer.optimizer",
            "adafactor",
            f"adamw for method={method.name} with trainer.sharding=fsdp (Adafactor's factored moments do not take sharded weights)",
        )
    if trainer.gradient_checkpointing and method_spec(method.name).no_gradient_checkpointing:
        raise ConfigError("trainer.gradient_checkpointing", True, method_spec(method.name).no_gradient_checkpointing)

    _at_least("task.max_length", task.max_length, 1)
    for key in ("max_train_rows", "max_eval_rows", "eval_rows"):
        if getattr(task, key) is not None and getattr(task, key) < 1:
            raise ConfigError(
                f"task.{key}",
                getattr(task, key),
                "a number of rows >= 1 (0 leaves the split empty), or null for all rows",
            )
    _seed("task.dev_seed", task.dev_seed)
    try:
        codecs.lookup(task.encoding)
    except LookupError:
        raise ConfigError(
            "task.encoding", task.encoding, "a text encoding: utf-8, latin-1, cp1252, utf-16, ..."
        ) from None
    if not task.template:
        raise ConfigError(
            "task.template",
            task.template,
            "a text with {field} slots; quote it for Hydra inside the shell's quotes: 'task.template=\"{text} It was\"'",
        )
    _check_task_kind(task)
    if task.verbalizer and len(task.verbalizer) != len(task.labels):
        raise ConfigError("task.verbalizer", list(task.verbalizer), f"one word per label ({len(task.labels)} labels)")
    if task.dev_from_train is not None and not 0 < task.dev_from_train < 1:
        raise ConfigError("task.dev_from_train", task.dev_from_train, "a fraction between 0 and 1")
    _one_of("task.source", task.source, SOURCES)
    if task.source == "hub" and not task.hub_dataset:
        raise ConfigError(
            "task.hub_dataset",
            task.hub_dataset,
            f"[path] or [path, config name] of a hub dataset for task.source=hub (task {task.name} has none)",
        )
    return cfg


def _check_task_kind(task: TaskConfig) -> None:
    """A classification task scores class ids; a generation task (task.target_field) scores written text."""
    generation = task.target_field is not None
    allowed = TEXT_METRICS if generation else tuple(name for name in METRICS if name not in TEXT_METRICS)
    what = "for a generation task (task.target_field)" if generation else "for a classification task"
    for name in task.metrics:
        _one_of("task.metrics", name, METRICS)
        if name not in allowed:
            raise ConfigError("task.metrics", name, f"one of {', '.join(allowed)} {what}")
    keys = [key for name in task.metrics for key in METRIC_KEYS[name]]
    if task.main_metric not in keys:
        raise ConfigError("task.main_metric", task.main_metric, "one of the keys task.metrics give: " + ", ".join(keys))
    for name in task.scorers:
        _one_of("task.scorers", name, SCORERS[1:])
    if generation and list(task.scorers) != ["generate"]:
        raise ConfigError("task.scorers", list(task.scorers), "[generate] for a generation task (task.target_field)")
    if generation and (task.labels or task.verbalizer or task.choices_fields):
        raise ConfigError(
            "task.target_field",
            task.target_field,
            "null for a classification task: task.labels, task.verbalizer and task.choices_fields go with labels, "
            "a target field replaces them",
        )
