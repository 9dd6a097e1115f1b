"""softprompt-predict: serve many prompts from one frozen model.

Two uses:
- mixed batches: `--prompts NAME=RUN_DIR ... --input FILE` scores rows that each name their
  prompt (with one prompt, rows need not name it), every batch in one forward pass, and writes
  predictions with their scores;
- ensembles: `--ensemble RUN_DIR ...` (K prompts of one task, e.g. the seeds of a sweep) scores
  the task's validation rows with all K prompts in one batch and combines them by majority vote
  and by mean log-probability (Lester et al. 2021, section 6), writing `ensemble.json`.
"""

from __future__ import annotations

import argparse
import codecs
import logging
from collections import Counter
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from softprompt import run_dir as records
from softprompt.batching import Collator
from softprompt.errors import UserError, exit_on_user_error, folder_problem
from softprompt.metrics import compute_metrics, row_scores
from softprompt.prompt_bank import PromptBank
from softprompt.task import Example, read_file, read_split

log = logging.getLogger("softprompt.predict")


def parse_sources(items: list[str]) -> dict[str, str]:
    sources = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--prompts {item!r} is not allowed: NAME=RUN_DIR, e.g. sst2=outputs/runs/2026-01-01_sst2")
        if name in sources:
            raise UserError(f"--prompts names {name!r} twice: each prompt needs its own name")
        sources[name] = path
    return sources


def example_for(bank: PromptBank, index: int, row: dict, where: str) -> Example:
    """A row rendered by its prompt's task; the label (or a generation task's references) is optional: -1 (None)
    when the row has none."""
    task = bank.entries[index].task
    if task.generation:
        references = task.references(row, where) if task.cfg.target_field in row else None
        return Example(text=task.render(row, where), candidates=[], label=-1, references=references)
    label = task.label_index(row, where) if task.cfg.label_field in row else -1
    return Example(text=task.render(row, where), candidates=task.candidates(row), label=label)


def score_rows(
    bank: PromptBank, examples: list[Example], prompt_indices: list[int], batch_size: int, progress: bool = True
) -> torch.Tensor:
    """Log-probabilities (rows, choices) of every row under its own prompt, batch by batch."""
    rows = bank.encode(examples, prompt_indices)
    collate = Collator(bank.backbone.kind, bank.scorer, bank.backbone.tokenizer.pad_token_id, all_candidates=True)
    if bank.generation:
        raise ValueError("a generation bank writes answers (write_rows), it scores no classes")
    width = max(len(example.candidates) for example in examples)
    scores = torch.full((len(rows), width), float("-inf"))
    for batch in tqdm(
        DataLoader(rows, batch_size=batch_size, collate_fn=collate), desc="predict", disable=not progress
    ):
        batch_scores = bank.score(batch)
        scores[batch["index"], : batch_scores.shape[1]] = batch_scores
    return scores


def write_rows(
    bank: PromptBank, examples: list[Example], prompt_indices: list[int], batch_size: int, progress: bool = True
) -> list[str]:
    """Every row's answer under its own prompt, batch by batch (rows sorted by length: little padding)."""
    rows = sorted(bank.encode(examples, prompt_indices), key=lambda row: len(row.input_ids))
    collate = Collator(bank.backbone.kind, bank.scorer, bank.backbone.tokenizer.pad_token_id, True, written=True)
    answers = [""] * len(rows)
    for batch in tqdm(DataLoader(rows, batch_size=batch_size, collate_fn=collate), desc="write", disable=not progress):
        for index, text in zip(batch["index"].tolist(), bank.write(batch)):
            answers[index] = text
    return answers


def written_records(
    bank: PromptBank, rows: list[dict], indices: list[int], examples: list[Example], batch_size: int, progress: bool
) -> tuple[list[dict], dict[str, tuple[str, float]]]:
    """Generation prompts: each row with its answer, and with its scores where the row holds references."""
    answers = write_rows(bank, examples, indices, batch_size, progress)
    records_out, by_prompt = [], {}
    for row, index, example, answer in zip(rows, indices, examples, answers):
        record = {**row, "prediction": answer}
        if example.references is not None:
            by_prompt.setdefault(index, []).append((answer, example.references, len(records_out)))
        records_out.append(record)
    scores = {}
    for index, scored in by_prompt.items():
        metrics = bank.entries[index].cfg.task.metrics
        texts, references, positions = zip(*scored)
        for position, row_score in zip(positions, row_scores(metrics, list(texts), list(references))):
            records_out[position]["scores"] = row_score
        main = bank.entries[index].cfg.task.main_metric
        scores[bank.names[index]] = (main, compute_metrics(metrics, list(texts), list(references))[main])
    return records_out, scores


def scored_records(
    bank: PromptBank, rows: list[dict], indices: list[int], examples: list[Example], batch_size: int, progress: bool
) -> tuple[list[dict], dict[str, tuple[str, float]]]:
    """Classification prompts: each row with its predicted label (a choice's index for choice tasks) and every
    class's log-probability; per prompt, the accuracy on the rows that hold a label."""
    scores = score_rows(bank, examples, indices, batch_size, progress)
    predictions = scores.argmax(-1).tolist()
    records_out = []
    correct: Counter = Counter()
    counted: Counter = Counter()
    for row, index, example, prediction, scored in zip(rows, indices, examples, predictions, scores.tolist()):
        task = bank.entries[index].task
        names = example.candidates if task.cfg.choices_fields else [str(label) for label in task.labels]
        records_out.append(
            {
                **row,
                "prediction": names[prediction] if not task.cfg.choices_fields else prediction,
                "scores": {name: scored[i] for i, name in enumerate(names)},
            }
        )
        if example.label >= 0:
            counted[bank.names[index]] += 1
            correct[bank.names[index]] += int(prediction == example.label)
    return records_out, {name: ("accuracy", correct[name] / counted[name]) for name in counted}


def predict_rows(
    bank: PromptBank, rows: list[dict], indices: list[int], examples: list[Example], batch_size: int, progress: bool
) -> tuple[list[dict], dict[str, tuple[str, float]]]:
    """Every row with its prediction under its own prompt; per prompt, the metric reported for its rows and its value
    (rows that hold an answer only)."""
    return (written_records if bank.generation else scored_records)(bank, rows, indices, examples, batch_size, progress)


def predict_file(
    bank: PromptBank, input_path: Path, output_path: Path, prompt_field: str, batch_size: int, encoding: str = "utf-8"
) -> dict:
    rows = read_file(input_path, None, encoding, option="--encoding")
    indices, examples = [], []
    for number, row in enumerate(rows, start=1):
        where = f"{input_path}, row {number}"
        if prompt_field in row:
            index = bank.index(str(row[prompt_field]))
        elif len(bank.names) == 1:
            # one prompt serves every row: the task's own files (SST-2's dev.tsv) are input as they are
            index = 0
        else:
            raise UserError(
                f"{where}: no {prompt_field!r} column naming the row's prompt (one of: {', '.join(bank.names)})"
            )
        indices.append(index)
        examples.append(example_for(bank, index, row, where))
    predicted, scores = predict_rows(bank, rows, indices, examples, batch_size, progress=True)
    records.write_jsonl(output_path, predicted)
    return scores


def evaluate_ensemble(bank: PromptBank, batch_size: int) -> dict:
    """Each validation row scored by all K prompts in one batch; per-prompt, vote and mean-log-prob metrics."""
    if bank.generation:
        raise UserError(
            "--ensemble combines the class scores of classification prompts; a generation prompt's "
            "answers are served with --prompts NAME=RUN_DIR --input FILE"
        )
    task_names = {entry.cfg.task.name for entry in bank.entries}
    if len(task_names) > 1:
        raise UserError(f"an ensemble needs prompts of one task; these are for {', '.join(sorted(task_names))}")
    entry = bank.entries[0]
    rows, _ = read_split(entry.cfg.task, "validation")
    if entry.cfg.task.max_eval_rows is not None:
        rows = rows[: entry.cfg.task.max_eval_rows]
    base = [example_for(bank, 0, row, f"validation, row {n}") for n, row in enumerate(rows, start=1)]
    k = len(bank.entries)
    examples = [example for example in base for _ in range(k)]
    indices = [index for _ in base for index in range(k)]
    scores = score_rows(bank, examples, indices, batch_size * k).view(len(base), k, -1)
    references = [example.label for example in base]
    metric_names = entry.cfg.task.metrics
    groups = [row.get(entry.cfg.task.group_field) for row in rows] if entry.cfg.task.group_field else None
    per_prompt = {
        name: compute_metrics(metric_names, scores[:, i].argmax(-1).tolist(), references, groups)
        for i, name in enumerate(bank.names)
    }
    votes = scores.argmax(-1)
    # majority vote; a tie goes to the class with the higher mean log-probability
    counts = torch.nn.functional.one_hot(votes, scores.shape[-1]).sum(1).float()
    vote = (counts + 1e-3 * scores.mean(1).softmax(-1)).argmax(-1)
    mean_log_prob = scores.mean(1).argmax(-1)
    main = entry.cfg.task.main_metric
    values = [metrics[main] for metrics in per_prompt.values()]
    return {
        "task": entry.cfg.task.name,
        "model": entry.cfg.model.name,
        "main_metric": main,
        "prompts": {name: str(e.run_dir) for name, e in zip(bank.names, bank.entries)},
        "per_prompt": per_prompt,
        "mean": sum(values) / len(values),
        "best": max(values),
        "vote": compute_metrics(metric_names, vote.tolist(), references, groups),
        "mean_log_prob": compute_metrics(metric_names, mean_log_prob.tolist(), references, groups),
        "eval_examples": len(base),
    }


def check_output(output: Path, folder: bool) -> None:
    """--output can be written: checked before any model loads, so a path under a file costs no work."""
    problem = folder_problem(output if folder else output.parent)
    if problem is None and not folder and output.is_dir():
        problem = f"{output} is a folder"
    if problem:
        what = "a folder for ensemble.json" if folder else "a predictions file"
        raise UserError(f"--output {output}: cannot be {what} ({problem}); give another --output")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="softprompt-predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", nargs="+", metavar="NAME=RUN_DIR", help="prompts to serve, each named")
    parser.add_argument("--input", type=Path, help="CSV, TSV or JSON lines; each row names its prompt")
    parser.add_argument("--output", type=Path, help="predictions file (.jsonl), or folder for ensemble.json")
    parser.add_argument("--prompt-field", default="prompt", help="the input column naming each row's prompt")
    parser.add_argument(
        "--ensemble", nargs="+", metavar="RUN_DIR", help="runs of one task to ensemble on its validation split"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--encoding", default="utf-8", help="text encoding of the --input file (latin-1, cp1252, ...)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.batch_size < 1:
        raise UserError(f"--batch-size={args.batch_size} is not allowed: a number >= 1")
    if bool(args.ensemble) == bool(args.prompts):
        raise UserError("give either --prompts NAME=RUN_DIR ... with --input FILE, or --ensemble RUN_DIR ...")
    try:
        codecs.lookup(args.encoding)
    except LookupError:
        raise UserError(
            f"--encoding {args.encoding} is not allowed: a text encoding (utf-8, latin-1, cp1252, ...)"
        ) from None
    if args.ensemble:
        output = args.output or Path(args.ensemble[0]).resolve().parent
        check_output(output, folder=True)
        bank = PromptBank.load({Path(path).name or path: path for path in args.ensemble})
        result = evaluate_ensemble(bank, args.batch_size)
        records.write_json(output / records.ENSEMBLE, result)
        main_metric = result["main_metric"]
        print(
            f"{result['task']} ({len(bank.names)} prompts): mean {result['mean']:.4f}, best {result['best']:.4f}, "
            f"vote {result['vote'][main_metric]:.4f}, mean log-prob {result['mean_log_prob'][main_metric]:.4f} -> {output / records.ENSEMBLE}"
        )
        return
    sources = parse_sources(args.prompts)
    if args.input is None:
        raise UserError("--input FILE is required with --prompts")
    output = args.output or args.input.with_name(args.input.stem + ".predictions.jsonl")
    check_output(output, folder=False)
    bank = PromptBank.load(sources)
    scores = predict_file(bank, args.input, output, args.prompt_field, args.batch_size, args.encoding)
    summary = ", ".join(f"{name} {metric} {value:.4f}" for name, (metric, value) in scores.items())
    print(f"wrote {output}" + (f" ({summary})" if summary else ""))


if __name__ == "__main__":
    main()
