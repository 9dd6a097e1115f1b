"""Task metrics as Hugging Face `evaluate` modules shipped inside this package, never fetched from the hub.

Each metric is a folder `softprompt_<name>/softprompt_<name>.py` next to this file, loaded with
`evaluate.load(<absolute path>)`: the path does not depend on the working directory, and loading reads
no network. `evaluate` copies the script into its modules cache (`HF_MODULES_CACHE`, by default
`~/.cache/huggingface/modules`) under its own file lock, so processes that load at the same time
(pytest workers, torchrun ranks) share one copy safely.

Classification metrics take class ids; the text metrics (`TEXT_METRICS`, for generation tasks) take
one generated text per input and one or more reference texts per input, and score on 0-100 as
sacrebleu and the official SQuAD script report them. `row_scores` gives the text metrics per input.

`compute_metrics` runs on predictions that are already gathered (Accelerate's `gather_for_metrics`)
and is called on the main process only. evaluate's own distributed mode (`num_process`/`process_id`,
with arrow cache files and lock-file rendezvous between ranks) is deliberately not used: the modules
are loaded with `keep_in_memory=True`, so computing writes no cache files and concurrent runs never
contend for them.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from softprompt.errors import ConfigError

if TYPE_CHECKING:
    import evaluate

METRICS: tuple[str, ...] = ("accuracy", "f1", "f1_macro", "mcc", "cb", "multirc", "bleu", "rouge_l", "squad", "gsm8k")
TEXT_METRICS: tuple[str, ...] = ("bleu", "rouge_l", "squad", "gsm8k")
METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "accuracy": ("accuracy",),
    "f1": ("f1",),
    "f1_macro": ("f1_macro",),
    "mcc": ("mcc",),
    "cb": ("cb",),
    "multirc": ("multirc_f1a", "multirc_em", "multirc"),
    "bleu": ("bleu",),
    "rouge_l": ("rouge_l",),
    "squad": ("exact_match", "f1"),
    "gsm8k": ("exact_match",),
}

_MODULES_DIR = Path(__file__).resolve().parent


@functools.cache
def load_metric(name: str) -> evaluate.EvaluationModule:
    """Load the shipped metric module `name`, once per process (later calls return the same instance).

    `evaluate` is imported here, not at module level: it takes seconds, and config checks that
    only need METRICS should not pay for it.
    """
    import evaluate

    if name not in METRICS:
        raise ConfigError("task.metrics", name, f"one of: {', '.join(METRICS)}")
    return evaluate.load(str(_MODULES_DIR / f"softprompt_{name}"), keep_in_memory=True)


def compute_metrics(
    names: Sequence[str],
    predictions: Collection[int] | Sequence[str],
    references: Collection[int] | Sequence[Sequence[str]],
    groups: Collection[int] | None = None,
) -> dict[str, float]:
    """Score gathered predictions with each named metric; one flat dict of plain floats.

    For the classification metrics, predictions and references are class ids (lists, numpy arrays or
    CPU tensors); for the text metrics, predictions are texts and references a list of reference
    texts per prediction. `METRIC_KEYS` names each metric's keys: for `multirc` the three keys
    `multirc_f1a`, `multirc_em` and `multirc` (their mean), for `squad` `exact_match` and `f1`.
    Text metrics are on 0-100, the others fractions. `groups` is the question id of each
    prediction, required by `multirc` only.
    """
    if len(predictions) == 0:
        raise ValueError("compute_metrics got no predictions: a metric of zero examples is undefined")
    _check_inputs(names, references)
    scores: dict[str, float] = {}
    for name in names:
        inputs = {"predictions": predictions, "references": references}
        if name == "multirc":
            if groups is None:
                raise ValueError("metric 'multirc' needs groups: the question id of each prediction")
            inputs["groups"] = groups
        result = load_metric(name).compute(**inputs)
        scores.update({key: float(value) for key, value in result.items()})
    return scores


def row_scores(
    names: Sequence[str], predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> list[dict[str, float]]:
    """Per-input scores of the named text metrics: one dict per prediction, keyed as `compute_metrics` keys them.

    Computed by the same modules as the corpus scores (their `per_row` mode), e.g. BLEU per row is
    sacrebleu's sentence BLEU. ROUGE-L, SQuAD and GSM8K corpus scores are the means of these.
    """
    if len(predictions) == 0:
        raise ValueError("row_scores got no predictions")
    not_text = [name for name in names if name not in TEXT_METRICS]
    if not_text:
        raise ValueError(f"row_scores scores text metrics only ({', '.join(TEXT_METRICS)}), not: {', '.join(not_text)}")
    _check_inputs(names, references)
    rows: list[dict[str, float]] = [{} for _ in predictions]
    for name in names:
        result = load_metric(name).compute(predictions=predictions, references=references, per_row=True)
        for key, values in result.items():
            for row, value in zip(rows, values, strict=True):
                row[key] = float(value)
    return rows


def _check_inputs(names: Sequence[str], references: Collection) -> None:
    """Refuse what would score wrong or fail obscurely: two metrics writing one key, text references not in lists.

    A bare string as a row's references would be read as a list of its characters; an empty list
    leaves nothing to score against.
    """
    owners: dict[str, str] = {}
    for name in names:
        for key in METRIC_KEYS.get(name, ()):
            if key in owners and owners[key] != name:
                raise ValueError(
                    f"metrics {owners[key]!r} and {name!r} both report {key!r}: score them in separate calls"
                )
            owners[key] = name
    if any(name in TEXT_METRICS for name in names):
        if any(isinstance(refs, str) for refs in references):
            raise ValueError("text metrics take a list of reference texts per prediction, got a bare string")
        if any(len(refs) == 0 for refs in references):
            raise ValueError("text metrics need at least one reference text per prediction, got an empty list")


def superglue_average(scores: Mapping[str, float]) -> float:
    """The SuperGLUE score: the unweighted mean of one number per task.

    `scores` maps task name -> that task's score already combined to one number, on one scale (all
    fractions or all percentages). Tasks that report two numbers are combined first, as
    `compute_metrics` already does: CB is `cb` (mean of accuracy and macro F1), MultiRC is `multirc`
    (mean of F1a and EM), ReCoRD the mean of its F1 and EM; BoolQ, COPA, RTE, WiC and WSC are accuracy.
    The leaderboard averages those eight tasks and leaves out the diagnostics (AX-b, AX-g): pass only
    the tasks to average; every value given counts once.
    """
    if not scores:
        raise ValueError("superglue_average needs at least one task score")
    return sum(float(score) for score in scores.values()) / len(scores)
