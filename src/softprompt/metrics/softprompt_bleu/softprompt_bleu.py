"""BLEU of generated texts against one or more references each, through sacrebleu (0-100).

The corpus score is sacrebleu's `corpus_bleu` with its defaults (13a tokenizer, exp smoothing), so
it matches what papers report with sacrebleu. sacrebleu takes references as streams (the k-th
reference of every input); an input with fewer references fills its missing streams with None,
which sacrebleu skips. `per_row=True` gives each input's `sentence_bleu` instead.

Standalone on purpose: `evaluate.load` copies only this file into its modules cache.
"""

import datasets
import evaluate
import sacrebleu


class SoftpromptBleu(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Corpus BLEU (sacrebleu defaults, 0-100); per row, sentence BLEU.",
            citation="",
            inputs_description="predictions: one generated text per input; references: one or more reference texts per input.",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references, per_row=False) -> dict:
        if per_row:
            return {"bleu": [sacrebleu.sentence_bleu(p, refs).score for p, refs in zip(predictions, references)]}
        streams = max(len(refs) for refs in references)
        padded = [list(refs) + [None] * (streams - len(refs)) for refs in references]
        return {"bleu": sacrebleu.corpus_bleu(predictions, [list(stream) for stream in zip(*padded)]).score}
