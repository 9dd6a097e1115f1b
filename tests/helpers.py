"""Helpers the test modules share (fixtures live in conftest.py): paths, the shared data, running a
console script, quick overrides, PEFT's own scores as a reference, hand-made run directories."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from softprompt import run_dir as records
from softprompt.batching import candidate_tokens
from softprompt.cli import compose_config

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SOFTPROMPT_DATA", ROOT.parent / "shared" / "data"))


def data_dir(*parts: str) -> Path:
    """A folder of the shared task data; skipped where absent, but a failure under CI=true."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing: CI needs the shared data (set SOFTPROMPT_DATA)")
        pytest.skip(f"{path} is missing (set SOFTPROMPT_DATA)")
    return path


def run_cli(
    *args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run a console script's module the way a user would, capturing both streams."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def completed_run(run_path: Path, overrides: list[str], timeout: int = 600) -> Path:
    """A run trained to completion by `softprompt-train` into run_path, for tests that resume or damage it."""
    result = run_cli("softprompt.train", *overrides, f"hydra.run.dir={run_path}", timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_path


def quick_overrides(model: str = "tiny-bert", steps: int = 4, **extra: str) -> list[str]:
    """Overrides for a run of a few steps on the embedded task, small enough for a unit test."""
    overrides = {
        "model": model,
        "prompt.length": "4",
        "trainer.max_steps": str(steps),
        "trainer.eval_every": str(max(steps // 2, 1)),
        "trainer.batch_size": "8",
        "trainer.eval_batch_size": "16",
        "trainer.progress_bar": "false",
        "task.builtin_size.train": "64",
        "task.builtin_size.validation": "24",
    }
    overrides.update(extra)
    return [f"{key}={value}" for key, value in overrides.items()]


# odd: the last evaluation batch is padded on one rank, and must count once
EQUIVALENCE_VALIDATION_ROWS = 23


def equivalence_overrides(batch_size: int, model: str = "tiny-bert", *extra: str) -> list[str]:
    """A run two processes of batch b must reproduce with one process of batch 2b: fp32, no backbone dropout (its
    random masks could not match across process counts), logged every step."""
    overrides = {
        "trainer.batch_size": str(batch_size),
        "trainer.log_every": "1",
        "task.builtin_size.validation": str(EQUIVALENCE_VALIDATION_ROWS),
    }
    return [*quick_overrides(model, steps=4, **overrides), *extra]


def read_train_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / records.TRAIN_LOG).read_text().splitlines()]


def assert_same_training(several: Path, single: Path, tolerance: float = 1e-5) -> None:
    """A multi-process run and a one-process run of the same rows trained alike: the same logged losses and
    learning rates, the same evaluations, every validation row counted once."""
    two, one = read_train_log(several), read_train_log(single)
    assert [entry["step"] for entry in two] == [entry["step"] for entry in one]
    for a, b in zip(two, one):
        # the logged loss is the mean over both ranks' rows, the same rows one process sees
        assert a["loss"] == pytest.approx(b["loss"], abs=tolerance)
        assert a["lr"] == b["lr"]
    assert two[0]["loss"] != two[-1]["loss"]
    m2, m1 = records.read_json(several / records.METRICS), records.read_json(single / records.METRICS)
    assert m2["best_step"] == m1["best_step"]
    for key in ("eval", "initial_eval"):
        assert m2[key].keys() == m1[key].keys()
        for metric, value in m1[key].items():
            assert m2[key][metric] == pytest.approx(value, abs=tolerance)
    rows = EQUIVALENCE_VALIDATION_ROWS
    assert m2["eval_examples"] == rows
    # a whole number of rows out of 23
    for accuracy in (m2["eval"]["accuracy"], m2["initial_eval"]["accuracy"]):
        assert 0 < accuracy < 1
        assert accuracy * rows == pytest.approx(round(accuracy * rows), abs=1e-4)


def peft_scores(peft_model, pipeline) -> list[list[float]]:
    """Class log-probabilities through PEFT's own forward, one unpadded row at a time, with full logits."""
    kind = pipeline.backbone.kind
    # inputs cut as the product cuts them: decoders keep the end of a long input
    tokenizer = copy.copy(pipeline.tokenizer)
    tokenizer.truncation_side = "left" if kind == "decoder" else "right"
    rows = []
    for example in pipeline.task.examples["validation"]:
        encoded = tokenizer(example.text, truncation=True, max_length=pipeline.cfg.task.max_length, return_tensors="pt")
        if pipeline.scorer == "head":
            rows.append(peft_model(**encoded).logits.log_softmax(-1)[0].tolist())
            continue
        scores = []
        for candidate in example.candidates:
            answer = torch.tensor([candidate_tokens(tokenizer, kind, candidate)])
            if kind == "decoder":
                ids = torch.cat([encoded["input_ids"], answer], dim=1)
                logits = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
                logits = logits[0, -answer.shape[1] - 1 : -1]
            else:
                logits = peft_model(**encoded, labels=answer).logits[0]
            scores.append(logits.log_softmax(-1).gather(-1, answer[0, :, None]).sum().item())
        rows.append(scores)
    return rows


def make_run(root, name: str, overrides: list[str], metrics: dict | None):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(compose_config(overrides), run / ".hydra" / "config.yaml")
    if metrics is not None:
        records.write_json(run / records.METRICS, metrics)
    return run
