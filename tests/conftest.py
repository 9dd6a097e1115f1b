"""Shared test setup: offline always, tiny models for speed, real data through SOFTPROMPT_DATA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[variable] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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


@pytest.fixture
def train_run(tmp_path):
    """Train in-process from overrides, the config saved as Hydra saves it; returns (run directory, result)."""
    from omegaconf import OmegaConf

    from softprompt.cli import compose_config
    from softprompt.config import register_configs, validate
    from softprompt.train import train

    register_configs()

    def run(overrides: list[str], name: str = "run"):
        composed = compose_config(overrides)
        cfg = validate(composed)
        run_path = tmp_path / name
        # the resolved config where Hydra leaves it, so the run directory is one the other commands accept
        (run_path / ".hydra").mkdir(parents=True, exist_ok=True)
        OmegaConf.save(composed, run_path / ".hydra" / "config.yaml")
        return run_path, train(cfg, run_path)

    return run
