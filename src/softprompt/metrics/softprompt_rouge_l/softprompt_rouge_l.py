"""ROUGE-L F-measure of generated texts through Google's rouge_score package (0-100).

Each input scores against its best reference (`score_multi`: the reference of highest F-measure);
the corpus score is the mean over inputs. Porter stemming needs no nltk data, so this runs offline.
`per_row=True` gives each input's score instead of the mean.

Standalone on purpose: `evaluate.load` copies only this file into its modules cache.
"""

import datasets
import evaluate
from rouge_score import rouge_scorer


class SoftpromptRougeL(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="ROUGE-L F-measure with stemming, best reference per input, mean over inputs (0-100).",
            citation="",
            inputs_description="predictions: one generated text per input; references: one or more reference texts per input.",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references, per_row=False) -> dict:
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        rows = [100 * scorer.score_multi(refs, p)["rougeL"].fmeasure for p, refs in zip(predictions, references)]
        return {"rouge_l": rows if per_row else sum(rows) / len(rows)}
