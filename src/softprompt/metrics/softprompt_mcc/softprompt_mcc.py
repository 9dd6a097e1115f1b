"""Matthews correlation coefficient, as GLUE reports it for CoLA and SuperGLUE for AX-b.

Standalone on purpose: `evaluate.load` copies only this file into its modules cache.
"""

import datasets
import evaluate
from sklearn.metrics import matthews_corrcoef


class SoftpromptMcc(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Matthews correlation between predicted and reference class ids; 0.0 when either is constant.",
            citation="",
            inputs_description="predictions, references: class ids (int).",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            format="numpy",
        )

    def _compute(self, predictions, references) -> dict:
        return {"mcc": float(matthews_corrcoef(references, predictions))}
