"""Task metrics as Hugging Face `evaluate` modules shipped inside this package, never fetched from the hub.

Each metric is a folder `softprompt_<name>/softprompt_<name>.py` next to this file, loaded with
`evaluate.load(<absolute path>)`: the path does not depend on the working directory, and loading reads
no network. `evaluate` copies the script into its modules cache (`HF_MODULES_CACHE`, by default
`~/.cache/huggingface/modules`) under its own file lock, so processes that load at the same time
(pytest workers, torchrun ranks) share one copy safely.

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

METRICS: tuple[str, ...] = ("accuracy", "f1", "f1_macro", "mcc", "cb", "multirc")

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
    predictions: Collection[int],
    references: Collection[int],
    groups: Collection[int] | None = None,
) -> dict[str, float]:
    """Score gathered predictions with each named metric; one flat dict of plain floats.

    Predictions and references are class ids (lists, numpy arrays or CPU tensors). Keys: `accuracy`,
    `f1`, `f1_macro`, `mcc`, `cb`, and for `multirc` the three keys `multirc_f1a`, `multirc_em` and
    `multirc` (their mean). `groups` is the question id of each prediction, required by `multirc` only.
    """
    if len(predictions) == 0:
        raise ValueError("compute_metrics got no predictions: a metric of zero examples is undefined")
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
