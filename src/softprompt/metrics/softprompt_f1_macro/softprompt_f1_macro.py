"""Macro F1: the unweighted mean of per-class F1, over the classes seen in predictions or references.

Standalone on purpose: `evaluate.load` copies only this file into its modules cache.
"""

import datasets
import evaluate
from sklearn.metrics import f1_score


class SoftpromptF1Macro(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Unweighted mean of the per-class F1 scores.",
            citation="",
            inputs_description="predictions, references: class ids (int).",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            format="numpy",
        )

    def _compute(self, predictions, references) -> dict:
        return {"f1_macro": float(f1_score(references, predictions, average="macro", zero_division=0.0))}
