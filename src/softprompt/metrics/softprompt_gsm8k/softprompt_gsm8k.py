"""GSM8K accuracy: exact match of the final number (0-100).

A text's final number is the first number after its last `####` (how GSM8K answers end), else its
last number, so a plain number reference works too. Commas, a leading `$` and a trailing `.` are
dropped and the values compared as numbers, so "18", "18.0" and "$18" agree. A prediction with no
number is wrong; a reference with none is an error. `per_row=True` gives each input's score instead
of the mean.

Standalone on purpose: `evaluate.load` copies only this file into its modules cache.
"""

import re

import datasets
import evaluate

# A minus sign counts only where it cannot be subtraction ("9-2" is 9 and 2, "-2" is minus two).
_NUMBER = re.compile(r"(?:(?<![\w)])-)?\$?\d[\d,]*(?:\.\d+)?")


def final_number(text):
    """The final number of `text` as a float, or None when it has none."""
    _, marker, tail = text.rpartition("####")
    numbers = _NUMBER.findall(tail)
    if not numbers:
        return None
    number = numbers[0] if marker else numbers[-1]
    return float(number.replace(",", "").replace("$", ""))


class SoftpromptGsm8k(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Exact match of the final number of the prediction and of a reference (0-100).",
            citation="",
            inputs_description="predictions: one generated solution per input; references: answers ending in '#### <number>', or plain numbers.",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references, per_row=False) -> dict:
        rows = []
        for prediction, refs in zip(predictions, references):
            answers = [final_number(ref) for ref in refs]
            if None in answers:
                raise ValueError(f"gsm8k: a reference has no number: {refs!r}")
            rows.append(100.0 * (final_number(prediction) in answers))
        return {"exact_match": rows if per_row else sum(rows) / len(rows)}
