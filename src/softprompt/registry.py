"""Method registry: each method is one `MethodSpec`, registered by name (as PEFT's `register_peft_method`).

A spec says everything the rest of the package needs to know about a method: its report label, the
method.* knobs it reads, whether it has a prompt length and an initialisation, whether it trains
(and whether the backbone's weights train), the parts of its sweep job names, which scorers it
refuses, how its PEFT adapter is configured and how the scorer reads what it trained.

Adding a method is one `register_method(MethodSpec(...))` below and one YAML file in conf/method/;
no other module compares method names. This module sits below config.py, so it imports no other
module of the package but errors.py, and PEFT only inside the adapter factories.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from softprompt.errors import ConfigError

# the method of a config (or a run record) that names none: runs made before methods existed were prompt tuning
DEFAULT_METHOD = "prompt_tuning"
# LoRA targets for architectures PEFT has no default for
LORA_TARGETS = {"mpnet": ["q", "v"]}


def _name(cfg: Any) -> list[str]:
    return [cfg.method.name]


@dataclass(frozen=True)
class MethodSpec:
    """One method. `cfg` in the callables is the run's config (a TrainConfig or Hydra's DictConfig)."""

    name: str
    # how reports and figures name it
    label: str
    # the method.* keys it reads; the others are ignored by it (and left empty on its report rows)
    knobs: tuple[str, ...] = ()
    # its vectors are prompt.length long (soft prompt, prompt encoder tokens, prefix): the length takes
    # model positions, and is a report column of its runs
    has_length: bool = False
    # prompt.init starts its vectors (a report column of its runs)
    has_init: bool = False
    # False: nothing trains; the run evaluates once
    trains: bool = True
    # every backbone weight trains (no adapter); any other method with a trainable backbone weight is a bug
    trains_backbone: bool = False
    # built as the soft prompt of soft_prompt.py (PEFT's PromptTuningConfig, the paper's initialisations)
    soft_prompt: bool = False
    # the PEFT config of its adapter, from (cfg, backbone width, PEFT task type, model type); None: no PEFT adapter
    adapter: Callable[[Any, int, Any, str], Any] | None = None
    # the config key a PEFT ValueError while attaching the adapter points at (None: the error is not the user's)
    adapter_key: str | None = None
    # PEFT's name for its adapter type, and how the scorer reads what it trained: "embedding" (a prompt parameter
    # prepended to every row's input), "encoder" (the prompt encoder's output, prepended), "prefix" (past keys and
    # values of every attention layer); None: nothing to read (the backbone alone, or an adapter inside its layers)
    peft_type: str | None = None
    prompt_source: str | None = None
    # an encoder gets a trained classification head; False: the method needs a language model (rank or generate)
    head: bool = True
    # scorers it cannot use -> the one-line error's "allowed" text
    refused_scorers: dict[str, str] = field(default_factory=dict)
    # the backbone's attention must take past key values (a prefix)
    past_key_values: bool = False
    # why trainer.gradient_checkpointing cannot be used with it (None: it can)
    no_gradient_checkpointing: str | None = None
    # refuse a run whose weights, gradients and optimiser states will not fit in memory
    memory_check: bool = False
    # an instruction and demonstrations go before every scored row (prompt design)
    design_context: bool = False
    # a prompt bank (softprompt-predict --ensemble, softprompt-inspect) can serve its runs
    bank: bool = False
    # a sweep job's folder name parts after model and task (then seed and config key follow)
    job_parts: Callable[[Any], list[Any]] = _name
    # trainable-parameter parts the run summary shows even when zero
    summary_parts: tuple[str, ...] = ()
    # place of its line in the methods figures' legends (Lester et al. Fig. 1: model tuning first)
    figure_rank: int = 0


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Make a method known by its name: to validation, pipeline, training, sweeps and the report."""
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} is registered already")
    METHODS[spec.name] = spec
    return spec


def method_spec(name: str) -> MethodSpec:
    """The spec of a registered method (names are checked against METHODS when the config is validated)."""
    return METHODS[name]


def prompt_source(peft_type: str | None) -> str | None:
    """How the scorer reads the trained vectors of a PEFT adapter type (see MethodSpec.prompt_source)."""
    return next((spec.prompt_source for spec in METHODS.values() if peft_type and spec.peft_type == peft_type), None)


# --- the adapters PEFT configures ------------------------------------------------------------------


def lora_targets(cfg: Any, model_type: str) -> list[str]:
    """method.target_modules, else PEFT's default for the architecture (or ours, where PEFT has none)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    if cfg.method.target_modules:
        return list(cfg.method.target_modules)
    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type) or LORA_TARGETS.get(model_type)
    if not targets:
        raise ConfigError(
            "method.target_modules",
            None,
            f"the names of the {model_type} modules to adapt (PEFT has no default for it)",
        )
    return list(targets)


def _p_tuning(cfg: Any, width: int, task_type: Any, model_type: str) -> Any:
    from peft import PromptEncoderConfig

    method = cfg.method
    return PromptEncoderConfig(
        task_type=task_type,
        num_virtual_tokens=cfg.prompt.length,
        token_dim=width,
        num_transformer_submodules=1,
        encoder_hidden_size=method.encoder_hidden_size or width,
        encoder_reparameterization_type=method.encoder_reparameterization_type,
        encoder_num_layers=method.encoder_num_layers,
        encoder_dropout=method.encoder_dropout,
    )


def _prefix_tuning(cfg: Any, width: int, task_type: Any, model_type: str) -> Any:
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(
        task_type=task_type,
        num_virtual_tokens=cfg.prompt.length,
        num_transformer_submodules=1,
        prefix_projection=cfg.method.prefix_projection,
        encoder_hidden_size=cfg.method.encoder_hidden_size or width,
    )


def _lora(cfg: Any, width: int, task_type: Any, model_type: str) -> Any:
    from peft import LoraConfig

    method = cfg.method
    return LoraConfig(
        task_type=task_type,
        r=method.lora_r,
        lora_alpha=method.lora_alpha,
        lora_dropout=method.lora_dropout,
        target_modules=lora_targets(cfg, model_type),
    )


# --- the methods ------------------------------------------------------------------------------------

register_method(
    MethodSpec(
        name="prompt_tuning",
        label="prompt tuning",
        has_length=True,
        has_init=True,
        soft_prompt=True,
        peft_type="PROMPT_TUNING",
        prompt_source="embedding",
        bank=True,
        job_parts=lambda cfg: [f"len{cfg.prompt.length}", cfg.prompt.init],
        summary_parts=("prompt", "head"),
        figure_rank=1,
    )
)
register_method(
    MethodSpec(
        name="model_tuning",
        label="model tuning",
        knobs=("ignore_memory_check",),
        trains_backbone=True,
        memory_check=True,
        figure_rank=0,
    )
)
register_method(
    MethodSpec(
        name="prompt_design",
        label="prompt design",
        knobs=("instruction", "num_demonstrations", "demonstration_seed", "separator", "show_rows"),
        trains=False,
        head=False,
        design_context=True,
        job_parts=lambda cfg: [cfg.method.name, f"k{cfg.method.num_demonstrations}"],
        figure_rank=2,
    )
)
register_method(
    MethodSpec(
        name="prefix_tuning",
        label="prefix tuning",
        knobs=("prefix_projection", "encoder_hidden_size"),
        has_length=True,
        adapter=_prefix_tuning,
        peft_type="PREFIX_TUNING",
        prompt_source="prefix",
        past_key_values=True,
        no_gradient_checkpointing="false with method=prefix_tuning (a checkpointed layer drops the prefix's key/value cache)",
        job_parts=lambda cfg: [cfg.method.name, f"len{cfg.prompt.length}"],
        figure_rank=3,
    )
)
register_method(
    MethodSpec(
        name="p_tuning",
        label="p-tuning",
        knobs=("encoder_hidden_size", "encoder_reparameterization_type", "encoder_num_layers", "encoder_dropout"),
        has_length=True,
        adapter=_p_tuning,
        peft_type="P_TUNING",
        prompt_source="encoder",
        job_parts=lambda cfg: [cfg.method.name, f"len{cfg.prompt.length}"],
        figure_rank=4,
    )
)
register_method(
    MethodSpec(
        name="lora",
        label="LoRA",
        knobs=("lora_r", "lora_alpha", "lora_dropout", "target_modules"),
        adapter=_lora,
        adapter_key="method.target_modules",
        peft_type="LORA",
        job_parts=lambda cfg: [cfg.method.name, f"r{cfg.method.lora_r}"],
        figure_rank=5,
    )
)
