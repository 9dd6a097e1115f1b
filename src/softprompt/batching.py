"""Batching: examples to token ids, and token ids to padded tensors laid out for each scorer.

Batches are padded to their own longest row (dynamic padding), never to a fixed length.
For rank classification every (row, candidate) pair is scored; at training time only the gold
candidate's pair is built, since the loss needs nothing else. A decoder's training pair is one
sequence (input then answer); at evaluation each row's input appears once and all of its
candidates are scored on top of it (the input's keys and values computed once, not per candidate).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from softprompt.errors import ConfigError
from softprompt.task import Example

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    candidate_ids: list[list[int]]
    label: int
    token_type_ids: list[int] | None = None
    group: Any = None
    index: int = 0
    # which prompt of a prompt bank this row uses (always 0 for a single-prompt run)
    prompt: int = 0


def candidate_tokens(tokenizer: PreTrainedTokenizerBase, kind: str, text: str, ended: bool = False) -> list[int]:
    """Answer tokens as the LM scores them: a continuation for decoders, a target ending in EOS for seq2seq.
    `ended`: a decoder's answer ends in EOS too (a written answer, which the model must learn to stop)."""
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if kind == "decoder":
        ids = tokenizer(" " + text, add_special_tokens=False)["input_ids"]
        return ids + ([end] if ended and end is not None else [])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + ([end] if end is not None else [])


def verbalizer_tokens(tokenizer: PreTrainedTokenizerBase, kind: str, words: list[str]) -> list[list[int]]:
    """Token ids of each verbalizer word; a word that tokenizes to nothing is a config error."""
    result = []
    for word in words:
        ids = tokenizer(" " + word if kind == "decoder" else word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError("task.verbalizer", word, "words that tokenize to at least one token")
        result.append(ids)
    return result


def encode(
    examples: list[Example],
    tokenizer: PreTrainedTokenizerBase,
    kind: str,
    scorer: str,
    max_length: int,
) -> list[Encoded]:
    """Tokenize once, up front; decoders keep the end of a long input, where the answer cue is (cut by a
    copy of the tokenizer, so the caller's keeps its own truncation side)."""
    if kind == "decoder" and tokenizer.truncation_side != "left":
        tokenizer = copy.copy(tokenizer)
        tokenizer.truncation_side = "left"
    texts = [example.text for example in examples]
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    candidate_cache: dict[str, list[int]] = {}
    result = []
    for index, example in enumerate(examples):
        candidates = []
        if scorer != "head":
            for text in example.candidates:
                if text not in candidate_cache:
                    candidate_cache[text] = candidate_tokens(tokenizer, kind, text, example.references is not None)
                    if not candidate_cache[text]:
                        raise ConfigError("task.verbalizer", text, "answers that tokenize to at least one token")
                candidates.append(candidate_cache[text])
        result.append(
            Encoded(
                input_ids=encoded["input_ids"][index],
                candidate_ids=candidates,
                label=example.label,
                token_type_ids=encoded["token_type_ids"][index] if "token_type_ids" in encoded else None,
                group=example.group,
                index=index,
            )
        )
    return result


def _pad(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor(
        [[value] * (width - len(row)) + row if left else row + [value] * (width - len(row)) for row in rows]
    )


def _mask(rows: list[list[int]], left: bool = False) -> torch.Tensor:
    return _pad([[1] * len(row) for row in rows], 0, left)


class Collator:
    """Turns a list of Encoded rows into the tensors one scorer's forward expects. `written`: evaluation of a
    generation task, where each row's input alone is laid out for the model to write after it."""

    def __init__(self, kind: str, scorer: str, pad_token_id: int, all_candidates: bool, written: bool = False):
        self.kind, self.scorer, self.pad, self.all_candidates = kind, scorer, pad_token_id, all_candidates
        self.written = written and all_candidates

    def __call__(self, rows: list[Encoded]) -> dict[str, torch.Tensor]:
        batch = {
            "labels": torch.tensor([row.label for row in rows]),
            "index": torch.tensor([row.index for row in rows]),
            "prompt_index": torch.tensor([row.prompt for row in rows]),
        }
        if self.scorer == "head":
            batch["input_ids"] = _pad([row.input_ids for row in rows], self.pad)
            batch["attention_mask"] = _mask([row.input_ids for row in rows])
            if rows[0].token_type_ids is not None:
                batch["token_type_ids"] = _pad([row.token_type_ids for row in rows], 0)
            return batch
        if self.written:
            inputs = [row.input_ids for row in rows]
            left = self.kind == "decoder"
            batch["query_ids" if left else "input_ids"] = _pad(inputs, self.pad, left=left)
            batch["query_mask" if left else "attention_mask"] = _mask(inputs, left=left)
            return batch
        pairs = [
            (number, choice)
            for number, row in enumerate(rows)
            for choice in (range(len(row.candidate_ids)) if self.all_candidates else [row.label])
        ]
        targets = [rows[number].candidate_ids[choice] for number, choice in pairs]
        batch["pair_row"] = torch.tensor([number for number, _ in pairs])
        batch["pair_choice"] = torch.tensor([choice for _, choice in pairs])
        batch["num_choices"] = torch.tensor(max(len(row.candidate_ids) for row in rows))
        if self.kind == "decoder" and self.scorer == "rank" and self.all_candidates:
            # evaluation: each row's input once, left-padded; its candidates are scored on top of it
            batch["input_ids"] = _pad([row.input_ids for row in rows], self.pad, left=True)
            batch["attention_mask"] = _mask([row.input_ids for row in rows], left=True)
            batch["answer_ids"] = _pad(targets, self.pad)
            batch["targets"] = _pad(targets, IGNORE)
        elif self.kind == "decoder":
            # input and answer in one left-padded sequence: every answer ends at the last position
            sequences = [rows[number].input_ids + target for (number, _), target in zip(pairs, targets)]
            batch["input_ids"] = _pad(sequences, self.pad, left=True)
            batch["attention_mask"] = _mask(sequences, left=True)
            batch["targets"] = _pad(targets, IGNORE, left=True)
            if self.scorer == "generate" and self.all_candidates:
                # the inputs alone, for the model to write its answer after them
                batch["query_ids"] = _pad([row.input_ids for row in rows], self.pad, left=True)
                batch["query_mask"] = _mask([row.input_ids for row in rows], left=True)
        else:
            batch["input_ids"] = _pad([row.input_ids for row in rows], self.pad)
            batch["attention_mask"] = _mask([row.input_ids for row in rows])
            batch["targets"] = _pad(targets, IGNORE)
        return batch
