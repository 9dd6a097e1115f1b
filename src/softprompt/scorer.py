"""Scorer: how a label is predicted from a prompted frozen model.

- `head`: a classification head on an encoder (PEFT's SEQ_CLS layout);
- `rank`: rank classification for decoder and encoder-decoder LMs (Lester et al.): each
  candidate answer's log-likelihood given prompt and input; the best-scoring one wins;
- `generate`: the LM writes its answer greedily after prompt and input, and the answer is mapped to
  the candidate it spells out (trained like `rank`, on the gold answer's tokens).

Every row carries its own prompt (a (batch, length, width) tensor), so rows tuned for different
tasks can share a batch. The same paths serve every method (method.py): p-tuning's prompt comes
from its prompt encoder; LoRA, model tuning and prompt design prepend an empty prompt; prefix
tuning prepends nothing to the input but gives every attention layer its prefix as past keys and
values, so masks cover the prefix and the input's positions start after it, as in PEFT.
Only the logits that are scored are computed: the answer positions (decoders) or the answer
tokens (encoder-decoders), never the soft-prompt positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import PeftModel
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache
from transformers.modeling_layers import GradientCheckpointingLayer

from softprompt.backbone import attention_kernel, head_module, prefers_math_attention
from softprompt.batching import IGNORE
from softprompt.config import ScorerConfig
from softprompt.errors import ConfigError
from softprompt.registry import prompt_source
from softprompt.soft_prompt import prompt_parameter


def resolve_scorer(cfg: ScorerConfig, kind: str, task_scorers: list[str]) -> str:
    """The scorer this model kind and task can use; an impossible pair is a one-line config error."""
    name = cfg.name
    if kind == "encoder" and "head" not in task_scorers and name in ("auto", "head"):
        raise ConfigError(
            "scorer.name",
            name,
            f"none for an encoder: this task is scored by {', '.join(task_scorers)}, which needs a "
            "decoder or encoder-decoder language model (model=smollm2-135m, model=t5-small-lm-adapt, ...)",
        )
    if name == "auto":
        name = "head" if kind == "encoder" else next(s for s in ("rank", "generate") if s in task_scorers)
    if name == "head" and kind != "encoder":
        raise ConfigError("scorer.name", name, f"rank or generate for a {kind} model (head needs an encoder)")
    if name != "head" and kind == "encoder":
        raise ConfigError("scorer.name", name, "head for an encoder model (rank and generate need a language model)")
    if name not in task_scorers:
        raise ConfigError("scorer.name", name, "one this task supports: " + ", ".join(task_scorers))
    return name


@dataclass
class ScoreOutput:
    loss: torch.Tensor
    # (rows, choices) log-probabilities; -inf where a row has fewer choices
    scores: torch.Tensor


class PromptedModel(nn.Module):
    """The backbone behind a PEFT adapter (or alone: model tuning, prompt design), called with soft prompts prepended to each row."""

    def __init__(
        self,
        peft_model: nn.Module,
        kind: str,
        scorer: str,
        reduction: str = "sum",
        backbone_dropout: bool = True,
        gradient_checkpointing: bool = False,
        compile_backbone: bool = False,
    ):
        super().__init__()
        self.peft_model = peft_model
        self.kind, self.scorer, self.reduction = kind, scorer, reduction
        self.backbone_dropout = backbone_dropout
        # non-reentrant checkpointing: gradients reach the prompt through inputs_embeds whether or not
        # the frozen embedding output requires grad
        self.checkpointed_layers: list[nn.Module] = []
        # set by each forward; recomputation in backward must run the attention kernel its forward ran
        self.math_attention = False
        # sharded across processes (softprompt.sharding): every process decodes until all rows are done
        self.synced_gpus = False
        if gradient_checkpointing:
            options = {"use_reentrant": False}
            if not compile_backbone:  # compiled, the recomputation is part of the traced backward graph
                options["context_fn"] = lambda: (
                    attention_kernel(self.math_attention),
                    attention_kernel(self.math_attention),
                )
            self.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
            self.checkpointed_layers = [
                module for module in self.backbone.modules() if isinstance(module, GradientCheckpointingLayer)
            ]
        if compile_backbone:
            self.backbone.compile(dynamic=True)
        kind_of = peft_model.active_peft_config.peft_type if isinstance(peft_model, PeftModel) else None
        # how the method's trained vectors reach the backbone (registry.MethodSpec.prompt_source)
        self.prompt_source = prompt_source(getattr(kind_of, "value", kind_of))
        self.prefix_length = peft_model.active_peft_config.num_virtual_tokens if self.prompt_source == "prefix" else 0

    def train(self, mode: bool = True) -> PromptedModel:
        """Without backbone dropout the backbone (head and adapters included) stays in evaluation mode while training.

        Transformers checkpoints a layer only while that layer is training, so checkpointed layers are
        marked training themselves while everything inside them (dropout, attention) stays in evaluation mode.
        """
        super().train(mode)
        if mode and not self.backbone_dropout:
            self.backbone.eval()
            for layer in self.checkpointed_layers:
                layer.training = True
        return self

    @property
    def backbone(self) -> nn.Module:
        return self.peft_model.base_model if isinstance(self.peft_model, PeftModel) else self.peft_model

    def row_prompts(self, rows: int) -> torch.Tensor:
        if self.prompt_source == "embedding":
            return prompt_parameter(self.peft_model).unsqueeze(0).expand(rows, -1, -1)
        if self.prompt_source == "encoder":
            return self.peft_model.get_prompt(1).expand(rows, -1, -1)
        embedding = self.backbone.get_input_embeddings()
        return embedding.weight.new_zeros(rows, 0, embedding.embedding_dim)

    def _prepend(self, prompts: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        embeddings = self.backbone.get_input_embeddings()(input_ids)
        inputs = torch.cat([prompts.to(embeddings.dtype), embeddings], dim=1)
        ones = attention_mask.new_ones(prompts.shape[:2])
        return inputs, torch.cat([ones, attention_mask], dim=1)

    def _prefix(self, mask: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """Prefix tuning: each row's past keys and values, and its mask with the prefix positions in front."""
        if not self.prefix_length:
            return {}, mask
        rows = mask.shape[0]
        cache = self.peft_model.get_prompt(rows)
        if self.kind == "encoder_decoder":
            cache = EncoderDecoderCache(cache, DynamicCache())
        return {"past_key_values": cache}, torch.cat([mask.new_ones(rows, self.prefix_length), mask], dim=1)

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        prompts: torch.Tensor | None = None,
        heads: list[nn.Module] | None = None,
    ) -> ScoreOutput:
        """Score a batch; `prompts` gives each row its own prompt and `heads` each bank prompt its own head."""
        rows = batch["labels"].shape[0]
        prompts = self.row_prompts(rows) if prompts is None else prompts
        self.math_attention = (
            self.training
            and torch.is_grad_enabled()
            and prefers_math_attention(
                self.backbone, prompts.shape[1] + self.prefix_length + batch["input_ids"].shape[1]
            )
        )
        with attention_kernel(self.math_attention):
            return self._score(batch, prompts, heads)

    def _score(self, batch, prompts, heads) -> ScoreOutput:
        if self.scorer == "head":
            return self._head(batch, prompts, heads)
        if self.scorer == "generate" and not self.training:
            return match_candidates(batch, self.generate(batch, prompts, max_new_tokens=batch["targets"].shape[1]))
        pair_log_probs = (
            self._decoder(batch, prompts) if self.kind == "decoder" else self._encoder_decoder(batch, prompts)
        )
        return self._rank(batch, pair_log_probs)

    def _head(self, batch, prompts, heads) -> ScoreOutput:
        inputs, mask = self._prepend(prompts, batch["input_ids"], batch["attention_mask"])
        extra = {}
        if "token_type_ids" in batch:
            types = batch["token_type_ids"]
            extra["token_type_ids"] = torch.cat([types.new_zeros(prompts.shape[:2]), types], dim=1)
        if heads is None:
            prefix, mask = self._prefix(mask)
            logits = self.backbone(inputs_embeds=inputs, attention_mask=mask, **extra, **prefix).logits.float()
            return ScoreOutput(nn.functional.cross_entropy(logits, batch["labels"]), logits.log_softmax(-1))
        # one pass through the body; each row then goes through the head of its own prompt's task
        features = []
        hook = head_module(self.backbone).register_forward_pre_hook(lambda module, args: features.append(args[0]))
        try:
            self.backbone(inputs_embeds=inputs, attention_mask=mask, **extra)
        finally:
            hook.remove()
        prompt_index = batch["prompt_index"]
        width = max(head_classes(head) for head in heads)
        table = features[0].new_full((prompt_index.shape[0], width), float("-inf"), dtype=torch.float32)
        for index in prompt_index.unique().tolist():
            rows = (prompt_index == index).nonzero().squeeze(1)
            log_probs = heads[index](features[0][rows]).float().log_softmax(-1)
            table[rows, : log_probs.shape[1]] = log_probs
        return ScoreOutput(table.new_zeros(()), table)

    def _decoder(self, batch, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """Layout [prompt][left padding][input][answer]; positions skip the padding, as if it were absent."""
        if "answer_ids" in batch:
            return self._decoder_shared_input(batch, prompts)
        inputs, mask = self._prepend(prompts[batch["pair_row"]], batch["input_ids"], batch["attention_mask"])
        positions = (mask.cumsum(-1) - 1).clamp(min=0) + self.prefix_length
        prefix, mask = self._prefix(mask)
        targets = batch["targets"]
        # the positions that predict the answer tokens: the last input token's and every answer token's but the last
        end = inputs.shape[1] - 1
        logits = self.backbone(
            inputs_embeds=inputs,
            attention_mask=mask,
            position_ids=positions,
            logits_to_keep=torch.arange(end - targets.shape[1], end, device=inputs.device),
            use_cache=bool(prefix),
            **prefix,
        ).logits
        return _token_log_probs(logits, targets)

    def _decoder_shared_input(self, batch, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """[prompt][left padding][input] once per row; each candidate then reads that row's cached keys and values.

        The input's last position predicts every candidate's first token, so single-token candidates
        need no second pass; longer ones are fed (right-padded) on top of their row's cache.
        """
        inputs, mask = self._prepend(prompts, batch["input_ids"], batch["attention_mask"])
        positions = (mask.cumsum(-1) - 1).clamp(min=0) + self.prefix_length
        prefix, mask = self._prefix(mask)
        targets, pair_row = batch["targets"], batch["pair_row"]
        longer = targets.shape[1] > 1
        # the last position as an index tensor, which gathers a contiguous copy: `logits_to_keep=1` slices a strided view,
        # which a bf16 matmul on CPU turns into a batched product over one copy of the output embeddings per row
        output = self.backbone(
            inputs_embeds=inputs,
            attention_mask=mask,
            position_ids=positions,
            logits_to_keep=torch.tensor([inputs.shape[1] - 1], device=inputs.device),
            use_cache=longer or bool(prefix),
            **prefix,
        )
        logits = output.logits[pair_row]
        if longer:
            cache = output.past_key_values
            cache.batch_select_indices(pair_row)
            answers = batch["answer_ids"][:, :-1]
            answer_mask = (targets[:, :-1] != IGNORE).to(mask.dtype)
            following = self.backbone(
                input_ids=answers,
                attention_mask=torch.cat([mask[pair_row], answer_mask], dim=1),
                position_ids=positions[pair_row, -1:] + 1 + torch.arange(answers.shape[1], device=answers.device),
                past_key_values=cache,
                use_cache=False,
            ).logits
            logits = torch.cat([logits, following], dim=1)
        return _token_log_probs(logits, targets)

    def _encoder_decoder(self, batch, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode each row once with its prompt, then decode all of its candidate answers together."""
        inputs, mask = self._prepend(prompts, batch["input_ids"], batch["attention_mask"])
        encoded = self.backbone.get_encoder()(inputs_embeds=inputs, attention_mask=mask).last_hidden_state
        pair_row = batch["pair_row"]
        targets = batch["targets"]
        decoder_inputs = self.backbone.prepare_decoder_input_ids_from_labels(labels=targets)
        # prefix tuning: the decoder's self-attention reads the prefix before the answer tokens
        prefix, decoder_mask = self._prefix(torch.ones_like(decoder_inputs))
        logits = self.backbone(
            encoder_outputs=(encoded[pair_row],),
            attention_mask=mask[pair_row],
            decoder_input_ids=decoder_inputs,
            decoder_attention_mask=decoder_mask if prefix else None,
            use_cache=bool(prefix),
            **prefix,
        ).logits
        return _token_log_probs(logits, targets)

    @torch.no_grad()
    def generate(
        self,
        batch: dict[str, torch.Tensor],
        prompts: torch.Tensor | None = None,
        max_new_tokens: int = 8,
        num_beams: int = 1,
        use_cache: bool = True,
        **options,
    ) -> torch.Tensor:
        """Answer tokens (rows, at most max_new_tokens) written after each row's prompt and input, greedy or by
        beam search; `options` go to the backbone's `generate` (eos_token_id, stop_strings with tokenizer, ...).

        The backbone's `generate` gets the prompted input embeddings, laid out as the rank scorer lays
        them out ([prompt][left padding][input] for decoders); it derives positions from the mask, so they
        skip the padding and a row's answer does not depend on its batch. A prefix (prefix tuning) goes in as
        the cache the input continues, one copy per beam, its positions counted in the mask. PEFT's own
        `generate` prepends the same prompt but drops `position_ids`, which shifts positions in left-padded batches.
        """
        decoder = self.kind == "decoder"
        ids, mask = (
            (batch["query_ids"], batch["query_mask"]) if decoder else (batch["input_ids"], batch["attention_mask"])
        )
        rows = ids.shape[0]
        prompts = self.row_prompts(rows) if prompts is None else prompts
        inputs, mask = self._prepend(prompts, ids, mask)
        if self.prefix_length:
            cache = self.peft_model.get_prompt(rows * num_beams)
            if decoder:
                mask = torch.cat([mask.new_ones(rows, self.prefix_length), mask], dim=1)
            else:
                cache = EncoderDecoderCache(cache, DynamicCache())
            options["past_key_values"] = cache
        output = self.backbone.generate(
            inputs_embeds=inputs,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=num_beams,
            use_cache=use_cache or bool(self.prefix_length),
            pad_token_id=self.backbone.generation_config.pad_token_id or 0,
            synced_gpus=self.synced_gpus,
            **options,
        )
        # decoders return only the new tokens; encoder-decoders start with the decoder start token
        return output if decoder else output[:, 1:]

    def _rank(self, batch, pair_log_probs: tuple[torch.Tensor, torch.Tensor]) -> ScoreOutput:
        token_log_probs, valid = pair_log_probs
        totals = token_log_probs.sum(-1)
        loss = -totals.sum() / valid.sum()
        scores = totals / valid.sum(-1) if self.reduction == "mean" else totals
        rows = batch["labels"].shape[0]
        table = scores.new_full((rows, int(batch["num_choices"])), float("-inf"))
        table[batch["pair_row"], batch["pair_choice"]] = scores
        return ScoreOutput(loss, table)


def match_candidates(batch: dict[str, torch.Tensor], generated: torch.Tensor) -> ScoreOutput:
    """Map each row's generated tokens to a candidate answer: one the generation starts with (the longest
    if several); failing that, the one sharing the longest start with it (ties to the first), so every
    row gets a class. The table holds those match lengths in place of log-probabilities."""
    targets, valid = batch["targets"], batch["targets"] != IGNORE
    rows, width = batch["labels"].shape[0], targets.shape[1]
    table = torch.full((rows, int(batch["num_choices"])), float("-inf"))
    for pair, (row, choice) in enumerate(zip(batch["pair_row"].tolist(), batch["pair_choice"].tolist())):
        candidate = targets[pair][valid[pair]].tolist()
        answer = generated[row].tolist()
        shared = next(
            (i for i, (a, b) in enumerate(zip(answer, candidate)) if a != b), min(len(answer), len(candidate))
        )
        table[row, choice] = shared + (width + 1 if shared == len(candidate) else 0)
    return ScoreOutput(table.new_zeros(()), table.to(generated.device))


def head_classes(head: nn.Module) -> int:
    """How many classes a head scores: the output size of its last linear layer."""
    return [module for module in head.modules() if isinstance(module, nn.Linear)][-1].out_features


def _token_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target token) at each scored position, zero where the target is padding."""
    valid = targets != IGNORE
    logits = logits.float()
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    log_probs = (picked - logits.logsumexp(-1)) * valid
    return log_probs, valid
