"""softprompt-train: tune one soft prompt on a frozen model, from a Hydra config.

The whole recipe reads top to bottom in `train`: task, backbone, prompt, scorer, the Accelerate
loop with evaluation and early stopping, and the run directory's records.
"""
from __future__ import annotations

import logging
import math
import shutil
import sys
import time
from pathlib import Path

import hydra
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm
from transformers import get_scheduler
from transformers.optimization import Adafactor

from softprompt import run_dir as records
from softprompt.cli import CONF_DIR, compose_or_exit
from softprompt.config import TrainConfig, TrainerConfig, register_configs, validate
from softprompt.errors import UserError, exit_on_user_error
from softprompt.pipeline import build_pipeline, evaluate, make_loader
from softprompt.scorer import PromptedModel
from softprompt.soft_prompt import attach_prompt, trainable_counts

log = logging.getLogger("softprompt")


def make_optimizer(cfg: TrainerConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adafactor":
        # the paper's setting: a fixed learning rate, no relative steps or parameter scaling
        return Adafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay, scale_parameter=False, relative_step=False, warmup_init=False)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(cfg: TrainerConfig, optimizer: torch.optim.Optimizer):
    name = "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=max(cfg.max_steps, 1))


def save_prompt(accelerator: Accelerator, model: PromptedModel, run_path: Path) -> None:
    """The adapter in PEFT's own format, swapped in atomically (readers never see half a prompt)."""
    if not accelerator.is_main_process:
        return
    build = run_path / f".{records.PROMPT_DIR}.build"
    accelerator.unwrap_model(model).peft_model.save_pretrained(build)
    records.replace_dir(build, run_path / records.PROMPT_DIR)


def train(cfg: TrainConfig, run_path: Path) -> dict:
    """One tuning run, end to end; returns the final metrics record."""
    accelerator = Accelerator(
        mixed_precision=cfg.trainer.mixed_precision,
        gradient_accumulation_steps=cfg.trainer.grad_accum,
        log_with=cfg.trainer.log_with,
        project_dir=str(run_path),
    )
    set_seed(cfg.seed)
    pipeline = build_pipeline(cfg)
    task, backbone, scorer = pipeline.task, pipeline.backbone, pipeline.scorer
    peft_model = attach_prompt(backbone, cfg.prompt, pipeline.label_token_ids, head=scorer == "head", seed=cfg.seed)
    counts = trainable_counts(peft_model)
    model = PromptedModel(peft_model, backbone.kind, scorer, cfg.scorer.reduction)
    train_loader = make_loader(pipeline, "train", training=True, seed=cfg.seed)
    eval_loader = make_loader(pipeline, "validation", training=False)
    optimizer = make_optimizer(cfg.trainer, [p for p in model.parameters() if p.requires_grad])
    scheduler = make_scheduler(cfg.trainer, optimizer)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler
    )

    env = records.environment(
        accelerator.num_processes, str(accelerator.device), cfg.trainer.batch_size, cfg.trainer.grad_accum, cfg.seed
    )
    if accelerator.is_main_process:
        records.write_json(run_path / records.ENV, env)
        records.write_json(run_path / "task.json", {"name": task.name, "splits": task.provenance, "counts": {s: len(r) for s, r in task.rows.items()}})
        (run_path / records.TRAIN_LOG).unlink(missing_ok=True)
        records.mark(run_path, "running", model=backbone.name, model_params=backbone.num_params, task=task.name, scorer=scorer)
    if cfg.trainer.log_with:
        accelerator.init_trackers("softprompt", config=_flat(OmegaConf.to_container(OmegaConf.structured(cfg))))

    main_metric = cfg.task.main_metric
    initial = evaluate(model, eval_loader, accelerator, task, cfg.trainer.progress_bar)
    best, best_step, stale = initial, 0, 0
    save_prompt(accelerator, model, run_path)
    log.info("step 0: %s", _describe(initial))

    step, samples, started = 0, 0, time.perf_counter()
    window_samples, window_batches, window_start, running_loss = 0, 0, started, 0.0
    bar = tqdm(total=cfg.trainer.max_steps, desc="train", disable=not accelerator.is_main_process or not cfg.trainer.progress_bar)
    model.train()
    failure = None
    while step < cfg.trainer.max_steps and failure is None:
        for batch in train_loader:
            with accelerator.accumulate(model):
                loss = model(batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.trainer.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.trainer.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            rows = batch["labels"].shape[0] * accelerator.num_processes
            samples += rows
            window_samples += rows
            running_loss += accelerator.reduce(loss.detach(), "mean").item()
            window_batches += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            bar.update(1)
            if not math.isfinite(running_loss):
                failure = f"the loss became {running_loss} at step {step}; the last good prompt (step {best_step}) is kept"
                break
            if step % cfg.trainer.log_every == 0 or step == cfg.trainer.max_steps:
                now = time.perf_counter()
                entry = {
                    "step": step,
                    "loss": round(running_loss / window_batches, 6),
                    "lr": scheduler.get_last_lr()[0],
                    "samples_per_second": round(window_samples / max(now - window_start, 1e-9), 2),
                }
                bar.set_postfix(loss=entry["loss"])
                if accelerator.is_main_process:
                    records.append_log(run_path, entry)
                accelerator.log({"train/loss": entry["loss"], "train/lr": entry["lr"]}, step=step)
                window_samples, window_batches, window_start, running_loss = 0, 0, now, 0.0
            if step % cfg.trainer.eval_every == 0 or step == cfg.trainer.max_steps:
                current = evaluate(model, eval_loader, accelerator, task, cfg.trainer.progress_bar)
                accelerator.log({f"eval/{key}": value for key, value in current.items()}, step=step)
                log.info("step %d: %s", step, _describe(current))
                if current[main_metric] > best[main_metric]:
                    best, best_step, stale = current, step, 0
                    save_prompt(accelerator, model, run_path)
                else:
                    stale += 1
                if cfg.trainer.early_stopping_patience and stale >= cfg.trainer.early_stopping_patience:
                    log.info("early stop at step %d: no gain in %s for %d evaluations", step, main_metric, stale)
                    cfg.trainer.max_steps = step
            if step >= cfg.trainer.max_steps:
                break
    bar.close()
    seconds = time.perf_counter() - started
    accelerator.end_training()

    result = {
        "eval": best,
        "initial_eval": initial,
        "main_metric": main_metric,
        "eval_examples": len(task.examples["validation"]),
        "best_step": best_step,
        "steps": step,
        "trainable_params": counts,
        "train_seconds": round(seconds, 3),
        "train_samples_per_second": round(samples / seconds, 3) if seconds > 0 else 0.0,
        "seed": cfg.seed,
    }
    if accelerator.is_main_process:
        if failure:
            records.mark(run_path, "failed", reason=failure, **result)
        else:
            records.mark(run_path, "completed", **result)
    if failure:
        raise UserError(failure)
    return result


def _describe(metrics: dict) -> str:
    return ", ".join(f"{key}={value:.4f}" for key, value in metrics.items())


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def summary(result: dict, run_path: Path) -> str:
    metric = result["main_metric"]
    counts = result["trainable_params"]
    return (
        f"{metric}: {result['initial_eval'][metric]:.4f} at step 0 -> {result['eval'][metric]:.4f} "
        f"(best, step {result['best_step']}) | trainable parameters: {counts['total']:,} "
        f"(prompt {counts['prompt']:,}, head {counts['head']:,}) | {result['train_seconds']:.1f}s | run: {run_path}"
    )


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="train")
def hydra_main(raw: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    run_path = Path(hydra_cfg.runtime.output_dir)
    fresh = records.status(run_path) is None
    try:
        cfg = validate(raw)
        result = train(cfg, run_path)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            # one bad job of a sweep is recorded as failed; the other jobs go on
            records.mark(run_path, "failed", reason=str(error))
            return None
        if fresh:
            logging.shutdown()
            shutil.rmtree(run_path, ignore_errors=True)
        else:
            records.mark(run_path, "failed", reason=str(error))
        sys.exit(2)
    print(summary(result, run_path))
    return result["eval"][result["main_metric"]]


@exit_on_user_error
def main() -> None:
    register_configs()
    compose_or_exit(sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    main()
