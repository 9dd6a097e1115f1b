"""softprompt-train: tune one soft prompt on a frozen model, from a Hydra config.

The whole recipe reads top to bottom in `train`: task, backbone, prompt, scorer, the Accelerate
loop with evaluation and early stopping, and the run directory's records.
"""

from __future__ import annotations

import gc
import logging
import math
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import NoReturn

import hydra
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm
from transformers import get_scheduler
from transformers.optimization import Adafactor

from softprompt import checkpoint, sweep
from softprompt import run_dir as records
from softprompt.cli import CONF_DIR, precheck, without_hydra
from softprompt.config import TrainConfig, TrainerConfig, flatten, register_configs, validate
from softprompt.distributed import check_launch
from softprompt.errors import ConfigError, UserError, exit_on_user_error, folder_problem, read_record
from softprompt.method import RENDERED_PROMPTS, build_model, parameter_counts, trains, write_rendered_prompts
from softprompt.pipeline import build_pipeline, evaluate, make_loader
from softprompt.scorer import PromptedModel

log = logging.getLogger("softprompt")


def make_optimizer(cfg: TrainerConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adafactor":
        # the paper's setting: a fixed learning rate, no relative steps or parameter scaling
        return Adafactor(
            params,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(cfg: TrainerConfig, optimizer: torch.optim.Optimizer):
    name = "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=max(cfg.max_steps, 1))


def save_prompt(accelerator: Accelerator, model: PromptedModel, run_path: Path) -> None:
    """What was trained, swapped in atomically (readers never see half a prompt): the adapter in PEFT's
    own format, or for model tuning the whole model in transformers' (safetensors)."""
    if not accelerator.is_main_process:
        return
    build = run_path / f".{records.PROMPT_DIR}.build"
    accelerator.unwrap_model(model).peft_model.save_pretrained(build)
    records.replace_dir(build, run_path / records.PROMPT_DIR)


# a preempted run exits with 128 + the signal's number, as a shell reports a process that signal ended
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class Preemption:
    """SIGTERM (what a cluster scheduler sends) and SIGUSR2 (submitit's preemption signal) become a
    flag the loop checks between steps: it then writes a checkpoint and `exit` ends the process.

    A handler installed before ours (submitit's requeue) is called on the way out, so a requeued
    job starts the same run directory again and resumes from that checkpoint.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for signum in PREEMPTION_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._catch)
        return self

    def _catch(self, signum: int, frame: object) -> None:
        self.signum = signum

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def requested(self, accelerator: Accelerator) -> bool:
        """Whether any process was signalled: every process must stop at the same step."""
        flag = self.signum is not None
        if accelerator.num_processes == 1:
            return flag
        return accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "sum").item() > 0

    def exit(self) -> NoReturn:
        signum = self.signum or signal.SIGTERM
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, None)
        sys.exit(128 + signum)


def _divergence(
    loss: float, grad_norm: torch.Tensor | None, cfg: TrainerConfig, step: int, best_step: int
) -> str | None:
    """Why this update must not be applied, if it must not: checked before optimizer.step, so the prompt stays finite.

    Under fp16 an infinite gradient is the loss scaler's business (it skips the step), not a divergence.
    """
    if not math.isfinite(loss):
        what = f"the loss became {loss}"
    elif grad_norm is not None and not torch.isfinite(grad_norm) and cfg.mixed_precision != "fp16":
        what = f"the gradient norm became {grad_norm.item()}"
    else:
        return None
    return f"{what} at step {step} (trainer.lr={cfg.lr}); training stopped before that update, prompt/ keeps the best prompt (step {best_step})"


def _start_over(run_path: Path) -> None:
    """No checkpoint to resume from: drop what an earlier attempt left, so no stale record survives."""
    for name in (checkpoint.CHECKPOINT_DIR, records.PROMPT_DIR):
        shutil.rmtree(run_path / name, ignore_errors=True)
    (run_path / records.TRAIN_LOG).unlink(missing_ok=True)
    metrics = run_path / records.METRICS
    if metrics.is_file():
        kept = {key: value for key, value in records.read_json(metrics).items() if key == sweep.KEY_FIELD}
        records.write_json(metrics, {**kept, "status": "running"})


def train(cfg: TrainConfig, run_path: Path) -> dict:
    """One tuning run, end to end; returns the final metrics record.

    With a checkpoint in `run_path` (trainer.resume auto or must) the run continues exactly where
    it stopped; one that completed earlier with this config returns its record without training.
    SIGTERM/SIGUSR2 end it with a checkpoint, status `preempted` and exit status 128 + signal; a
    non-finite loss ends it as `failed` (a UserError); any other exception marks it `failed` too.
    """
    snapshot = checkpoint.find(run_path, cfg)
    if snapshot is not None and snapshot.progress.result is not None:
        log.info("%s completed earlier with this config: nothing to train", run_path)
        if PartialState().is_main_process:
            records.mark(run_path, "completed", **snapshot.progress.result)
        return snapshot.progress.result
    with Preemption() as preemption:
        try:
            if not trains(cfg):
                return _evaluate_design(cfg, run_path)
            result = _train(cfg, run_path, snapshot, preemption)
        except Exception as error:
            if (
                not isinstance(error, UserError)
                and PartialState().is_main_process
                and records.status(run_path) == "running"
            ):
                records.mark(run_path, "failed", reason=f"{type(error).__name__}: {error}")
            raise
    _close_process_group()
    return result


def _close_process_group() -> None:
    """All ranks meet, then the process group goes, after _train has let go of the DDP model: destroyed before it,
    the group was freed later by the model's reducer, which now and then hung in gloo's destructor at exit."""
    if torch.distributed.is_initialized():
        gc.collect()
        PartialState().wait_for_everyone()
        PartialState().destroy_process_group()


def _train(cfg: TrainConfig, run_path: Path, snapshot: checkpoint.Snapshot | None, preemption: Preemption) -> dict:
    accelerator = Accelerator(
        mixed_precision=cfg.trainer.mixed_precision,
        gradient_accumulation_steps=cfg.trainer.grad_accum,
        log_with=cfg.trainer.log_with,
        project_dir=str(run_path),
    )
    set_seed(cfg.seed)
    pipeline = build_pipeline(cfg)
    task, backbone, scorer = pipeline.task, pipeline.backbone, pipeline.scorer
    peft_model = build_model(backbone, cfg, pipeline.label_token_ids, head=scorer == "head", seed=cfg.seed)
    counts = parameter_counts(peft_model, cfg.method.name, backbone.num_params)
    model = PromptedModel(
        peft_model,
        backbone.kind,
        scorer,
        cfg.scorer.reduction,
        cfg.trainer.backbone_dropout,
        cfg.trainer.gradient_checkpointing,
        cfg.trainer.compile,
    )
    train_loader = make_loader(pipeline, "train", training=True, seed=cfg.seed)
    # the shuffle's generator: its state at an epoch's start fixes that epoch's order
    data_order = train_loader.generator
    eval_loader = make_loader(pipeline, "validation", training=False)
    optimizer = make_optimizer(cfg.trainer, [p for p in model.parameters() if p.requires_grad])
    scheduler = make_scheduler(cfg.trainer, optimizer)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    main = accelerator.is_main_process

    if snapshot is None:
        progress = checkpoint.Progress()
        if main:
            _start_over(run_path)
    else:
        progress = snapshot.progress
        checkpoint.restore(snapshot, run_path, accelerator.unwrap_model(model), optimizer, scheduler, data_order, main)
        accelerator.step = progress.accelerator_step
    env = records.environment(
        accelerator.num_processes, str(accelerator.device), cfg.trainer.batch_size, cfg.trainer.grad_accum, cfg.seed
    )
    identity = {
        "method": cfg.method.name,
        "model": backbone.name,
        "model_params": backbone.num_params,
        "task": task.name,
        "scorer": scorer,
    }
    if main:
        records.write_json(run_path / records.ENV, env)
        records.write_json(
            run_path / "task.json",
            {"name": task.name, "splits": task.provenance, "counts": {s: len(r) for s, r in task.rows.items()}},
        )
        records.mark(run_path, "running", **identity)
    if cfg.trainer.log_with:
        tracked = flatten(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True), scalars=True)
        accelerator.init_trackers(
            "softprompt", config={key: value for key, value in tracked.items() if value is not None}
        )

    main_metric = cfg.task.main_metric
    if snapshot is None:
        progress.initial = progress.best = evaluate(model, eval_loader, accelerator, task, cfg.trainer.progress_bar)
        save_prompt(accelerator, model, run_path)
        log.info("step 0: %s", _describe(progress.initial))
    else:
        log.info("resumed from %s at step %d", snapshot.folder, progress.step)

    def save_checkpoint() -> None:
        progress.seconds = time.perf_counter() - started
        progress.accelerator_step = accelerator.step
        log_path = run_path / records.TRAIN_LOG
        progress.log_bytes = log_path.stat().st_size if log_path.is_file() else 0
        if main:
            checkpoint.save(
                run_path, cfg, progress, accelerator.unwrap_model(model), optimizer, scheduler, epoch_data_state
            )

    checkpoint_every = cfg.trainer.checkpoint_every or cfg.trainer.eval_every
    last_step = cfg.trainer.max_steps
    started = time.perf_counter() - progress.seconds
    window_start = time.perf_counter()
    bar = tqdm(total=last_step, initial=progress.step, desc="train", disable=not main or not cfg.trainer.progress_bar)
    model.train()
    done, failure, preempted = progress.step >= last_step, None, False
    epoch_data_state = data_order.get_state()
    while not (done or failure or preempted):
        epoch_data_state = data_order.get_state()
        # a resumed epoch replays the same shuffle and skips the batches already trained on
        loader = (
            accelerator.skip_first_batches(train_loader, progress.batches_in_epoch)
            if progress.batches_in_epoch
            else train_loader
        )
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(batch).loss
                accelerator.backward(loss)
                loss_value = accelerator.reduce(loss.detach(), "mean").item()
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(trainable, cfg.trainer.max_grad_norm or math.inf)
                failure = _divergence(loss_value, grad_norm, cfg.trainer, progress.step + 1, progress.best_step)
                if failure:
                    break
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            progress.batches_in_epoch += 1
            rows = batch["labels"].shape[0] * accelerator.num_processes
            progress.samples += rows
            progress.window_samples += rows
            progress.window_loss += loss_value
            progress.window_batches += 1
            if not accelerator.sync_gradients:
                continue
            progress.step += 1
            bar.update(1)
            if progress.step % cfg.trainer.log_every == 0 or progress.step == last_step:
                now = time.perf_counter()
                entry = {
                    "step": progress.step,
                    "loss": round(progress.window_loss / progress.window_batches, 6),
                    "lr": scheduler.get_last_lr()[0],
                    "samples_per_second": round(progress.window_samples / max(now - window_start, 1e-9), 2),
                }
                bar.set_postfix(loss=entry["loss"])
                if main:
                    records.append_log(run_path, entry)
                accelerator.log({"train/loss": entry["loss"], "train/lr": entry["lr"]}, step=progress.step)
                progress.window_samples, progress.window_batches, progress.window_loss, window_start = 0, 0, 0.0, now
            if progress.step % cfg.trainer.eval_every == 0 or progress.step == last_step:
                current = evaluate(model, eval_loader, accelerator, task, cfg.trainer.progress_bar)
                accelerator.log({f"eval/{key}": value for key, value in current.items()}, step=progress.step)
                log.info("step %d: %s", progress.step, _describe(current))
                if current[main_metric] > progress.best[main_metric]:
                    progress.best, progress.best_step, progress.stale = current, progress.step, 0
                    save_prompt(accelerator, model, run_path)
                else:
                    progress.stale += 1
                if cfg.trainer.early_stopping_patience and progress.stale >= cfg.trainer.early_stopping_patience:
                    log.info(
                        "early stop at step %d: no gain in %s for %d evaluations",
                        progress.step,
                        main_metric,
                        progress.stale,
                    )
                    last_step = progress.step
            done = progress.step >= last_step
            preempted = preemption.requested(accelerator)
            if preempted or (not done and progress.step % checkpoint_every == 0):
                save_checkpoint()
            if done or preempted:
                break
        else:
            progress.epoch += 1
            progress.batches_in_epoch = 0
    bar.close()
    seconds = time.perf_counter() - started
    for tracker in accelerator.trackers:
        tracker.finish()

    if preempted:
        reason = f"stopped by {signal.Signals(preemption.signum or signal.SIGTERM).name} at step {progress.step}; start the same run again to resume from its checkpoint"
        if main:
            records.mark(run_path, "preempted", reason=reason)
        log.warning(reason)
        preemption.exit()
    result = {
        **identity,
        "eval": progress.best,
        "initial_eval": progress.initial,
        "main_metric": main_metric,
        "eval_examples": len(task.examples["validation"]),
        "best_step": progress.best_step,
        "steps": progress.step,
        "trainable_params": counts,
        "train_seconds": round(seconds, 3),
        "train_samples_per_second": round(progress.samples / seconds, 3) if seconds > 0 else 0.0,
        "seed": cfg.seed,
    }
    if failure:
        if main:
            records.mark(run_path, "failed", reason=failure, **result)
        raise UserError(failure)
    progress.result = result
    save_checkpoint()
    if main:
        records.mark(run_path, "completed", **result)
    return result


def _evaluate_design(cfg: TrainConfig, run_path: Path) -> dict:
    """method=prompt_design: nothing trains. Evaluate the instruction and demonstrations once, and write the
    exact text of the first validation rows to rendered_prompts.txt, for the user to read and edit."""
    accelerator = Accelerator(mixed_precision=cfg.trainer.mixed_precision)
    set_seed(cfg.seed)
    pipeline = build_pipeline(cfg)
    task, backbone = pipeline.task, pipeline.backbone
    model = PromptedModel(
        build_model(backbone, cfg, pipeline.label_token_ids, head=False, seed=cfg.seed),
        backbone.kind,
        pipeline.scorer,
        cfg.scorer.reduction,
    )
    eval_loader = make_loader(pipeline, "validation", training=False)
    model, eval_loader = accelerator.prepare(model, eval_loader)
    main = accelerator.is_main_process
    identity = {
        "method": cfg.method.name,
        "model": backbone.name,
        "model_params": backbone.num_params,
        "task": task.name,
        "scorer": pipeline.scorer,
    }
    if main:
        _start_over(run_path)
        records.write_json(
            run_path / records.ENV,
            records.environment(
                accelerator.num_processes, str(accelerator.device), cfg.trainer.batch_size, 1, cfg.seed
            ),
        )
        records.write_json(
            run_path / "task.json",
            {"name": task.name, "splits": task.provenance, "counts": {s: len(r) for s, r in task.rows.items()}},
        )
        write_rendered_prompts(
            run_path / RENDERED_PROMPTS,
            task,
            pipeline.tokenizer,
            pipeline.max_length,
            cfg.method.show_rows,
            pipeline.context,
        )
        records.mark(run_path, "running", **identity)
    started = time.perf_counter()
    metrics = evaluate(model, eval_loader, accelerator, task, cfg.trainer.progress_bar)
    seconds = time.perf_counter() - started
    log.info("prompt design, %d demonstrations: %s", cfg.method.num_demonstrations, _describe(metrics))
    result = {
        **identity,
        "eval": metrics,
        "initial_eval": metrics,
        "main_metric": cfg.task.main_metric,
        "eval_examples": len(task.examples["validation"]),
        "best_step": 0,
        "steps": 0,
        "trainable_params": parameter_counts(model, cfg.method.name, backbone.num_params),
        "context_tokens": pipeline.context_tokens,
        "train_seconds": 0.0,
        "eval_seconds": round(seconds, 3),
        "train_samples_per_second": 0.0,
        "seed": cfg.seed,
    }
    if main:
        records.mark(run_path, "completed", **result)
    return result


def _describe(metrics: dict) -> str:
    return ", ".join(f"{key}={value:.4f}" for key, value in metrics.items())


def check_output_dir(cfg: DictConfig, job: TrainConfig | None) -> None:
    """Hydra creates the run directory and writes into it before any of our code runs: a path it cannot create,
    or a run directory this config cannot go on in (damaged records, another config's checkpoint), is a one-line
    error here, with nothing written. `job` is the validated config of a single run, None for a multirun."""
    multirun = job is None
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    path = Path(OmegaConf.select(cfg, key))
    problem = folder_problem(path)
    if problem:
        raise ConfigError(key, str(path), f"a folder that can be created ({problem})")
    if multirun:
        return
    metrics = path / records.METRICS
    if metrics.is_file():
        read_record(
            metrics,
            f"move it out of the run directory to resume from the checkpoint (a new one is written), or choose another {key}",
        )
    checkpoint.find(path, job)


def summary(result: dict, run_path: Path) -> str:
    metric = result["main_metric"]
    counts = result["trainable_params"]
    method = result.get("method", "prompt_tuning")
    if method == "prompt_design":
        return f"{metric}: {result['eval'][metric]:.4f} (prompt design, nothing trained) | {result['eval_seconds']:.1f}s | run: {run_path}"
    parts = ", ".join(
        f"{part} {counts[part]:,}"
        for part in ("prompt", "adapter", "backbone", "head")
        if counts.get(part) or part in ("prompt", "head") and method == "prompt_tuning"
    )
    fraction = f", {counts['fraction']:.4%} of the backbone" if counts.get("fraction") is not None else ""
    return (
        f"{metric}: {result['initial_eval'][metric]:.4f} at step 0 -> {result['eval'][metric]:.4f} "
        f"(best, step {result['best_step']}) | {method} | trainable parameters: {counts['total']:,} "
        f"({parts}{fraction}) | {result['train_seconds']:.1f}s | run: {run_path}"
    )


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="train")
def hydra_main(raw: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    run_path = Path(hydra_cfg.runtime.output_dir)
    key = sweep.config_key(raw)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    done = sweep.completed_record(run_path, key) if multirun else None
    if done:
        # a rerun of the same sweep: this job's results are already here
        print(f"skipped, completed earlier with the same config: {run_path}")
        return done["eval"][done["main_metric"]]
    fresh = records.status(run_path) is None
    # under a multi-process launch every rank runs this function; one writes the record and speaks
    main_process = PartialState().is_main_process
    try:
        cfg = validate(raw)
        if main_process:
            records.mark(run_path, "running", **{sweep.KEY_FIELD: key})
        result = train(cfg, run_path)
    except UserError as error:
        if not main_process:
            sys.exit(2)
        print(f"error: {error}", file=sys.stderr)
        if multirun:
            # one bad job of a sweep is recorded as failed; the other jobs go on
            records.mark(run_path, "failed", reason=str(error), **{sweep.KEY_FIELD: key})
            return None
        # a run that failed while training (divergence) recorded it and keeps its directory
        if fresh and records.status(run_path) != "failed":
            logging.shutdown()
            shutil.rmtree(run_path, ignore_errors=True)
        else:
            records.mark(run_path, "failed", reason=str(error))
        sys.exit(2)
    if main_process:
        print(summary(result, run_path))
    return result["eval"][result["main_metric"]]


@exit_on_user_error
def main() -> None:
    """One composition of each job's config before Hydra starts, so a mistake fails in one line with nothing
    written; Hydra's own commands (--info, --cfg, --shell-completion, ...) go straight to Hydra."""
    register_configs()
    check_launch(sys.argv[1:])
    found, cfg = precheck(sys.argv[1:])
    if cfg is not None and found.show is None:
        # a sweep's jobs are validated each in its own run, so one bad job fails alone
        check_output_dir(cfg, None if found.multirun else validate(without_hydra(cfg)))
    hydra_main()


if __name__ == "__main__":
    main()
