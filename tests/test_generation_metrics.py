"""Text-generation metrics against their reference implementations' own known values, and per-row scores."""

from __future__ import annotations

import json
import socket

import pytest
import sacrebleu

from helpers import data_dir
from softprompt.metrics import METRIC_KEYS, METRICS, TEXT_METRICS, compute_metrics, load_metric, row_scores

# sacrebleu's README example, with its expected corpus BLEU from sacrebleu's test/test_bleu.py
# (test_corpus_bleu_cases: default settings 48.530827; empty hypotheses 0.0). sacrebleu takes the
# references as streams; the rows here are the same references per input.
README_STREAMS = [
    ["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
    ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."],
]
README_HYPS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
README_ROWS = [list(refs) for refs in zip(*README_STREAMS)]

# sacrebleu's test/test_sentence_bleu.py (its issue #98): exp smoothing, 13a tokens -> 8.493 (to 1e-3).
SENTENCE_REF = "producţia de zahăr brut se exprimă în zahăr alb;"
SENTENCE_SYS = "Producția de zahăr primă va fi exprimată în ceea ce privește zahărul alb;"


def test_corpus_bleu_matches_sacrebleus_readme_example():
    assert compute_metrics(["bleu"], README_HYPS, README_ROWS)["bleu"] == pytest.approx(48.530827, abs=1e-6)
    assert compute_metrics(["bleu"], ["", "", ""], README_ROWS) == {"bleu": 0.0}


def test_sentence_bleu_per_row_matches_sacrebleus_tests():
    rows = row_scores(["bleu"], [SENTENCE_SYS, "this is a cat"], [[SENTENCE_REF], ["okay thanks"]])
    # the second row is sacrebleu's issue #141 example, 0.0 under every smoothing
    assert rows[0]["bleu"] == pytest.approx(8.493, abs=1e-3)
    assert rows[1] == {"bleu": 0.0}
    readme = row_scores(["bleu"], README_HYPS, README_ROWS)
    assert [row["bleu"] for row in readme] == pytest.approx(
        [sacrebleu.sentence_bleu(hyp, refs).score for hyp, refs in zip(README_HYPS, README_ROWS)]
    )
    assert readme[0]["bleu"] == pytest.approx(100.0)  # the hypothesis is its first reference


def test_corpus_bleu_with_a_varying_number_of_references_per_row():
    # Rows with 1, 3 and 2 references; the second row's hypothesis equals only its third reference.
    hyps = ["the cat sat on the mat", "a quick brown fox jumps", "it rained all day long"]
    rows = [
        ["the cat sat on a mat"],
        ["the fox is fast", "a brown fox leaps", "a quick brown fox jumps"],
        ["it was raining the whole day", "rain fell all day long"],
    ]
    expected = sacrebleu.corpus_bleu(
        hyps,
        [
            ["the cat sat on a mat", "the fox is fast", "it was raining the whole day"],
            [None, "a brown fox leaps", "rain fell all day long"],
            [None, "a quick brown fox jumps", None],
        ],
    ).score
    score = compute_metrics(["bleu"], hyps, rows)["bleu"]
    assert score == pytest.approx(expected)
    # the third reference counts: without it the score drops
    assert score > compute_metrics(["bleu"], hyps, [rows[0], rows[1][:2], rows[2]])["bleu"]


def test_rouge_l_matches_rouge_scores_own_tests():
    # rouge_score's rouge/rouge_scorer_test.py: testRougeLConsecutive / testRougeLNonConsecutive (F 4/5)
    # and testRougeEmpty (F 0); rouge_score's argument order is (target, prediction).
    rows = row_scores(["rouge_l"], ["testing one", "testing two", ""], [["testing one two"]] * 3)
    assert [row["rouge_l"] for row in rows] == pytest.approx([80.0, 80.0, 0.0])


def test_rouge_l_by_hand_with_stemming_and_best_reference():
    predictions = ["w1 w3 w8 w9 w5", "testing one", "the cats running"]
    references = [
        # LCS w1 w3 w5 = 3 of 5 tokens each side: P = R = F = 3/5
        ["w1 w2 w3 w4 w5"],
        # first: LCS 1, P 1/2, R 1/4, F 1/3; second: LCS 2, P 1, R 2/3, F 4/5 -> the best is 4/5
        ["testing two three four", "testing one two"],
        # Porter stems: cats -> cat, running / runs -> run: every token matches
        ["The cat runs"],
    ]
    rows = row_scores(["rouge_l"], predictions, references)
    assert [row["rouge_l"] for row in rows] == pytest.approx([60.0, 80.0, 100.0])
    assert compute_metrics(["rouge_l"], predictions, references)["rouge_l"] == pytest.approx(80.0)


def test_squad_metric_cards_example():
    # HF evaluate's squad metric card: prediction '1976' for the answer '1976' -> EM 100, F1 100.
    assert compute_metrics(["squad"], ["1976"], [["1976"]]) == {"exact_match": 100.0, "f1": 100.0}


def test_squad_normalisation_partial_credit_and_best_ground_truth():
    cases = [
        # case, punctuation and articles go: exact
        ("The Eiffel Tower!", ["eiffel tower"], 100.0, 100.0),
        ("an anthem", ["Anthem."], 100.0, 100.0),
        # articles only as whole words: "anthem" keeps its "an", so no token is shared with "them"
        ("anthem", ["them"], 0.0, 0.0),
        # 2 of 3 predicted tokens right, both gold tokens found: P 2/3, R 1, F1 4/5
        ("Denver Broncos won", ["Denver Broncos"], 0.0, 80.0),
        # Counter overlap counts a repeated token once per gold occurrence: P 1/2, R 1, F1 2/3
        ("the cat cat", ["a cat"], 0.0, 200 / 3),
        # the best ground truth for each score: "the Carolina Panthers" is exact
        ("Carolina Panthers", ["Denver Broncos", "the Carolina Panthers", "Panthers"], 100.0, 100.0),
        # F1 with "Santa Clara" 4/5 (P 2/3, R 1), with "Levi's Stadium" 0; EM with neither
        ("Santa Clara, California", ["Levi's Stadium", "Santa Clara"], 0.0, 80.0),
    ]
    predictions = [prediction for prediction, *_ in cases]
    references = [refs for _, refs, *_ in cases]
    rows = row_scores(["squad"], predictions, references)
    assert [row["exact_match"] for row in rows] == pytest.approx([em for *_, em, _ in cases])
    assert [row["f1"] for row in rows] == pytest.approx([f1 for *_, f1 in cases])
    corpus = compute_metrics(["squad"], predictions, references)
    assert corpus["exact_match"] == pytest.approx(300 / 7)
    assert corpus["f1"] == pytest.approx((100 + 100 + 0 + 80 + 200 / 3 + 100 + 80) / 7)


def gsm8k_answers() -> list[str]:
    with (data_dir("gsm8k") / "test.jsonl").open(encoding="utf-8") as file:
        return [json.loads(next(file))["answer"] for _ in range(3)]


def test_gsm8k_final_number_against_real_answers():
    janet, _, josh = gsm8k_answers()
    assert janet.endswith("#### 18") and josh.endswith("#### 70000")
    cases = [
        ("She makes 9 * 2 = $18 every day.\n#### 18", janet, 100.0),
        ("She sells 9 eggs, so she makes $18.", janet, 100.0),  # no ####: the last number, trailing "." dropped
        ("#### 18.0", janet, 100.0),
        ("#### $18", janet, 100.0),
        ("16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\n#### 16", janet, 0.0),
        ("She makes $18 a day, so $126 in 7 days", janet, 0.0),  # the last number is 126
        ("#### 18 dollars, or 126 a week", janet, 100.0),  # after ####: the number right after it
        ("He made a profit of $70,000.", josh, 100.0),
        ("#### 70,000.00", josh, 100.0),
        ("#### 7000", josh, 0.0),
        ("I cannot tell.", josh, 0.0),
    ]
    predictions = [prediction for prediction, _, _ in cases]
    references = [[answer] for _, answer, _ in cases]
    rows = row_scores(["gsm8k"], predictions, references)
    assert [row["exact_match"] for row in rows] == [score for _, _, score in cases]
    assert compute_metrics(["gsm8k"], predictions, references)["exact_match"] == pytest.approx(700 / 11)


def test_gsm8k_plain_number_references_and_signs():
    predictions = ["The answer is 1,250", "so 20-5=15", "It ends at -3.", "It ends at -3."]
    references = [["1250"], ["15"], ["-3"], ["3"]]
    assert [row["exact_match"] for row in row_scores(["gsm8k"], predictions, references)] == [100.0, 100.0, 100.0, 0.0]


def test_gsm8k_reference_without_a_number_is_an_error():
    with pytest.raises(ValueError, match="no number"):
        compute_metrics(["gsm8k"], ["#### 3"], [["no answer here"]])


def test_row_scores_one_dict_per_row_and_corpus_means():
    predictions = ["the answer is 42", "Paris", "a small dog barked"]
    references = [["#### 42", "forty-two is 42"], ["paris, france"], ["the dog barked loudly", "a dog"]]
    names = ["bleu", "rouge_l", "squad"]
    rows = row_scores(names, predictions, references)
    assert len(rows) == 3
    assert all(set(row) == {"bleu", "rouge_l", "exact_match", "f1"} for row in rows)
    assert all(type(value) is float for row in rows for value in row.values())
    corpus = compute_metrics(names, predictions, references)
    for key in ("rouge_l", "exact_match", "f1"):
        assert corpus[key] == pytest.approx(sum(row[key] for row in rows) / len(rows))


def test_metric_keys_name_what_each_metric_reports():
    assert set(METRIC_KEYS) == set(METRICS) and set(TEXT_METRICS) <= set(METRICS)
    for name in METRICS:
        if name in TEXT_METRICS:
            scores = compute_metrics([name], ["#### 1"], [["1"]])
        else:
            scores = compute_metrics([name], [1, 0], [1, 1], groups=[0, 0])
        assert tuple(scores) == METRIC_KEYS[name], name


def test_misuse_is_an_error():
    with pytest.raises(ValueError, match="both report 'exact_match'"):
        compute_metrics(["squad", "gsm8k"], ["1"], [["1"]])
    with pytest.raises(ValueError, match="text metrics only"):
        row_scores(["accuracy"], ["1"], [["1"]])
    # a bare string would be read as a list of its characters
    with pytest.raises(ValueError, match="bare string"):
        compute_metrics(["squad"], ["18"], ["18"])
    with pytest.raises(ValueError, match="at least one reference"):
        row_scores(["bleu"], ["a", "b"], [["a"], []])


def test_text_metrics_compute_offline(monkeypatch):
    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    load_metric.cache_clear()
    scores = compute_metrics(["bleu", "rouge_l", "squad"], ["the cats ran home"], [["a cat runs", "the cats ran home"]])
    assert scores == {"bleu": pytest.approx(100.0), "rouge_l": 100.0, "exact_match": 100.0, "f1": 100.0}
    assert attempts == []
