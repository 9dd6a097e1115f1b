"""Backbone: tokenizer plus frozen pretrained model, from the offline zoo, a local folder, the hub, or a config."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import (
    AttentionInterface,
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

from softprompt import zoo
from softprompt.config import ModelConfig
from softprompt.errors import ConfigError, UserError

log = logging.getLogger(__name__)

# a random model is always built from this seed, so a run and a later reload see the same weights
RANDOM_MODEL_SEED = 0


@dataclass
class Backbone:
    """What the rest of the pipeline needs to know about a frozen model."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    kind: str  # encoder | decoder | encoder_decoder
    width: int
    max_positions: int | None
    num_params: int


def resolve_source(name_or_path: str, key: str = "model.name_or_path") -> str:
    """Turn a zoo name, folder or hub id into something `from_pretrained` takes, failing early and clearly."""
    if name_or_path in zoo.ZOO:
        return str(zoo.model_path(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or path.exists():
        raise ConfigError(
            key, name_or_path, f"an existing model folder, a zoo name ({', '.join(sorted(zoo.ZOO))}) or a hub id"
        )
    return name_or_path


def _hub_failure(key: str, name: str, error: Exception) -> UserError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return UserError(
        f"{key}={name!r} could not be loaded: it is not a zoo name ({', '.join(sorted(zoo.ZOO))}) nor a local folder, "
        f"and the hub did not provide it ({reason})"
    )


def infer_kind(config: PretrainedConfig) -> str:
    if getattr(config, "is_encoder_decoder", False):
        return "encoder_decoder"
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "encoder"
    return "decoder"


def max_positions(config: PretrainedConfig) -> int | None:
    """The longest input the model's position embeddings allow; None for relative positions (T5)."""
    for attribute in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    key = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
    name = cfg.tokenizer or cfg.name_or_path
    source = resolve_source(name, key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except OSError as error:
        raise _hub_failure(key, name, error) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_model_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The architecture alone: cheap, so prompt/input lengths can be checked before any weights load."""
    if cfg.from_config is not None:
        options = dict(cfg.from_config)
        model_type = options.pop("model_type")
        options.setdefault("vocab_size", len(tokenizer))
        # BERT-style tokenizers have [CLS]/[SEP] where LMs expect BOS/EOS
        specials = {
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id,
            "eos_token_id": tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id,
        }
        for key, token_id in specials.items():
            if token_id is not None:
                options.setdefault(key, token_id)
        if model_type == "t5":
            options.setdefault("decoder_start_token_id", tokenizer.pad_token_id)
        try:
            return AutoConfig.for_model(model_type, **options)
        except ValueError:
            raise ConfigError(
                "model.from_config.model_type", model_type, "a transformers model type such as bert, gpt2, llama, t5"
            ) from None
    source = resolve_source(cfg.name_or_path)
    try:
        return AutoConfig.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as error:
        raise _hub_failure("model.name_or_path", cfg.name_or_path, error) from None


def model_class(kind: str, head_labels: int | None):
    if head_labels is not None:
        return AutoModelForSequenceClassification
    return AutoModelForSeq2SeqLM if kind == "encoder_decoder" else AutoModelForCausalLM


def fuse_gelu(model: torch.nn.Module) -> None:
    """The tanh GELU written as Python ops (T5 v1.1's gelu_new, GPT-2's) becomes torch's one kernel: the same function
    up to float rounding, with one tensor kept for backward instead of five and a far cheaper backward."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, (NewGELUActivation, FastGELUActivation)):
                setattr(module, name, GELUTanh())


# torch 2.13's CPU flash-attention backward in bf16/fp16 has a large fixed cost per call: at 49 positions forward and
# backward take 16 ms against 6 ms with the math kernel (bmm + softmax); the two meet near 192 positions
MATH_ATTENTION_MAX_POSITIONS = 160
HALF_DTYPES = (torch.bfloat16, torch.float16)


def prefers_math_attention(model: torch.nn.Module, positions: int) -> bool:
    """Whether a training pass over sequences of `positions` should run SDPA's math kernel rather than flash."""
    weight = model.get_input_embeddings().weight
    half = weight.dtype in HALF_DTYPES or (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in HALF_DTYPES
    )
    return weight.device.type == "cpu" and half and positions <= MATH_ATTENTION_MAX_POSITIONS


def attention_kernel(math: bool) -> contextlib.AbstractContextManager:
    return sdpa_kernel(SDPBackend.MATH) if math else contextlib.nullcontext()


GROUPED_SDPA = "grouped_sdpa"


def grouped_sdpa_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """transformers' SDPA attention, except that grouped key/value heads (GQA) with a mask go to SDPA as they are.

    transformers repeats each key/value head once per query head (`repeat_kv`) whenever a mask is given, as CUDA's
    fast kernels take `enable_gqa` only without one. On CPU, torch's flash and math kernels take it with a mask and give
    the same outputs and gradients without the copies, which backward also keeps (smollm2-135m: a step 7% faster, 69 MiB
    less). Everything else (other devices, decoding, position bias, no mask, no groups) is transformers' own."""
    groups = getattr(module, "num_key_value_groups", 1)
    if (
        query.device.type != "cpu"
        or query.shape[2] == 1
        or attention_mask is None
        or groups == 1
        or kwargs.get("position_bias") is not None
        or kwargs.get("cache") is not None
        or kwargs.get("softcap") is not None
    ):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    # with a mask, transformers' rule (`q_length > 1 and attention_mask is None and ...`) leaves is_causal False
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=False, enable_gqa=True
    )
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_attention)
AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)


def group_key_values_in_sdpa(model: PreTrainedModel) -> None:
    """Run a model on SDPA with fewer key/value heads than query heads through `grouped_sdpa_attention`."""
    config = model.config
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if config._attn_implementation == "sdpa" and heads and kv_heads and kv_heads < heads:
        model.set_attn_implementation(GROUPED_SDPA)


def load_backbone(
    cfg: ModelConfig,
    head_labels: int | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    config: PretrainedConfig | None = None,
) -> Backbone:
    """Load the model frozen; with `head_labels` it carries a fresh classification head of that many classes."""
    tokenizer = tokenizer or load_tokenizer(cfg)
    config = config or load_model_config(cfg, tokenizer)
    kind = cfg.kind or infer_kind(config)
    if head_labels is not None:
        config.num_labels = head_labels
        if config.pad_token_id is None:
            config.pad_token_id = tokenizer.pad_token_id
    cls = model_class(kind, head_labels)
    dtype = getattr(torch, cfg.dtype)
    if cfg.from_config is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_MODEL_SEED)
            model = cls.from_config(config, dtype=dtype)
    else:
        source = resolve_source(cfg.name_or_path)
        try:
            with _fresh_head_unreported():
                model = cls.from_pretrained(
                    source,
                    config=config,
                    dtype=dtype,
                    revision=cfg.revision,
                    trust_remote_code=cfg.trust_remote_code,
                    use_safetensors=True,
                )
        except OSError as error:
            raise _hub_failure("model.name_or_path", cfg.name_or_path, error) from None
    model.requires_grad_(False)
    model.eval()
    fuse_gelu(model)
    group_key_values_in_sdpa(model)
    num_params = cfg.num_params or sum(p.numel() for name, p in model.named_parameters() if not _is_head(name))
    log.info("loaded %s (%s, %.1fM parameters)", cfg.name, kind, num_params / 1e6)
    return Backbone(
        name=cfg.name,
        model=model,
        tokenizer=tokenizer,
        kind=kind,
        width=model.get_input_embeddings().embedding_dim,
        max_positions=max_positions(config),
        num_params=num_params,
    )


HEAD_NAMES = ("classifier", "score")


class _FreshHeadReport(logging.Filter):
    """transformers reports the classification head we add as missing weights on every load, and the pretrained
    pooler as unexpected where the classification model has its own head in its place (mpnet-base): both
    expected, so a load report that names only those is dropped; one that names any other weight still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "LOAD REPORT" not in text:
            return True
        rows = [[cell.strip() for cell in line.split("|")[:2]] for line in text.splitlines() if line.count("|") >= 2]
        rows = [(key, status) for key, status in rows if key and key != "Key" and not key.startswith("-")]
        return not rows or not all(_expected_in_load_report(key, status) for key, status in rows)


def _expected_in_load_report(key: str, status: str) -> bool:
    return _is_head(key) or (status == "UNEXPECTED" and key.split(".")[0] == "pooler")


@contextlib.contextmanager
def _fresh_head_unreported():
    logger, report_filter = logging.getLogger("transformers.modeling_utils"), _FreshHeadReport()
    logger.addFilter(report_filter)
    try:
        yield
    finally:
        logger.removeFilter(report_filter)


def _is_head(parameter_name: str) -> bool:
    return parameter_name.split(".")[0] in HEAD_NAMES


def head_module(model: torch.nn.Module) -> torch.nn.Module:
    """The classification head of a sequence-classification model (PEFT keeps its trainable copy inside)."""
    for name in HEAD_NAMES:
        if hasattr(model, name):
            return getattr(model, name)
    raise ValueError(f"{type(model).__name__} has no classification head ({', '.join(HEAD_NAMES)})")
