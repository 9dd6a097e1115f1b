"""Binary F1 of the positive class (label 1), as GLUE reports it for MRPC.

Standalone on purpose: `evaluate.load` copies only this file into its modules cache.
"""

import datasets
import evaluate
from sklearn.metrics import f1_score


class SoftpromptF1(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="F1 of the positive class (label 1); 0.0 when it has no true or predicted positives.",
            citation="",
            inputs_description="predictions, references: class ids (int), 1 is the positive class.",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            format="numpy",
        )

    def _compute(self, predictions, references) -> dict:
        return {"f1": float(f1_score(references, predictions, pos_label=1, average="binary", zero_division=0.0))}
