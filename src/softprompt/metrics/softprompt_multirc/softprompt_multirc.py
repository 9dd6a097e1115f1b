"""MultiRC's SuperGLUE scores: F1 over all answer options (F1a), exact match over questions (EM), and their mean.

Each prediction is one answer option labelled true (1) or false (0); `groups` holds its question id, so
a question counts for EM only when every one of its options is right.

Standalone on purpose: `evaluate.load` copies only this file into its modules cache.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import f1_score


class SoftpromptMultirc(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="MultiRC F1a (binary F1 over all answer options), EM (questions with all options right) and their mean.",
            citation="",
            inputs_description="predictions, references: answer-option labels (int, 1 = true); groups: question id per option (int).",
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                    "groups": datasets.Value("int64"),
                }
            ),
            format="numpy",
        )

    def _compute(self, predictions, references, groups) -> dict:
        f1a = float(f1_score(references, predictions, pos_label=1, average="binary", zero_division=0.0))
        questions, question_of_option = np.unique(groups, return_inverse=True)
        wrong_options = np.bincount(question_of_option, weights=predictions != references, minlength=len(questions))
        em = float(np.mean(wrong_options == 0))
        return {"multirc_f1a": f1a, "multirc_em": em, "multirc": (f1a + em) / 2}
