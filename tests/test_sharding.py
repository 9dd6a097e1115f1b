"""trainer.sharding=fsdp on CPU (gloo, 2 processes): the same training as one process of the doubled batch for
every kind of backbone and for LoRA and model tuning, prompt/ the adapter an unsharded run writes, exact resume
after SIGKILL, and the layout the sharding gives the model.

Every torchrun start costs ~10 s of imports on 2 cores, so each case starts one.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import (
    ROOT,
    assert_same_training,
    data_dir,
    equivalence_overrides,
    quick_overrides,
    read_train_log,
    run_cli,
)
from softprompt import checkpoint, sharding
from softprompt import run_dir as records
from softprompt.config import TrainerConfig
from softprompt.errors import ConfigError

PER_DEVICE_BATCH = 8
TORCHRUN = ("torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "softprompt.train")
# backbone kind or method -> model and overrides
CASES = {
    "encoder": ("tiny-bert", ()),
    "decoder": ("tiny-llama", ()),
    # with the paper's optimiser, which works on the whole prompt each process keeps
    "encoder_decoder": ("tiny-t5", ("trainer.optimizer=adafactor", "trainer.lr=0.3")),
    "lora": ("tiny-llama", ("method=lora",)),
    # without the dropout model tuning turns on, whose masks could not match across process counts
    "model_tuning": ("tiny-bert", ("method=model_tuning", "trainer.backbone_dropout=false")),
}


def sharded_run(run_dir: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    result = run_cli(*TORCHRUN, *overrides, "trainer.sharding=fsdp", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_same_adapter(sharded: Path, single: Path) -> None:
    """prompt/ holds the same tensors, under the same names, as the unsharded run's, within fp32 rounding."""
    a = load_file(str(sharded / records.PROMPT_DIR / "adapter_model.safetensors"))
    b = load_file(str(single / records.PROMPT_DIR / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name].shape == b[name].shape, name
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_fsdp_of_two_processes_equals_one_process_of_the_doubled_batch(case, tmp_path, train_run):
    model, extra = CASES[case]
    # as a user launches it: the run directory chosen by Hydra, once for both processes
    result = run_cli(
        *TORCHRUN,
        *equivalence_overrides(PER_DEVICE_BATCH, model, *extra),
        "trainer.sharding=fsdp",
        f"output_root={tmp_path / 'outputs'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [sharded] = (tmp_path / "outputs" / "runs").iterdir()
    single, _ = train_run(equivalence_overrides(2 * PER_DEVICE_BATCH, model, *extra))

    assert_same_training(sharded, single)
    env = records.read_json(sharded / records.ENV)
    assert env["sharding"] == "fsdp" and env["num_processes"] == 2
    assert records.read_json(sharded / records.METRICS)["status"] == "completed"
    assert (sharded / ".hydra" / "config.yaml").is_file() and (sharded / "checkpoint" / checkpoint.STATE).is_file()
    assert (result.stdout + result.stderr).count("trainable parameters:") == 1
    if case == "model_tuning":
        # every weight trained: prompt/ is the whole model in transformers' format
        a = load_file(str(sharded / records.PROMPT_DIR / "model.safetensors"))
        b = load_file(str(single / records.PROMPT_DIR / "model.safetensors"))
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0)
    else:
        assert_same_adapter(sharded, single)


def logged_steps(run_dir: Path) -> int:
    path = run_dir / records.TRAIN_LOG
    return len(path.read_text().splitlines()) if path.is_file() else 0


RESUMED = equivalence_overrides(
    PER_DEVICE_BATCH,
    "tiny-llama",
    "trainer.max_steps=24",
    "trainer.eval_every=8",
    "trainer.checkpoint_every=3",
    "trainer.lr=0.3",
)


@pytest.mark.slow
def test_sigkill_of_a_sharded_run_then_resume_matches_the_uninterrupted_run(tmp_path):
    uninterrupted = tmp_path / "uninterrupted"
    sharded_run(uninterrupted, RESUMED)

    run_dir = tmp_path / "killed"
    # the whole launch killed at once, as a lost node would be: torchrun and both workers
    process = subprocess.Popen(
        [sys.executable, "-m", *TORCHRUN, *RESUMED, "trainer.sharding=fsdp", f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while logged_steps(run_dir) < 10 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert process.poll() is None, "the run ended before step 10"
    # torchrun starts its workers in sessions of their own: each is killed by its pid
    import psutil

    launch = psutil.Process(process.pid)
    for member in [launch, *launch.children(recursive=True)]:
        member.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    saved = records.read_json(run_dir / checkpoint.CHECKPOINT_DIR / checkpoint.STATE)["progress"]["step"]
    assert 9 <= saved < 24 and saved % 3 == 0

    sharded_run(run_dir, RESUMED)
    assert f"at step {saved}" in (run_dir / "train.log").read_text()
    done, reference = records.read_json(run_dir / records.METRICS), records.read_json(uninterrupted / records.METRICS)
    for record in (done, reference):
        for key in records.TIMING_KEYS:
            record.pop(key, None)
    assert done == reference
    assert steps_and_losses(run_dir) == steps_and_losses(uninterrupted)
    assert (run_dir / "prompt" / "adapter_model.safetensors").read_bytes() == (
        uninterrupted / "prompt" / "adapter_model.safetensors"
    ).read_bytes()


def steps_and_losses(run_dir: Path) -> list[tuple]:
    return [(entry["step"], entry["loss"], entry["lr"]) for entry in read_train_log(run_dir)]


@pytest.mark.slow
def test_an_fsdp_launch_shards_and_its_prompt_serves_unsharded(tmp_path):
    run_dir = tmp_path / "fsdp"
    # the user-facing way: Accelerate's FSDP config, which Accelerate launches on CPU too
    result = run_cli(
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "conf" / "accelerate" / "fsdp.yaml"),
        "--num_processes",
        "2",
        "-m",
        "softprompt.train",
        *quick_overrides("tiny-llama", steps=4),
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    env = records.read_json(run_dir / records.ENV)
    assert (env["sharding"], env["num_processes"]) == ("fsdp", 2)
    # one process, no sharding: the served prompt scores the validation split as training measured it
    result = run_cli("softprompt.predict", "--ensemble", str(run_dir), "--output", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    served = json.loads((tmp_path / "ensemble.json").read_text())["per_prompt"][run_dir.name]["accuracy"]
    assert served == pytest.approx(records.read_json(run_dir / records.METRICS)["eval"]["accuracy"], abs=1e-6)


@pytest.mark.slow
def test_a_generation_task_decodes_alike_sharded_and_data_parallel(tmp_path):
    """Every process decodes until all rows of the batch are done (the gathers must meet). Compared with data
    parallelism of the same processes: a token-averaged loss is each process's mean, which one process of the
    doubled batch does not reproduce exactly."""
    data_dir("e2e")
    overrides = [
        "task=e2e",
        "task.max_train_rows=48",
        "task.max_eval_rows=40",
        "generation.max_new_tokens=6",
        *(item for item in equivalence_overrides(PER_DEVICE_BATCH, "tiny-llama") if not item.startswith("task.")),
    ]
    sharded, replicated = tmp_path / "fsdp", tmp_path / "ddp"
    sharded_run(sharded, overrides)
    result = run_cli(*TORCHRUN, *overrides, f"hydra.run.dir={replicated}")
    assert result.returncode == 0, result.stderr[-3000:]
    for a, b in zip(read_train_log(sharded), read_train_log(replicated), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert (sharded / records.PREDICTIONS).read_text() == (replicated / records.PREDICTIONS).read_text()
    # one answer for each table of the 40 rows
    inputs = records.read_json(sharded / records.TASK)["inputs"]["validation"]
    assert len((sharded / records.PREDICTIONS).read_text().splitlines()) == inputs > 1


def test_fsdp_launch_asks_for_sharding_and_what_it_cannot_do_is_refused(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert sharding.mode(TrainerConfig()) == "none"
    assert sharding.mode(TrainerConfig(sharding="fsdp")) == "fsdp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert sharding.mode(TrainerConfig()) == "fsdp"

    from softprompt.cli import compose_config
    from softprompt.config import validate

    with pytest.raises(ConfigError, match=r"trainer.mixed_precision='fp16' is not allowed: no or bf16"):
        validate(compose_config(["trainer.sharding=fsdp", "trainer.mixed_precision=fp16"]))
    with pytest.raises(ConfigError, match=r"trainer.sharding='zero3' is not allowed: one of: none, fsdp"):
        validate(compose_config(["trainer.sharding=zero3"]))
    with pytest.raises(
        ConfigError, match=r"trainer.optimizer='adafactor' is not allowed: adamw for method=model_tuning"
    ):
        validate(compose_config(["trainer.sharding=fsdp", "method=model_tuning", "trainer.optimizer=adafactor"]))
    # an adapter stays whole, so Adafactor trains it
    validate(compose_config(["trainer.sharding=fsdp", "trainer.optimizer=adafactor"]))


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-llama", "tiny-t5"])
def test_each_transformer_layer_is_one_group(model):
    from softprompt.backbone import load_backbone
    from softprompt.cli import compose_config
    from softprompt.config import validate

    cfg = validate(compose_config([f"model={model}"]))
    backbone = load_backbone(cfg.model)
    layers = sharding.transformer_layers(backbone.model)
    config = backbone.model.config
    expected = config.num_layers + config.num_decoder_layers if model == "tiny-t5" else config.num_hidden_layers
    assert len(layers) == expected
    assert len({type(layer).__name__ for layer in layers}) <= 2
    # none inside another
    inside = {id(child) for layer in layers for child in layer.modules() if child is not layer}
    assert not inside & {id(layer) for layer in layers}
