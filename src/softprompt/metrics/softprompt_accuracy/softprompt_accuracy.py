"""Accuracy: the fraction of predictions equal to their reference.

Standalone on purpose: `evaluate.load` copies only this file into its modules cache.
"""

import datasets
import evaluate
from sklearn.metrics import accuracy_score


class SoftpromptAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Fraction of predicted class ids equal to the reference class ids.",
            citation="",
            inputs_description="predictions, references: class ids (int).",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            format="numpy",
        )

    def _compute(self, predictions, references) -> dict:
        return {"accuracy": float(accuracy_score(references, predictions))}
