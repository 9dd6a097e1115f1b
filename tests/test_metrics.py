"""Metrics against hand-worked values, and loading that is offline, cached, cwd-independent and concurrency-safe."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import softprompt.metrics
from softprompt.errors import ConfigError
from softprompt.metrics import METRICS, TEXT_METRICS, compute_metrics, load_metric, superglue_average

# Binary: TP = 3 (idx 0-2), FN = 1 (idx 3), FP = 2 (idx 4-5), TN = 4 (idx 6-9).
BINARY_REFS = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
BINARY_PREDS = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]

# Three classes (CB-like): right at idx 0, 1, 3, 5.
CB_REFS = [0, 0, 0, 1, 1, 2]
CB_PREDS = [0, 0, 1, 1, 2, 2]

# MultiRC: answer options of questions 7, 3 and 9 (ids neither sorted nor contiguous).
MULTIRC_GROUPS = [7, 7, 7, 3, 3, 9]
MULTIRC_REFS = [1, 0, 1, 0, 1, 1]
MULTIRC_PREDS = [1, 0, 1, 1, 1, 0]

# The metrics of class ids (the text metrics have their own tests in test_generation_metrics.py).
CLASS_METRICS = [name for name in METRICS if name not in TEXT_METRICS]


def test_binary_accuracy_f1_mcc_by_hand():
    scores = compute_metrics(["accuracy", "f1", "f1_macro", "mcc"], BINARY_PREDS, BINARY_REFS)
    # accuracy = (TP + TN) / n = (3 + 4) / 10
    assert scores["accuracy"] == pytest.approx(7 / 10)
    # F1 of class 1 = 2TP / (2TP + FP + FN) = 6 / (6 + 2 + 1) = 2/3
    assert scores["f1"] == pytest.approx(2 / 3)
    # F1 of class 0: TP0 = 4, FP0 = 1 (idx 3), FN0 = 2 (idx 4-5) -> 8 / 11; macro = (2/3 + 8/11) / 2 = 23/33
    assert scores["f1_macro"] == pytest.approx(23 / 33)
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (12 - 2) / sqrt(5*4*6*5) = 10 / sqrt(600)
    assert scores["mcc"] == pytest.approx(1 / math.sqrt(6))
    assert all(type(value) is float for value in scores.values())


def test_cb_is_mean_of_accuracy_and_macro_f1_by_hand():
    scores = compute_metrics(["accuracy", "f1_macro", "cb"], CB_PREDS, CB_REFS)
    # accuracy = 4 / 6
    assert scores["accuracy"] == pytest.approx(2 / 3)
    # class 0: TP 2, FP 0, FN 1 -> 4/5; class 1: TP 1 (idx 3), FP 1 (idx 2), FN 1 (idx 4) -> 2/4;
    # class 2: TP 1 (idx 5), FP 1 (idx 4), FN 0 -> 2/3; macro = (4/5 + 1/2 + 2/3) / 3 = 59/90
    assert scores["f1_macro"] == pytest.approx(59 / 90)
    # cb = (2/3 + 59/90) / 2 = (60/90 + 59/90) / 2 = 119/180
    assert scores["cb"] == pytest.approx(119 / 180)


def test_multirc_f1a_and_em_by_hand():
    scores = compute_metrics(["multirc"], MULTIRC_PREDS, MULTIRC_REFS, groups=MULTIRC_GROUPS)
    assert set(scores) == {"multirc_f1a", "multirc_em", "multirc"}
    # F1a over all options: TP 3 (idx 0, 2, 4), FP 1 (idx 3), FN 1 (idx 5) -> 6 / 8
    assert scores["multirc_f1a"] == pytest.approx(3 / 4)
    # EM: question 7 all right, 3 wrong at idx 3, 9 wrong at idx 5 -> 1 / 3
    assert scores["multirc_em"] == pytest.approx(1 / 3)
    # mean = (3/4 + 1/3) / 2 = 13/24
    assert scores["multirc"] == pytest.approx(13 / 24)


def test_degenerate_inputs_score_zero_not_nan():
    # No predicted positives: precision is 0/0, so F1 is reported as 0; constant predictions: MCC is 0/0, reported as 0.
    scores = compute_metrics(["f1", "mcc"], [0, 0, 0], [0, 1, 0])
    assert scores == {"f1": 0.0, "mcc": 0.0}


def test_accepts_numpy_arrays():
    scores = compute_metrics(["accuracy"], np.array(BINARY_PREDS), np.array(BINARY_REFS))
    assert scores == {"accuracy": pytest.approx(0.7)}


def test_all_metrics_give_stable_keys():
    scores = compute_metrics(CLASS_METRICS, MULTIRC_PREDS, MULTIRC_REFS, groups=MULTIRC_GROUPS)
    assert set(scores) == {"accuracy", "f1", "f1_macro", "mcc", "cb", "multirc_f1a", "multirc_em", "multirc"}


def test_multirc_without_groups_is_an_error():
    with pytest.raises(ValueError, match="groups"):
        compute_metrics(["multirc"], MULTIRC_PREDS, MULTIRC_REFS)


def test_empty_predictions_are_an_error():
    with pytest.raises(ValueError, match="no predictions"):
        compute_metrics(["accuracy"], [], [])


def test_unknown_metric_is_a_config_error():
    with pytest.raises(ConfigError) as error:
        load_metric("meteor")
    assert error.value.key == "task.metrics" and error.value.value == "meteor"
    assert "one of: accuracy, f1, f1_macro, mcc, cb, multirc, bleu, rouge_l, squad, gsm8k" in str(error.value)
    with pytest.raises(ConfigError):
        compute_metrics(["accuracy", "rouge"], [1], [1])


def test_loading_twice_returns_the_cached_module():
    assert load_metric("accuracy") is load_metric("accuracy")


def test_loading_touches_no_network(monkeypatch):
    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    load_metric.cache_clear()
    for name in METRICS:
        load_metric(name)
    assert compute_metrics(["accuracy"], [1, 0], [1, 1]) == {"accuracy": 0.5}
    assert attempts == []


def test_loading_from_another_working_directory_uses_the_package_copy(tmp_path, monkeypatch):
    # A folder named like a module in the cwd must not shadow the shipped one.
    (tmp_path / "softprompt_accuracy").mkdir()
    monkeypatch.chdir(tmp_path)
    load_metric.cache_clear()
    assert compute_metrics(["accuracy"], [1, 0], [1, 1]) == {"accuracy": 0.5}


_FRESH_PROCESS = textwrap.dedent(
    """
    import socket, sys, time
    from pathlib import Path

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted")

    socket.socket.connect = refuse
    socket.create_connection = refuse
    socket.getaddrinfo = refuse

    import evaluate, sklearn.metrics  # the slow imports happen before the start line

    rendezvous, me, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    (rendezvous / me).touch()
    deadline = time.monotonic() + 240
    while len(list(rendezvous.iterdir())) < count and time.monotonic() < deadline:
        time.sleep(0.005)

    from softprompt.metrics import METRICS, TEXT_METRICS, compute_metrics

    class_metrics = [name for name in METRICS if name not in TEXT_METRICS]
    scores = compute_metrics(class_metrics, [1, 0, 1, 1, 1, 0], [1, 0, 1, 0, 1, 1], groups=[7, 7, 7, 3, 3, 9])
    assert abs(scores["multirc"] - 13 / 24) < 1e-12, scores
    for name in TEXT_METRICS:  # one call each: squad and gsm8k both report exact_match
        compute_metrics([name], ["#### 1"], [["1"]])
    assert not attempts, attempts
    print("ok")
    """
)


@pytest.mark.slow
def test_fresh_offline_processes_loading_at_once(tmp_path):
    """Two processes with an empty HF cache, offline, in different working directories, load every metric at the same moment."""
    src = Path(softprompt.metrics.__file__).resolve().parents[2]
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(src), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    rendezvous = tmp_path / "rendezvous"
    rendezvous.mkdir()
    count = 2
    processes = []
    for rank in range(count):
        cwd = tmp_path / f"cwd{rank}"
        cwd.mkdir()
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", _FRESH_PROCESS, str(rendezvous), str(rank), str(count)],
                cwd=cwd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    for process in processes:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0 and output.rstrip().endswith("ok"), output
    copies = sorted(
        path.name for path in (tmp_path / "hf_modules" / "evaluate_modules" / "metrics").glob("softprompt_*/*/*.py")
    )
    assert copies.count("softprompt_multirc.py") == 1


def test_superglue_average_takes_one_combined_score_per_task():
    cb = compute_metrics(["cb"], CB_PREDS, CB_REFS)["cb"]
    multirc = compute_metrics(["multirc"], MULTIRC_PREDS, MULTIRC_REFS, groups=MULTIRC_GROUPS)["multirc"]
    # (0.8 + 119/180 + 13/24) / 3
    expected = (0.8 + 119 / 180 + 13 / 24) / 3
    assert superglue_average({"boolq": 0.8, "cb": cb, "multirc": multirc}) == pytest.approx(expected)
    with pytest.raises(ValueError):
        superglue_average({})
