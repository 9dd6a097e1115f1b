"""ROUGE-L F-measure of generated texts through Google's rouge_score package (0-100).

Each input scores against its best reference (`score_multi`: the reference of highest F-measure);
the corpus score is the mean over inputs. Porter stemming needs no nltk data, so this runs offline.
`per_row=True` gives each input's score instead of the mean.

Standalone on purpose: `evaluate.load` copies only this file into its modules cache.
"""

import sys

import datasets
import evaluate
from absl import logging as absl_logging
from rouge_score import rouge_scorer, tokenizers

# rouge_score imports absl, whose log handler keeps the sys.stderr of its import and closes that stream whenever
# logging is configured anew (Hydra does, at every run) unless it is the interpreter's own: give it that one, so a
# stream replaced later (a notebook's, a test's capture) is never closed under its owner
absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__


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
        # the scorer's own default tokenizer, given explicitly: built implicitly, it is announced through absl's
        # logging.info, which installs a handler on the root logger of a process that has none
        scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=tokenizers.DefaultTokenizer(use_stemmer=True))
        rows = [100 * scorer.score_multi(refs, p)["rougeL"].fmeasure for p, refs in zip(predictions, references)]
        return {"rouge_l": rows if per_row else sum(rows) / len(rows)}
