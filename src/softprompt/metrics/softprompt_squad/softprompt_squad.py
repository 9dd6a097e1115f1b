"""SQuAD v1.1 exact match and token F1, as the official evaluate-v1.1.py computes them (0-100).

Answers are normalised (lowercase, no punctuation, no articles a/an/the, single spaces) before
comparing; each input takes its best ground truth; the corpus scores are means over inputs.
`per_row=True` gives each input's scores instead of the means.

Standalone on purpose: `evaluate.load` copies only this file into its modules cache.
"""

import re
import string
from collections import Counter

import datasets
import evaluate


def normalize_answer(s):
    """Lower text and remove punctuation, articles and extra whitespace."""

    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def f1_score(prediction, ground_truth):
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def exact_match_score(prediction, ground_truth):
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
    return max(metric_fn(prediction, ground_truth) for ground_truth in ground_truths)


class SoftpromptSquad(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="SQuAD v1.1 exact match and token F1, best ground truth per input, mean over inputs (0-100).",
            citation="",
            inputs_description="predictions: one answer text per input; references: the ground-truth answers of each input.",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references, per_row=False) -> dict:
        exact_match = [
            100.0 * metric_max_over_ground_truths(exact_match_score, p, refs)
            for p, refs in zip(predictions, references)
        ]
        f1 = [100.0 * metric_max_over_ground_truths(f1_score, p, refs) for p, refs in zip(predictions, references)]
        if per_row:
            return {"exact_match": exact_match, "f1": f1}
        return {"exact_match": sum(exact_match) / len(exact_match), "f1": sum(f1) / len(f1)}
