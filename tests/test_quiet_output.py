"""A normal run prints the run's own lines: no library warnings, no load report for the head the run adds."""

from __future__ import annotations

import logging

import pytest

from helpers import quick_overrides, run_cli
from softprompt.backbone import _FreshHeadReport


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prompt_tuning", "lora"])
def test_a_normal_run_prints_no_library_warnings(tmp_path, method):
    """minilm-l6 loads with a fresh classification head (transformers' load report) and is wrapped by PEFT (which
    reads transformers' deprecated `is_gradient_checkpointing`)."""
    overrides = quick_overrides("minilm-l6", steps=2, **{"method": method})
    result = run_cli("softprompt.train", *overrides, f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    for noise in ("Warning", "warnings.warn", "LOAD REPORT", "MISSING"):
        assert noise not in output, output[-3000:]


def _load_report(*rows: tuple[str, str]) -> logging.LogRecord:
    table = "\n".join(f"{key} | {status} | " for key, status in rows)
    text = f"MPNetForSequenceClassification LOAD REPORT from: mpnet-base\nKey | Status | \n---+---+-\n{table}\n"
    return logging.LogRecord("transformers.modeling_utils", logging.WARNING, __file__, 0, text, None, None)


@pytest.mark.parametrize(
    ("rows", "shown"),
    [
        # mpnet-base: the pretrained pooler goes unused where the classification head sits, the head is fresh
        ((("pooler.dense.weight", "UNEXPECTED"), ("classifier.out_proj.weight", "MISSING")), False),
        ((("score.weight", "MISSING"),), False),
        # a pooler the model uses but the checkpoint lacks starts random: the user must see it
        ((("pooler.dense.weight", "MISSING"), ("classifier.weight", "MISSING")), True),
        ((("encoder.layer.0.attention.self.query.weight", "MISSING"),), True),
        ((("lm_head.weight", "UNEXPECTED"),), True),
    ],
)
def test_the_load_report_is_dropped_only_when_it_names_the_fresh_head_or_the_unused_pooler(rows, shown):
    assert _FreshHeadReport().filter(_load_report(*rows)) is shown
