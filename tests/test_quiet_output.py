"""A normal run prints the run's own lines: no library warnings, no load report for the head the run adds."""

from __future__ import annotations

import pytest

from helpers import quick_overrides, run_cli


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
