"""softprompt-train: tune one soft prompt on a frozen model, from a Hydra config.

The recipe reads top to bottom from `train`: `setup` (task, backbone, method, scorer, data,
optimiser; nothing written), `start_or_resume` (the run directory taken on through its RunRecord,
or a checkpoint continued), `run_steps` (the Accelerate loop with evaluation and early stopping)
and `finish` (the record completed, failed or preempted). One `Run` holds what the steps share.
Prompt design, which trains nothing, goes through the same setup and finish.
"""

from __future__ import annotations

import gc
import logging
import math
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import hydra
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler
from transformers.optimization import Adafactor

from softprompt import checkpoint, model_card, search, sharding, sweep, trackers
from softprompt import run_dir as records
from softprompt.cli import CONF_DIR, precheck, without_hydra
from softprompt.config import TrainConfig, TrainerConfig, flatten, register_configs, validate
from softprompt.distributed import check_launch
from softprompt.errors import (
    EXIT_USER_ERROR,
    ConfigError,
    UserError,
    as_user_error,
    exit_on_user_error,
    folder_problem,
    read_record,
)
from softprompt.method import (
    RENDERED_PROMPTS,
    build_model,
    parameter_counts,
    parameter_part,
    trains,
    write_rendered_prompts,
)
from softprompt.pipeline import (
    Decoding,
    Pipeline,
    build_pipeline,
    evaluate,
    make_loader,
    score_answers,
    write_answers,
)
from softprompt.registry import DEFAULT_METHOD, method_spec
from softprompt.scorer import PromptedModel
from softprompt.task import eval_subset

log = logging.getLogger("softprompt")


def parameter_groups(cfg: TrainerConfig, model: torch.nn.Module) -> list[dict]:
    """The trainable parameters as optimiser groups: one, or the classification head apart at trainer.head_lr
    (a single group otherwise, so checkpoints of runs without head_lr stay loadable)."""
    trainable = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
    head = [parameter for name, parameter in trainable if parameter_part(name) == "head"]
    if cfg.head_lr is None or not head:
        return [{"params": [parameter for _, parameter in trainable]}]
    rest = [parameter for name, parameter in trainable if parameter_part(name) != "head"]
    return [{"params": rest}, {"params": head, "lr": cfg.head_lr}]


def make_optimizer(cfg: TrainerConfig, params: list[dict]) -> torch.optim.Optimizer:
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


def save_prompt(run: Run) -> None:
    """What was trained, swapped in atomically (readers never see half a prompt): the adapter in PEFT's
    own format, naming a backbone any machine can load, or for model tuning the whole model in transformers'
    (safetensors); with its model card, the metrics so far."""
    # sharded, the trained parameters are gathered whole on every process and the main one writes them
    with sharding.gathered(run.model) if run.sharded else nullcontext():
        if not run.record.main:
            return
        peft_model = run.accelerator.unwrap_model(run.model).peft_model
        record = {**_record(run), "status": "running"}
        if run.subset is not None:
            record["eval_examples"] = len(run.subset)

        def fill(folder: Path) -> None:
            peft_model.save_pretrained(folder)
            model_card.make_portable(folder, run.cfg.model)
            model_card.write_card(folder, run.record.path, run.cfg, record)

        records.build_dir(run.record.path / records.PROMPT_DIR, fill)


def _record(run: Run) -> dict:
    """metrics.json's record of the run so far: what ran, its step 0 and best evaluations."""
    progress = run.progress
    return {
        **run.identity,
        "eval": progress.best,
        "initial_eval": progress.initial,
        "main_metric": run.cfg.task.main_metric,
        "eval_examples": len(run.pipeline.task.examples["validation"]),
        "best_step": progress.best_step,
        "eval_curve": progress.curve,
        "steps": progress.step,
        "trainable_params": run.counts,
    }


def _final_card(run: Run, result: dict, status: str, **fields: str) -> None:
    """prompt/'s model card with the run's final record; written before the record, as `completed` comes last."""
    prompt = run.record.path / records.PROMPT_DIR
    if run.record.main and prompt.is_dir():
        model_card.write_card(prompt, run.record.path, run.cfg, {**result, "status": status, **fields})


# a preempted run exits with 128 + the signal's number, as a shell reports a process that signal ended
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)


class Preemption:
    """SIGTERM (what a cluster scheduler sends), SIGUSR2 (submitit's preemption signal) and SIGINT (Ctrl-C)
    become a flag the loop checks between steps: it then writes a checkpoint and `exit` ends the process.
    A second Ctrl-C stops at once (a KeyboardInterrupt: the run is marked preempted, its last checkpoint kept).

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
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt
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
        if callable(previous) and previous is not signal.default_int_handler:
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


@dataclass
class Run:
    """What the steps of one run share: built by `setup`, advanced by the step loop, read by `finish`.
    The optimiser, scheduler and training data exist only for a method that trains."""

    cfg: TrainConfig
    record: records.RunRecord
    accelerator: Accelerator
    pipeline: Pipeline
    model: PromptedModel
    eval_loader: DataLoader
    identity: dict
    counts: dict
    # trainer.sharding=fsdp across several processes: the model is FSDP2-sharded, not wrapped for data parallelism
    sharded: bool = False
    # ... and these trained parameters stay whole on every process, their gradients averaged by softprompt.sharding
    replicated: list[torch.nn.Parameter] = field(default_factory=list)
    # task.eval_rows: the evaluation during training reads those rows (eval_loader), the best prompt then the whole split
    full_loader: DataLoader | None = None
    subset: list[int] | None = None
    # ... for which the best step's trainable parameters are kept
    best_state: dict[str, torch.Tensor] | None = None
    decoding: Decoding | None = None
    # a generation task: the last written answers by row, and the records of the last whole-split evaluation
    answers: dict[int, str] = field(default_factory=dict)
    predictions: list[dict] | None = None
    train_loader: DataLoader | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    # the shuffle's generator: its state at an epoch's start fixes that epoch's order
    data_order: torch.Generator | None = None
    trainable: list[torch.nn.Parameter] = field(default_factory=list)
    progress: checkpoint.Progress = field(default_factory=checkpoint.Progress)
    epoch_data_state: torch.Tensor | None = None
    # perf_counter at step 0 (earlier attempts' seconds included), and at the open log window's start
    started: float = 0.0
    window_start: float = 0.0
    last_step: int = 0
    failure: str | None = None
    preempted: bool = False


def train(cfg: TrainConfig, run_path: Path, record: records.RunRecord | None = None) -> dict:
    """One tuning run, end to end; returns the final metrics record.

    With a checkpoint in `run_path` (trainer.resume auto or must) the run continues exactly where
    it stopped; one that completed earlier with this config returns its record without training
    or writing anything. SIGTERM/SIGUSR2/SIGINT end it with a checkpoint, status `preempted` and
    exit status 128 + signal; a non-finite loss ends it as `failed` (a UserError); any other
    exception marks it `failed` too. `record` (default: a RunRecord of `run_path`) writes the run's files.
    """
    if record is None:
        with records.RunRecord(run_path) as record:
            return train(cfg, run_path, record)
    snapshot = checkpoint.find(run_path, cfg)
    if snapshot is not None and snapshot.progress.result is not None:
        log.info("%s completed earlier with this config: nothing to train", run_path)
        return snapshot.progress.result
    with Preemption() as preemption:
        run = setup(cfg, record)
        # a signal while loading: there is no step to finish, and nothing is written
        run.preempted = preemption.requested(run.accelerator)
        if run.preempted:
            finish(run, preemption)
        if trains(cfg):
            try:
                start_or_resume(run, snapshot)
                run_steps(run, preemption)
            finally:
                # also when a run stops on an error: the next run in this process starts tracker runs of its own
                trackers.finish(run.accelerator, run.record.path)
            result = finish(run, preemption, **_timing(run))
        else:
            result = finish(run, preemption, **_evaluate_design(run))
    _close_process_group()
    return result


def _close_process_group() -> None:
    """All ranks meet, then the process group goes, after the run has let go of the DDP model: destroyed before it,
    the group was freed later by the model's reducer, which now and then hung in gloo's destructor at exit."""
    if torch.distributed.is_initialized():
        gc.collect()
        PartialState().wait_for_everyone()
        PartialState().destroy_process_group()


def setup(cfg: TrainConfig, record: records.RunRecord) -> Run:
    """Task, backbone, method, scorer, data, optimiser: everything loaded and checked. Writes nothing."""
    training = trains(cfg)
    if training:
        trackers.check_installed(cfg.trainer.log_with)
    sharded = sharding.mode(cfg.trainer) == sharding.FSDP
    if sharded and PartialState().num_processes == 1:
        log.info("trainer.sharding=fsdp in a single process: nothing to shard across, the backbone stays whole")
        sharded = False
    if sharded:
        sharding.hand_over_from_accelerate()
    accelerator = Accelerator(
        mixed_precision=cfg.trainer.mixed_precision,
        gradient_accumulation_steps=cfg.trainer.grad_accum if training else 1,
        log_with=cfg.trainer.log_with if training else None,
        project_dir=str(record.path),
    )
    set_seed(cfg.seed)
    pipeline = build_pipeline(cfg)
    backbone, scorer = pipeline.backbone, pipeline.scorer
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
    replicated = []
    if sharded:
        # an adapter stays whole on every process; model tuning's weights are sharded with the rest
        if not method_spec(cfg.method.name).trains_backbone:
            replicated = [p for p in model.parameters() if p.requires_grad]
        model = sharding.shard(model, cfg.trainer, replicated)
    identity = {
        "method": cfg.method.name,
        "model": backbone.name,
        "model_params": backbone.num_params,
        "task": pipeline.task.name,
        "scorer": scorer,
    }
    decoding = Decoding.of(pipeline) if pipeline.task.generation else None
    if not training:
        model, eval_loader = _prepare(accelerator, sharded, model, make_loader(pipeline, "validation", training=False))
        return Run(cfg, record, accelerator, pipeline, model, eval_loader, identity, counts, sharded, decoding=decoding)
    train_loader = make_loader(pipeline, "train", training=True, seed=cfg.seed)
    data_order = train_loader.generator
    eval_loader = make_loader(pipeline, "validation", training=False)
    size = len(pipeline.task.examples["validation"])
    subset = eval_subset(size, cfg.task.eval_rows, cfg.task.dev_seed)
    full_loader = None
    if len(subset) < size:
        full_loader, eval_loader = eval_loader, make_loader(pipeline, "validation", training=False, indices=subset)
        full_loader = accelerator.prepare(full_loader)
    optimizer = make_optimizer(cfg.trainer, parameter_groups(cfg.trainer, model.peft_model))
    scheduler = make_scheduler(cfg.trainer, optimizer)
    model, optimizer, train_loader, eval_loader, scheduler = _prepare(
        accelerator, sharded, model, optimizer, train_loader, eval_loader, scheduler
    )
    run = Run(cfg, record, accelerator, pipeline, model, eval_loader, identity, counts, sharded, decoding=decoding)
    run.train_loader, run.optimizer, run.scheduler, run.data_order = train_loader, optimizer, scheduler, data_order
    if full_loader is not None:
        run.full_loader, run.subset = full_loader, subset
    run.trainable, run.replicated = [p for p in model.parameters() if p.requires_grad], replicated
    return run


def _prepare(accelerator: Accelerator, sharded: bool, model: PromptedModel, *objects: Any) -> tuple:
    """Accelerate's preparation of the model and what trains it; a sharded model is already laid out (a data-parallel
    wrapper would replicate it), so Accelerate prepares the rest."""
    if not sharded:
        return accelerator.prepare(model, *objects)
    prepared = accelerator.prepare(*objects)
    return (model, *(prepared if len(objects) > 1 else (prepared,)))


def begin(run: Run, fresh: bool) -> None:
    """The command takes the run on (RunRecord.start): an earlier attempt's files go when it starts over; then the
    reproducibility records, env.json and task.json."""
    record, task = run.record, run.pipeline.task
    record.start(fresh=fresh, **run.identity)
    if fresh and record.main:
        checkpoint.start_over(record.path)
    accelerator, trainer = run.accelerator, run.cfg.trainer
    record.write(
        records.ENV,
        records.environment(
            accelerator.num_processes,
            str(accelerator.device),
            trainer.batch_size,
            accelerator.gradient_accumulation_steps,
            run.cfg.seed,
            sharding.FSDP if run.sharded else "none",
        ),
    )
    described = {"name": task.name, "splits": task.provenance, "counts": {s: len(r) for s, r in task.rows.items()}}
    if task.generation:
        described["inputs"] = {split: len(examples) for split, examples in task.examples.items()}
        # what softprompt-predict writes at most with this run's prompt when generation.max_new_tokens is null
        described["max_new_tokens"] = run.pipeline.max_new_tokens
    if run.subset is not None:
        described["eval_subset"] = {"rows": len(run.subset), "seed": run.cfg.task.dev_seed, "indices": run.subset}
    record.write(records.TASK, described)


def start_or_resume(run: Run, snapshot: checkpoint.Snapshot | None) -> None:
    """Resume from the checkpoint (its states loaded and checked before the run is taken on), or start: evaluate
    step 0 and save that prompt."""
    if snapshot is not None:
        run.progress = snapshot.progress
        model = run.accelerator.unwrap_model(run.model)
        run.best_state = checkpoint.restore(snapshot, model, run.optimizer, run.scheduler, run.data_order)
        run.accelerator.step = run.progress.accelerator_step
    begin(run, fresh=snapshot is None)
    cfg = run.cfg
    if cfg.trainer.log_with:
        tracked = flatten(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True), scalars=True)
        trackers.start(
            run.accelerator,
            cfg.trainer.log_with,
            run.record.path,
            {key: value for key, value in tracked.items() if value is not None},
            first_step=0 if snapshot is None else run.progress.step + 1,
        )
    if snapshot is not None:
        if run.record.main:
            checkpoint.restore_files(snapshot, run.record.path)
        log.info("resumed from %s at step %d", snapshot.folder, run.progress.step)
        return
    progress = run.progress
    if run.subset is None:
        progress.initial = progress.best = _evaluate(run)
        _write_predictions(run)
    else:
        # step 0 on the whole split, and on the evaluated rows (a generation task scores them from the same answers)
        progress.initial_full = _evaluate(run, full=True)
        progress.initial = progress.best = _evaluate(run, reuse=run.pipeline.task.generation)
        run.best_state = _trained_state(run)
        run.record.append_log({"step": 0, "eval_subset": progress.initial})
        log.info("step 0, whole split: %s", _describe(progress.initial_full))
    progress.curve.append({"step": 0, **progress.initial})
    run.accelerator.log({f"eval/{key}": value for key, value in progress.initial.items()}, step=0)
    save_prompt(run)
    log.info("step 0: %s", _describe(progress.initial))


def run_steps(run: Run, preemption: Preemption) -> None:
    """The step loop: until trainer.max_steps, an early stop, a divergence or a preemption signal. A resumed
    epoch replays the same shuffle and skips the batches already trained on."""
    trainer, progress, accelerator = run.cfg.trainer, run.progress, run.accelerator
    checkpoint_every = trainer.checkpoint_every or trainer.eval_every
    run.last_step = trainer.max_steps
    run.started = time.perf_counter() - progress.seconds
    run.window_start = time.perf_counter()
    main = run.record.main
    bar = tqdm(total=run.last_step, initial=progress.step, desc="train", disable=not main or not trainer.progress_bar)
    run.model.train()
    done = progress.step >= run.last_step
    run.epoch_data_state = run.data_order.get_state()
    while not (done or run.failure or run.preempted):
        run.epoch_data_state = run.data_order.get_state()
        skipped = progress.batches_in_epoch
        batches = accelerator.skip_first_batches(run.train_loader, skipped) if skipped else run.train_loader
        for batch in batches:
            if not _learn(run, batch):
                break
            if not accelerator.sync_gradients:
                continue
            progress.step += 1
            bar.update(1)
            done = _after_step(run, bar)
            run.preempted = preemption.requested(accelerator)
            if run.preempted or (not done and progress.step % checkpoint_every == 0):
                save_checkpoint(run)
            if done or run.preempted:
                break
        else:
            progress.epoch += 1
            progress.batches_in_epoch = 0
    bar.close()


def _learn(run: Run, batch: dict) -> bool:
    """One micro-batch forward and backward, and the optimiser step when gradients sync; False (and
    `run.failure` says why) when the update would diverge, which is then not applied."""
    accelerator, progress = run.accelerator, run.progress
    with accelerator.accumulate(run.model):
        loss = run.model(batch).loss
        accelerator.backward(loss)
        if run.replicated and accelerator.sync_gradients:
            sharding.average_gradients(run.replicated)
        loss_value = accelerator.reduce(loss.detach(), "mean").item()
        grad_norm = None
        if accelerator.sync_gradients:
            grad_norm = sharding.full(
                accelerator.clip_grad_norm_(run.trainable, run.cfg.trainer.max_grad_norm or math.inf)
            )
        run.failure = _divergence(loss_value, grad_norm, run.cfg.trainer, progress.step + 1, progress.best_step)
        if run.failure:
            return False
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad()
    progress.batches_in_epoch += 1
    rows = batch["labels"].shape[0] * accelerator.num_processes
    progress.samples += rows
    progress.window_samples += rows
    progress.window_loss += loss_value
    progress.window_batches += 1
    return True


def _after_step(run: Run, bar: tqdm) -> bool:
    """The log line and the evaluation a step is due for (with early stopping); whether training is done."""
    trainer, progress = run.cfg.trainer, run.progress
    if progress.step % trainer.log_every == 0 or progress.step == run.last_step:
        now = time.perf_counter()
        entry = {
            "step": progress.step,
            "loss": round(progress.window_loss / progress.window_batches, 6),
            "lr": run.scheduler.get_last_lr()[0],
            "samples_per_second": round(progress.window_samples / max(now - run.window_start, 1e-9), 2),
        }
        bar.set_postfix(loss=entry["loss"])
        run.record.append_log(entry)
        run.accelerator.log({"train/loss": entry["loss"], "train/lr": entry["lr"]}, step=progress.step)
        progress.window_samples, progress.window_batches, progress.window_loss = 0, 0, 0.0
        run.window_start = now
    if progress.step % trainer.eval_every == 0 or progress.step == run.last_step:
        _evaluate_step(run)
    return progress.step >= run.last_step


def _evaluate_step(run: Run) -> None:
    """Evaluate at this step: a better prompt is saved, and trainer.early_stopping_patience evaluations without
    a gain end training here."""
    progress, main_metric, patience = run.progress, run.cfg.task.main_metric, run.cfg.trainer.early_stopping_patience
    current = _evaluate(run)
    progress.curve.append({"step": progress.step, **current})
    run.accelerator.log({f"eval/{key}": value for key, value in current.items()}, step=progress.step)
    log.info("step %d: %s", progress.step, _describe(current))
    if run.subset is not None:
        run.record.append_log({"step": progress.step, "eval_subset": current})
    if current[main_metric] > progress.best[main_metric]:
        progress.best, progress.best_step, progress.stale = current, progress.step, 0
        save_prompt(run)
        if run.subset is None:
            _write_predictions(run)
        else:
            run.best_state = _trained_state(run)
    else:
        progress.stale += 1
    if patience and progress.stale >= patience:
        log.info("early stop at step %d: no gain in %s for %d evaluations", progress.step, main_metric, progress.stale)
        run.last_step = progress.step


def save_checkpoint(run: Run) -> None:
    progress = run.progress
    progress.seconds = time.perf_counter() - run.started
    progress.accelerator_step = run.accelerator.step
    log_path = run.record.path / records.TRAIN_LOG
    progress.log_bytes = log_path.stat().st_size if log_path.is_file() else 0
    if not (run.record.main or run.sharded):
        return
    # sharded, every process takes part in gathering the tensors whole, and the main process writes them
    checkpoint.save(
        run.record.path,
        run.cfg,
        progress,
        run.accelerator.unwrap_model(run.model),
        run.optimizer,
        run.scheduler,
        run.epoch_data_state,
        run.best_state,
        write=run.record.main,
    )


def _timing(run: Run) -> dict:
    seconds = time.perf_counter() - run.started
    return {
        "train_seconds": round(seconds, 3),
        "train_samples_per_second": round(run.progress.samples / seconds, 3) if seconds > 0 else 0.0,
    }


def _evaluate_design(run: Run) -> dict:
    """method=prompt_design: nothing trains. Evaluate the instruction and demonstrations once, and write the
    exact text of the first validation rows to rendered_prompts.txt, for the user to read and edit."""
    pipeline, cfg = run.pipeline, run.cfg
    begin(run, fresh=True)
    if run.record.main:
        write_rendered_prompts(
            run.record.path / RENDERED_PROMPTS,
            pipeline.task,
            pipeline.tokenizer,
            pipeline.max_length,
            cfg.method.show_rows,
            pipeline.context,
        )
    started = time.perf_counter()
    run.progress.initial = run.progress.best = _evaluate(run, full=True)
    run.progress.curve.append({"step": 0, **run.progress.best})
    seconds = time.perf_counter() - started
    _write_predictions(run)
    log.info("prompt design, %d demonstrations: %s", cfg.method.num_demonstrations, _describe(run.progress.best))
    return {
        "context_tokens": pipeline.context_tokens,
        "train_seconds": 0.0,
        "eval_seconds": round(seconds, 3),
        "train_samples_per_second": 0.0,
    }


def finish(run: Run, preemption: Preemption, **measured: float) -> dict:
    """The run's end in its record: preempted (exits), failed (raises), or completed with its checkpoint."""
    progress = run.progress
    if run.preempted:
        signame = signal.Signals(preemption.signum or signal.SIGTERM).name
        reason = (
            f"stopped by {signame} at step {progress.step}; start the same run again to resume from its checkpoint"
            if run.record.started
            else f"stopped by {signame} while loading, before the run started: nothing was written"
        )
        run.record.preempt(reason)
        log.warning(reason)
        preemption.exit()
    result = {**_record(run), **measured, "seed": run.cfg.seed}
    if run.subset is not None:
        result.update(_evaluate_best(run))
    if run.failure:
        _final_card(run, result, "failed", reason=run.failure)
        run.record.fail(run.failure, **result)
        raise UserError(run.failure)
    _final_card(run, result, "completed")
    if run.optimizer is not None:
        progress.result = result
        save_checkpoint(run)
    run.record.complete(**result)
    return result


def _evaluate(run: Run, full: bool = False, reuse: bool = False) -> dict:
    """Metrics of the current prompt on the evaluated rows (the whole split with `full`). A generation task writes
    answers and keeps the last ones (`run.answers`); with `reuse` it scores the evaluated rows from those."""
    loader = run.full_loader if full and run.full_loader is not None else run.eval_loader
    task, progress = run.pipeline.task, run.cfg.trainer.progress_bar
    if not task.generation:
        metrics = evaluate(run.model, loader, run.accelerator, task, progress)
        if run.sharded:
            sharding.reshard(run.model)
        return metrics
    if not reuse:
        run.answers = write_answers(run.model, loader, run.accelerator, run.decoding, progress)
        if run.sharded:
            sharding.reshard(run.model)
    answers = run.answers if run.subset is None or full else {i: run.answers[i] for i in run.subset}
    metrics, run.predictions = score_answers(task, answers)
    return metrics


def _write_predictions(run: Run) -> None:
    """predictions.jsonl: the answers of the prompt that prompt/ holds, on the whole split (a generation task)."""
    if run.predictions is not None and run.record.main:
        records.write_jsonl(run.record.path / records.PREDICTIONS, run.predictions)


def _trained_state(run: Run) -> dict[str, torch.Tensor]:
    """A copy of the trainable parameters, to evaluate the best step's again at the end."""
    model = run.accelerator.unwrap_model(run.model)
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _evaluate_best(run: Run) -> dict:
    """task.eval_rows: the best step's prompt on the whole split; metrics.json's `eval` and `initial_eval` are then
    the whole split's, and `eval_subset` what training chose by."""
    model = run.accelerator.unwrap_model(run.model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in run.best_state:
                parameter.copy_(sharding.like(parameter, run.best_state[name]))
    best = _evaluate(run, full=True)
    log.info("best prompt (step %d), whole split: %s", run.progress.best_step, _describe(best))
    _write_predictions(run)
    return {
        "eval": best,
        "initial_eval": run.progress.initial_full,
        "eval_subset": {"rows": len(run.subset), "best": run.progress.best, "initial": run.progress.initial},
    }


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
    method = result.get("method", DEFAULT_METHOD)
    spec = method_spec(method)
    if not spec.trains:
        return f"{metric}: {result['eval'][metric]:.4f} ({spec.label}, nothing trained) | {result['eval_seconds']:.1f}s | run: {run_path}"
    parts = ", ".join(
        f"{part} {counts[part]:,}"
        for part in ("prompt", "adapter", "backbone", "head")
        if counts.get(part) or part in spec.summary_parts
    )
    fraction = f", {counts['fraction']:.4%} of the backbone" if counts.get("fraction") is not None else ""
    return (
        f"{metric}: {result['initial_eval'][metric]:.4f} at step 0 -> {result['eval'][metric]:.4f} "
        f"(best, step {result['best_step']}) | {method} | trainable parameters: {counts['total']:,} "
        f"({parts}{fraction}) | {result['train_seconds']:.1f}s | run: {run_path}"
    )


def job_record(raw: DictConfig) -> records.RunRecord:
    """The RunRecord of the job Hydra is running: `.hydra/` as Hydra would write it and the log file named after the
    job, both written once the run is taken on. softprompt-train and `softprompt.run` share it, so a run made from
    Python is one the other commands accept."""
    hydra_cfg = HydraConfig.get()
    run_path = Path(hydra_cfg.runtime.output_dir)
    hydra_files = {
        "config.yaml": OmegaConf.to_yaml(raw),
        "hydra.yaml": OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})),
        "overrides.yaml": OmegaConf.to_yaml(hydra_cfg.overrides.task),
    }
    return records.RunRecord(
        run_path,
        sweep.config_key(raw),
        new_folders=records.new_folders(run_path),
        hydra_files=hydra_files,
        log_name=f"{hydra_cfg.job.name}.log",
    )


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="train")
def hydra_main(raw: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    run_path = Path(hydra_cfg.runtime.output_dir)
    key = sweep.config_key(raw)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        done = sweep.completed_record(run_path, key) if multirun else None
    except UserError as error:
        # a job whose record is damaged is left as it is; the sweep's summary counts it as failed
        if PartialState().is_main_process:
            print(f"error: {error}", file=sys.stderr)
        return None
    if done:
        # a rerun of the same sweep: this job's results are already here
        print(f"skipped, completed earlier with the same config: {run_path}")
        return done["eval"][done["main_metric"]]
    record = job_record(raw)
    try:
        with record:
            if multirun:
                # a sweep's job folder is the sweep's own: a job that fails is recorded there, the others go on
                record.start()
            result = train(validate(raw), run_path, record)
    except Exception as error:
        user_error = as_user_error(error)
        if user_error is None:
            raise
        # under a multi-process launch every rank runs this function; one writes the record and speaks
        if record.main:
            print(f"error: {user_error}", file=sys.stderr)
        if multirun:
            return None
        sys.exit(EXIT_USER_ERROR)
    if record.main:
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
        search.check_storage(cfg)
        # a sweep's jobs are validated each in its own run, so one bad job fails alone
        check_output_dir(cfg, None if found.multirun else validate(without_hydra(cfg)))
    hydra_main()


if __name__ == "__main__":
    main()
