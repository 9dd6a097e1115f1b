"""Shared test setup: offline always, tiny models for speed, real data through SOFTPROMPT_DATA."""

from __future__ import annotations

import os

import pytest

for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[variable] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
