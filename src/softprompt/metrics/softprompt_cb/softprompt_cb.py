"""CommitmentBank's SuperGLUE score: the mean of accuracy and macro F1 over its three classes.

Standalone on purpose: `evaluate.load` copies only this file into its modules cache.
"""

import datasets
import evaluate
from sklearn.metrics import accuracy_score, f1_score


class SoftpromptCb(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Mean of accuracy and macro F1, the single number SuperGLUE averages for CB.",
            citation="",
            inputs_description="predictions, references: class ids (int).",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            format="numpy",
        )

    def _compute(self, predictions, references) -> dict:
        accuracy = accuracy_score(references, predictions)
        f1_macro = f1_score(references, predictions, average="macro", zero_division=0.0)
        return {"cb": float((accuracy + f1_macro) / 2)}
