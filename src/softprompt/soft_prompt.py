"""SoftPrompt: PEFT's prompt-tuning adapter, with the initialisations of Lester et al. (2021) done exactly.

PEFT differs from the paper in three places, corrected here on top of PEFT: its RANDOM init is
N(0, 1) (the paper: U[-0.5, 0.5]); its SAMPLE_VOCAB samples the whole vocabulary (the paper: the
5,000 most frequent tokens); it has no class-label init. And for encoder-decoder models it
allocates the prompt twice by default; we ask for one copy, on the encoder input only.

Token frequency ranks, per tokenizer kind (no frequency counts ship with tokenizers):
- SentencePiece unigram (T5, ...): pieces sorted by their unigram log-probability score;
- BPE (GPT-2, Llama, SmolLM, Gemma) and WordPiece (BERT, MPNet): vocabulary id order, which for
  BPE follows merge order (frequent pairs merge first) and for these WordPiece vocabularies
  roughly follows corpus frequency.
In every case special tokens, added tokens, unused placeholders and byte-fallback tokens are
excluded before taking the top k.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import PeftModel, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from softprompt.backbone import Backbone, head_module
from softprompt.config import PromptConfig
from softprompt.errors import ConfigError, UserError

ADAPTER = "default"
PROMPT_KEY = "prompt_embeddings"
_PLACEHOLDER = re.compile(r"^(\[unused\d+\]|<unused\d+>|<0x[0-9A-Fa-f]{2}>|<extra_id_\d+>)$")


@contextlib.contextmanager
def peft_quietly() -> Iterator[None]:
    """PEFT reads the backbone's `is_gradient_checkpointing`, which transformers 5 answers with a FutureWarning on
    every wrap: a note to PEFT's authors, not to our users, so it is silenced around PEFT's calls and nowhere else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def task_type(kind: str, head: bool) -> TaskType:
    if head:
        return TaskType.SEQ_CLS
    return TaskType.SEQ_2_SEQ_LM if kind == "encoder_decoder" else TaskType.CAUSAL_LM


def frequency_ranked_ids(tokenizer: PreTrainedTokenizerBase, k: int) -> torch.Tensor:
    """The ids of the k most frequent ordinary tokens, by the rule in the module docstring."""
    vocab = tokenizer.get_vocab()
    excluded = set(tokenizer.all_special_ids) | {index for index in tokenizer.added_tokens_decoder}
    order = sorted(vocab.items(), key=lambda item: item[1])
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = json.loads(backend.to_str())["model"]
        if model.get("type") == "Unigram":
            scores = {index: score for index, (_, score) in enumerate(model["vocab"])}
            order = sorted(order, key=lambda item: -scores.get(item[1], float("-inf")))
    ranked = [
        index for token, index in order if index not in excluded and token.strip() and not _PLACEHOLDER.match(token)
    ]
    return torch.tensor(ranked[:k], dtype=torch.long)


def embed_tokens(embedding: torch.nn.Module, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
    """Vectors as the model sees them (some models, like Gemma, scale their embedding outputs)."""
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=embedding.weight.device)
    with torch.no_grad():
        return embedding(ids).float()


def sample_vocab(embedding, tokenizer, count: int, top_k: int, generator: torch.Generator) -> torch.Tensor:
    ranked = frequency_ranked_ids(tokenizer, top_k)
    picks = ranked[torch.randint(len(ranked), (count,), generator=generator)]
    return embed_tokens(embedding, picks)


def load_prompt_file(path: str | Path) -> torch.Tensor:
    """A saved prompt: a run directory, its prompt/ folder, or a PEFT adapter folder."""
    folder = Path(path).expanduser()
    if (folder / "prompt").is_dir():
        folder = folder / "prompt"
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise ConfigError(
            "prompt.path", str(path), "a run directory or prompt folder holding adapter_model.safetensors"
        )
    tensors = load_file(str(weights))
    if PROMPT_KEY not in tensors:
        raise UserError(f"prompt.path={str(path)!r}: {weights} holds no soft prompt (no {PROMPT_KEY!r} tensor)")
    return tensors[PROMPT_KEY].float()


def initial_prompt(
    cfg: PromptConfig,
    backbone: Backbone,
    label_token_ids: list[list[int]],
    generator: torch.Generator,
) -> torch.Tensor:
    """The prompt's starting vectors, shape (length, width)."""
    embedding = backbone.model.get_input_embeddings()
    length, width = cfg.length, backbone.width
    if cfg.init == "random_uniform":
        return torch.rand(length, width, generator=generator) * (2 * cfg.init_range) - cfg.init_range
    if cfg.init == "sampled_vocab":
        return sample_vocab(embedding, backbone.tokenizer, length, cfg.vocab_top_k, generator)
    if cfg.init == "class_labels":
        # tasks whose answers are the choices themselves (COPA) have no label words: all vectors are sampled
        label_vectors = [embed_tokens(embedding, ids).mean(0) for ids in label_token_ids[:length]]
        labels = torch.stack(label_vectors) if label_vectors else torch.empty(0, width)
        leftover = length - len(labels)
        if leftover == 0:
            return labels
        return torch.cat([labels, sample_vocab(embedding, backbone.tokenizer, leftover, cfg.vocab_top_k, generator)])
    if cfg.init == "text":
        ids = backbone.tokenizer(cfg.text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError("prompt.text", cfg.text, "text that tokenizes to at least one token")
        repeats = -(-length // len(ids))
        return embed_tokens(embedding, (ids * repeats)[:length])
    # from_file
    saved = load_prompt_file(cfg.path)
    if saved.shape[1] != width:
        raise ConfigError("prompt.path", cfg.path, f"a prompt of width {width} (this one has width {saved.shape[1]})")
    if saved.shape[0] != length:
        raise ConfigError("prompt.length", length, f"{saved.shape[0]}, the length of the prompt in prompt.path")
    return saved


def attach_prompt(
    backbone: Backbone,
    cfg: PromptConfig,
    label_token_ids: list[list[int]],
    head: bool,
    seed: int,
) -> PeftModel:
    """Wrap the frozen backbone in PEFT's prompt-tuning adapter and set the paper's initial vectors."""
    generator = torch.Generator().manual_seed(seed)
    start = initial_prompt(cfg, backbone, label_token_ids, generator)
    peft_config = PromptTuningConfig(
        task_type=task_type(backbone.kind, head),
        num_virtual_tokens=cfg.length,
        num_transformer_submodules=1,
        token_dim=backbone.width,
        prompt_tuning_init=PromptTuningInit.RANDOM,
    )
    with peft_quietly():
        model = get_peft_model(backbone.model, peft_config)
    weight = prompt_parameter(model)
    with torch.no_grad():
        weight.copy_(start.to(weight.dtype))
    train_in_fp32(model, backbone, head)
    return model


def train_in_fp32(model: PeftModel, backbone: Backbone, head: bool) -> None:
    """What learns (prompt, adapter, head) stays fp32 under a bf16/fp16 backbone: AdamW's small steps vanish in bf16's
    8-bit mantissa. The head then takes the backbone's features in fp32."""
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    if head and backbone.model.dtype != torch.float32:
        head_module(model.base_model).register_forward_pre_hook(lambda module, args: tuple(arg.float() for arg in args))


def prompt_parameter(model: PeftModel) -> torch.nn.Parameter:
    return model.prompt_encoder[ADAPTER].embedding.weight
