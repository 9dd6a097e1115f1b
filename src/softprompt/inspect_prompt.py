"""softprompt-inspect: read a learned prompt through its nearest vocabulary tokens (Lester et al. 2021, section 7).

For each prompt position, the k tokens whose input embeddings have the highest cosine
similarity to it; and how many positions have a verbalizer token among those neighbours,
the paper's sign that prompts learn to point at the class labels.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pandas as pd
import torch

from softprompt.backbone import load_backbone
from softprompt.batching import candidate_tokens
from softprompt.errors import UserError, exit_on_user_error
from softprompt.prompt_bank import load_entry
from softprompt.soft_prompt import frequency_ranked_ids


def nearest_tokens(
    prompt: torch.Tensor, embeddings: torch.Tensor, k: int, allowed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, k) token ids and cosine similarities, searching only the `allowed` ids."""
    vocab = torch.nn.functional.normalize(embeddings[allowed].float(), dim=-1)
    similarity = torch.nn.functional.normalize(prompt.float(), dim=-1) @ vocab.T
    values, order = similarity.topk(min(k, len(allowed)), dim=-1)
    return allowed[order], values


def inspect_run(run_dir: Path, k: int) -> tuple[pd.DataFrame, int]:
    entry = load_entry(run_dir.name, run_dir)
    backbone = load_backbone(entry.cfg.model, entry.task.num_classes if entry.head_state else None)
    if entry.prompt.shape[1] != backbone.width:
        raise UserError(
            f"{run_dir}: prompt width {entry.prompt.shape[1]} does not match the model width {backbone.width}"
        )
    tokenizer = backbone.tokenizer
    # every ordinary token (specials, placeholders and byte fallbacks never explain a prompt)
    allowed = frequency_ranked_ids(tokenizer, len(tokenizer))
    weights = backbone.model.get_input_embeddings().weight.detach()
    ids, similarity = nearest_tokens(entry.prompt, weights, k, allowed)
    label_ids = {
        token
        for word in entry.task.verbalizer
        for token in candidate_tokens(tokenizer, backbone.kind, word)
        + tokenizer(word, add_special_tokens=False)["input_ids"]
    } - set(tokenizer.all_special_ids)
    rows = []
    for position in range(ids.shape[0]):
        tokens = ids[position].tolist()
        rows.append(
            {
                "position": position,
                "neighbours": " ".join(tokenizer.convert_ids_to_tokens(tokens)),
                "similarities": " ".join(f"{value:.3f}" for value in similarity[position].tolist()),
                "verbalizer_neighbour": bool(label_ids & set(tokens)),
            }
        )
    table = pd.DataFrame(rows)
    return table, int(table["verbalizer_neighbour"].sum())


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="softprompt-inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (holding prompt/ and .hydra/)")
    parser.add_argument("-k", type=int, default=5, help="neighbours per position")
    parser.add_argument("--output", type=Path, help="CSV file (default RUN_DIR/inspect.csv)")
    args = parser.parse_args(argv)
    if args.k < 1:
        raise UserError(f"-k={args.k} is not allowed: a number >= 1")
    table, with_label = inspect_run(args.run_dir, args.k)
    output = args.output or args.run_dir / "inspect.csv"
    temporary = output.with_name(f".{output.name}.tmp")
    try:
        table.to_csv(temporary, index=False)
    except OSError as error:
        raise UserError(f"--output {str(output)!r} cannot be written ({error.strerror})") from None
    os.replace(temporary, output)
    print(table.to_string(index=False))
    print(
        f"{with_label} of {len(table)} positions have a verbalizer token among their {args.k} nearest neighbours -> {output}"
    )


if __name__ == "__main__":
    main()
