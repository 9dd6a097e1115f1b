"""Benchmark the training loop against its physical limit and against the reference recipe.

    python scripts/bench.py                       # full: about 10 minutes on 2 CPU cores
    python scripts/bench.py --quick --json b.json # reduced: under 2 minutes
    python scripts/bench.py --dtype bfloat16      # the backbone in bf16 (prompt and head in fp32), its own section

Per model (minilm-l6 with a head; smollm2-135m and a randomly initialised T5 of t5.1.1-small shape
with rank classification), on batches drawn from real tasks (SST-2, RTE from $SOFTPROMPT_DATA):

1. step_over_forward: a training step (forward, backward, clipping, AdamW step) over an inference
   forward (eval mode, no grad) of the same batches; backward through frozen weights computes only
   input gradients, so about 2 is the limit. Measured beside it: the same step with
   trainer.gradient_checkpointing (recomputes each layer's forward: about 3), and accumulated (the
   batch's rows in two micro-batches of half the rows, gradients accumulated: what
   `trainer.batch_size=8 trainer.grad_accum=2` does for 16 rows per optimizer step);
2. throughput_vs_reference: steady-state samples/s of softprompt's own `train` over the reference
   recipe (scripts/reference_recipe.py: PEFT + HF Trainer), same rows, batch, steps, starting prompt;
   both tuned prompts are then scored by the same evaluation on the dev rows;
3. train_memory_over_inference: peak resident memory of a training step over that of an inference
   forward, each in a fresh process (model, batch, peak of the step; the four run side by side), plain,
   checkpointed and accumulated; the activation-only ratio (peak minus the memory held before the
   step) is printed beside it;
4. rank_eval_speedup: evaluation throughput of the rank scorer over the naive way (one forward per
   candidate, logits at every position over the whole vocabulary), scores checked to agree.

`--sharding` measures instead, in its own section, what trainer.sharding=fsdp saves each process: 2-process
torchrun launches of the product's own setup and training step, data parallel against FSDP, on fp32
decoders of hundreds of MB (smollm2-135m, gemma3-270m): the weight memory each process holds, its resident
memory once set up, and its peak over training steps.

Variants are interleaved in one process and medians kept, since the machine may be shared.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from reference_recipe import run_reference
from softprompt import run_dir as records
from softprompt.backbone import Backbone
from softprompt.batching import IGNORE, Collator, encode
from softprompt.cli import compose_config
from softprompt.config import TrainConfig, register_configs, validate
from softprompt.pipeline import Pipeline, build_pipeline, evaluate, make_loader
from softprompt.scorer import PromptedModel
from softprompt.soft_prompt import attach_prompt, initial_prompt, prompt_parameter
from softprompt.train import make_optimizer, train

DATA = Path(os.environ.get("SOFTPROMPT_DATA", ROOT.parent / "shared" / "data"))
M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h

TASKS = {
    "sst2": [
        "task=custom",
        "task.name=sst2",
        f"task.data_files.train={DATA / 'sst2' / 'train.tsv'}",
        f"task.data_files.validation={DATA / 'sst2' / 'dev.tsv'}",
        "task.text_fields=[sentence]",
        "task.template='{sentence} It was'",
        "task.labels=[0,1]",
        "task.verbalizer=[terrible,great]",
        "task.max_length=72",
    ],
    "rte": [
        "task=custom",
        "task.name=rte",
        f"task.data_files.train={DATA / 'superglue' / 'RTE' / 'train.jsonl'}",
        f"task.data_files.validation={DATA / 'superglue' / 'RTE' / 'val.jsonl'}",
        "task.text_fields=[premise,hypothesis]",
        "task.template='{premise} Question: {hypothesis} True or False?'",
        "task.labels=[entailment,not_entailment]",
        "task.verbalizer=[True,False]",
        "task.max_length=256",
    ],
}
T5_SMALL_SHAPE = (
    "model.from_config={model_type: t5, d_model: 512, d_kv: 64, d_ff: 1024, num_layers: 8, num_decoder_layers: 8,"
    " num_heads: 6, feed_forward_proj: gated-gelu, tie_word_embeddings: false}"
)
# name -> (model overrides, task)
MODELS = {
    "minilm-l6": (["model=minilm-l6"], "sst2"),
    "smollm2-135m": (["model=smollm2-135m"], "sst2"),
    "t5-small-shape": (["model=tiny-t5", "model.name=t5-small-shape", T5_SMALL_SHAPE], "rte"),
}


class Sizes:
    """How much each measurement does (--quick shrinks everything but the batch shapes), with the backbone in `dtype`."""

    def __init__(self, quick: bool, dtype: str = "float32"):
        self.dtype = dtype
        self.batch = 8 if quick else 16
        self.batches = 1 if quick else 3
        self.repeats = 1 if quick else 3
        self.train_rows = 512 if quick else 4000
        self.eval_rows = 8 if quick else 128
        self.metric_eval_rows = 0 if quick else 200
        self.steps = {
            "minilm-l6": 3 if quick else 60,
            "smollm2-135m": 3 if quick else 8,
            "t5-small-shape": 3 if quick else 8,
        }


def config(name: str, sizes: Sizes, **extra: object) -> TrainConfig:
    model_overrides, task = MODELS[name]
    overrides = (
        model_overrides
        + TASKS[task]
        + [
            "prompt.length=20",
            f"trainer.batch_size={sizes.batch}",
            f"trainer.eval_batch_size={sizes.batch * 2}",
            f"task.max_train_rows={sizes.train_rows}",
            f"task.max_eval_rows={sizes.eval_rows}",
            "trainer.progress_bar=false",
            f"model.dtype={sizes.dtype}",
        ]
        + [f"{key}={value}" for key, value in extra.items()]
    )
    return validate(compose_config(overrides))


def prompted(pipeline: Pipeline, cfg: TrainConfig, backbone: Backbone | None = None) -> PromptedModel:
    backbone = backbone or pipeline.backbone
    peft_model = attach_prompt(
        backbone, cfg.prompt, pipeline.label_token_ids, head=pipeline.scorer == "head", seed=cfg.seed
    )
    return PromptedModel(
        peft_model,
        backbone.kind,
        pipeline.scorer,
        cfg.scorer.reduction,
        cfg.trainer.backbone_dropout,
        cfg.trainer.gradient_checkpointing,
        cfg.trainer.compile,
    )


def checkpointed_twin(pipeline: Pipeline, cfg: TrainConfig) -> PromptedModel:
    """The same model from its own copy of the backbone, trained with trainer.gradient_checkpointing."""
    cfg = replace(cfg, trainer=replace(cfg.trainer, gradient_checkpointing=True))
    return prompted(pipeline, cfg, pipeline.load_backbone_copy())


def training_batches(pipeline: Pipeline, sizes: Sizes, parts: int = 1) -> list[dict]:
    """Fixed batches of random training rows: the real task's length distribution, gold answers only. With `parts`,
    each batch's rows come as that many consecutive micro-batches (padded each to its own longest row)."""
    rows = encode(
        pipeline.task.examples["train"],
        pipeline.tokenizer,
        pipeline.backbone.kind,
        pipeline.scorer,
        pipeline.cfg.task.max_length,
    )
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    collate = Collator(pipeline.backbone.kind, pipeline.scorer, pipeline.tokenizer.pad_token_id, all_candidates=False)
    size = sizes.batch // parts
    return [collate([rows[i] for i in order[k * size : (k + 1) * size]]) for k in range(sizes.batches * parts)]


def train_step(model: PromptedModel, optimizer: torch.optim.Optimizer, *parts: dict) -> None:
    """What the loop does per optimizer step: forward in train mode and backward over each part (the batch, or its
    micro-batches with losses scaled as accelerate's gradient accumulation does), clip, step."""
    model.train()
    for part in parts:
        (model(part).loss / len(parts)).backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad()


@torch.no_grad()
def inference_forward(model: PromptedModel, batch: dict) -> None:
    model.eval()
    model(batch)


def interleaved(variants: dict[str, callable], repeats: int) -> dict[str, float]:
    """Median seconds of each variant, run in turn `repeats` times after one warm-up each."""
    for run in variants.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


# the training modes measured side by side; keys of the plain step carry no suffix
MODES = ("step", "checkpointed", "accumulated")


def suffix(mode: str) -> str:
    return "" if mode == "step" else f"_{mode}"


def step_over_forward(
    model: PromptedModel, twin: PromptedModel, cfg: TrainConfig, batches: list[dict], halves: list[dict], repeats: int
) -> dict:
    """`twin` is the model with gradient checkpointing; `halves` the same batches' rows as micro-batches of half the
    rows, stepped with accumulated gradients; all measured in the same interleaved rounds."""
    optimizer = make_optimizer(cfg.trainer, [p for p in model.parameters() if p.requires_grad])
    twin_optimizer = make_optimizer(cfg.trainer, [p for p in twin.parameters() if p.requires_grad])
    variants = {}
    for k, batch in enumerate(batches):
        variants[f"step{k}"] = lambda batch=batch: train_step(model, optimizer, batch)
        variants[f"forward{k}"] = lambda batch=batch: inference_forward(model, batch)
        variants[f"checkpointed{k}"] = lambda batch=batch: train_step(twin, twin_optimizer, batch)
        variants[f"accumulated{k}"] = lambda k=k: train_step(model, optimizer, *halves[2 * k : 2 * k + 2])
    medians = interleaved(variants, repeats)
    seconds = {
        kind: sum(medians[f"{kind}{k}"] for k in range(len(batches))) / len(batches) for kind in MODES + ("forward",)
    }
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    return {
        **{f"{kind}_s": value for kind, value in seconds.items()},
        **{f"ratio{suffix(kind)}": seconds[kind] / seconds["forward"] for kind in MODES},
        "tokens_per_batch": tokens / len(batches),
    }


# ---- peak memory, each measurement in a fresh process -------------------------------------------


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _memory_probe(name: str, sizes: Sizes, mode: str, queue) -> None:
    """Load, build the batch, release free heap to the OS, reset the peak, run one step or forward.

    glibc's mmap threshold is pinned first: each tensor of 128 KiB or more then gets its own mapping, returned when the
    tensor is freed, so the peak counts live tensors rather than heap fragments (left dynamic, the same step's peak
    moved by 200 MiB between runs)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    register_configs()
    cfg = config(name, sizes, **{"trainer.gradient_checkpointing": mode == "train_checkpointed"})
    pipeline = build_pipeline(cfg)
    model = prompted(pipeline, cfg)
    parts = (
        training_batches(pipeline, sizes, parts=2)[:2]
        if mode == "train_accumulated"
        else training_batches(pipeline, sizes)[:1]
    )
    optimizer = make_optimizer(cfg.trainer, [p for p in model.parameters() if p.requires_grad])
    libc.malloc_trim(0)
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident set size
    train_step(model, optimizer, *parts) if mode.startswith("train") else inference_forward(model, parts[0])
    queue.put((before, _rss_kib("VmHWM")))


def peak_memory(name: str, sizes: Sizes) -> dict:
    # a forkserver that imported the libraries once starts each probe in well under a second
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "transformers", "peft", "softprompt.pipeline", "softprompt.train"])
    # side by side: each process's peak is its own, so running them together only saves time
    modes = ("inference",) + tuple(f"train{suffix(mode)}" for mode in MODES)
    queues = {mode: context.Queue() for mode in modes}
    processes = [context.Process(target=_memory_probe, args=(name, sizes, mode, queues[mode])) for mode in modes]
    for process in processes:
        process.start()
    result = {mode: queues[mode].get() for mode in modes}
    for process in processes:
        process.join()
    base_i, peak_i = result["inference"]
    out = {"inference_peak_mib": peak_i / 1024}
    for key in map(suffix, MODES):
        base, peak = result[f"train{key}"]
        out |= {
            f"train{key}_peak_mib": peak / 1024,
            f"ratio{key}": peak / peak_i,
            f"activation_ratio{key}": (peak - base) / max(peak_i - base_i, 1),
        }
    return out


# ---- sharded backbone: each process's memory, data parallel against FSDP --------------------------

SHARDED_MODELS = ("smollm2-135m", "gemma3-270m")
SHARDED_STEPS = 3


def _held_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers this process holds: its shard of a sharded tensor, else the whole tensor."""
    from torch.distributed.tensor import DTensor

    tensors = [*model.parameters(), *model.buffers()]
    locals_ = [tensor.to_local() if isinstance(tensor, DTensor) else tensor for tensor in tensors]
    return sum(tensor.numel() * tensor.element_size() for tensor in locals_)


def sharding_probe(name: str, mode: str, out: Path) -> None:
    """One process of a 2-process launch: the product's setup (trainer.sharding=`mode`), then its training step
    `SHARDED_STEPS` times; writes this process's memory figures to `out`.<rank>.json."""
    from softprompt.distributed import init_processes
    from softprompt.train import _learn, setup

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    state = init_processes()
    register_configs()
    overrides = [
        f"model={name}",
        *TASKS["sst2"],
        "prompt.length=20",
        "trainer.batch_size=16",
        "task.max_train_rows=512",
        "task.max_eval_rows=32",
        "trainer.progress_bar=false",
        f"trainer.sharding={mode}",
    ]
    cfg = validate(compose_config(overrides))
    with tempfile.TemporaryDirectory() as work:
        run = setup(cfg, records.RunRecord(Path(work) / "run", main=False))
        held = _held_bytes(run.model)
        libc.malloc_trim(0)
        set_up = _rss_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        run.model.train()
        started = time.perf_counter()
        for _, batch in zip(range(SHARDED_STEPS), run.train_loader):
            _learn(run, batch)
        seconds = (time.perf_counter() - started) / SHARDED_STEPS
        figures = {
            "weights_mib": held / 2**20,
            "set_up_rss_mib": set_up / 1024,
            "train_peak_rss_mib": _rss_kib("VmHWM") / 1024,
            "step_seconds": seconds,
        }
    records.write_json(out.with_name(f"{out.name}.{state.process_index}.json"), figures)


def sharded_memory(name: str, work: Path) -> dict:
    """Each mode in its own 2-process launch; per mode, the larger of the two processes' figures."""
    result = {}
    for mode in ("none", "fsdp"):
        out = work / f"{name}-{mode}"
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        command = [*launch, str(Path(__file__).resolve()), "--sharding-probe", name, mode, str(out)]
        subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        ranks = [records.read_json(out.with_name(f"{out.name}.{rank}.json")) for rank in (0, 1)]
        result[mode] = {key: max(rank[key] for rank in ranks) for key in ranks[0]}
    none, fsdp = result["none"], result["fsdp"]
    result["weights_ratio"] = fsdp["weights_mib"] / none["weights_mib"]
    result["train_peak_ratio"] = fsdp["train_peak_rss_mib"] / none["train_peak_rss_mib"]
    return result


def sharded_table(results: dict) -> str:
    lines = [
        "| model (fp32) | sharding | weights held per process (MiB) | resident once set up (MiB) |"
        " peak over training steps (MiB) | seconds per step |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        for mode in ("none", "fsdp"):
            row = result[mode]
            lines.append(
                f"| {name} | {mode} | {row['weights_mib']:.0f} | {row['set_up_rss_mib']:.0f} |"
                f" {row['train_peak_rss_mib']:.0f} | {row['step_seconds']:.2f} |"
            )
        lines.append(
            f"| {name} | **fsdp / none** | **{result['weights_ratio']:.2f}x** | |"
            f" **{result['train_peak_ratio']:.2f}x** | |"
        )
    return "\n".join(lines)


def sharding_section(models: list[str], markdown: Path) -> None:
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as work:
        results = {name: sharded_memory(name, Path(work)) for name in models}
    for name, result in results.items():
        print(f"{name}: {json.dumps(result)}", flush=True)
    command = "python scripts/bench.py --sharding" + (
        "" if tuple(models) == SHARDED_MODELS else " --models " + " ".join(models)
    )
    body = "\n".join(
        [
            "## Sharded backbone (`trainer.sharding=fsdp`), memory per process",
            "",
            f"`{command}` ({time.perf_counter() - started:.0f} s; load average {load_before:.2f} at the start)."
            f" Machine: {machine()}. {versions()}.",
            (
                "Two processes on CPU (torchrun, gloo), each running the product's own setup (`softprompt.train.setup`)"
                f" and training step on SST-2 rows, 16 a process, 20-token prompt, {SHARDED_STEPS} steps; data parallel"
                " (`none`) against FSDP2 (`fsdp`: each transformer layer and the root sharded, the prompt whole on each"
                " process). Weights held: the bytes of parameters and buffers a process keeps at rest (its shards under"
                " FSDP). Resident once set up: RSS after setup with freed heap returned (glibc's mmap threshold pinned"
                " at 128 KiB, `malloc_trim`); peak over training steps: VmHWM reset after setup. Each figure is the larger"
                " of the two processes'. Loading still reads the whole checkpoint into each process before it is sharded,"
                " so a process's peak while loading is the unsharded model's."
            ),
            "",
            sharded_table(results),
            "",
            (
                "At rest each process holds 1/N of the weights. During a step the root group (the embeddings, tied to the"
                " output layer in both decoders: 21% of smollm2-135m's weights, 63% of gemma3-270m's) is gathered whole"
                " while the process also keeps its own shard of it, and each layer is gathered only while it computes."
                " So the training peak moves by about -(1 - 1/N) x layers + 1/N x root against data parallelism: on 2"
                " processes -200 + 56 = -144 MiB for smollm2-135m and -176 + 335 = +159 MiB for gemma3-270m (measured:"
                " -122 and +148); with 8 processes gemma3-270m's would be -308 + 84 = -224 MiB."
            ),
        ]
    )
    print(body)
    write_markdown(markdown, body, "bench.py", "sharding")


# ---- throughput against the reference recipe ----------------------------------------------------


def ours_throughput(cfg: TrainConfig, work: Path) -> tuple[list[float], dict]:
    """softprompt's own train(); per-step samples/s from its log (evaluation only at step 0 and the end)."""
    run_path = work / "ours"
    run_path.mkdir(parents=True)
    result = train(cfg, run_path)
    log = [json.loads(line) for line in (run_path / records.TRAIN_LOG).read_text().splitlines()]
    return [cfg.trainer.batch_size / entry["samples_per_second"] for entry in log], result


def throughput(name: str, sizes: Sizes, work: Path) -> dict:
    steps = sizes.steps[name]
    # quick: no metric comparison, but train() still evaluates at step 0 and the end, so few rows
    extra = {
        "trainer.log_every": 1,
        "trainer.eval_every": steps,
        "trainer.checkpoint_every": steps,
        "task.max_eval_rows": sizes.metric_eval_rows or 8,
    }
    cfg = config(name, sizes, **{"trainer.max_steps": steps, **extra})
    ours_steps, ours_result = ours_throughput(cfg, work)
    pipeline = build_pipeline(cfg)
    # the vectors attach_prompt starts from, so both recipes begin at the same prompt
    initial = initial_prompt(
        cfg.prompt, pipeline.backbone, pipeline.label_token_ids, torch.Generator().manual_seed(cfg.seed)
    )
    rows = encode(
        pipeline.task.examples["train"],
        pipeline.tokenizer,
        pipeline.backbone.kind,
        pipeline.scorer,
        cfg.task.max_length,
    )
    torch.manual_seed(cfg.seed)
    reference_model, reference_steps = run_reference(cfg, pipeline.backbone, rows, pipeline.scorer, initial)
    ours_s = statistics.median(ours_steps[1:])
    reference_s = statistics.median(reference_steps[1:])
    out = {
        "steps": steps,
        "ours_samples_per_s": cfg.trainer.batch_size / ours_s,
        "reference_samples_per_s": cfg.trainer.batch_size / reference_s,
        "ratio": reference_s / ours_s,
    }
    if sizes.metric_eval_rows:
        from accelerate import Accelerator

        model = PromptedModel(reference_model, pipeline.backbone.kind, pipeline.scorer, cfg.scorer.reduction)
        loader = make_loader(pipeline, "validation", training=False)
        metric = cfg.task.main_metric
        out.update(
            metric=metric,
            initial_metric=ours_result["initial_eval"][metric],
            ours_metric=ours_result["eval"][metric],
            ours_best_step=ours_result["best_step"],
            reference_metric=evaluate(model, loader, Accelerator(cpu=True), pipeline.task, progress=False)[metric],
            dev_rows=len(pipeline.task.examples["validation"]),
        )
    return out


# ---- rank-classification evaluation against the naive way ---------------------------------------


@torch.no_grad()
def naive_scores(model: PromptedModel, batch_rows: list, kind: str, pad: int) -> torch.Tensor:
    """One forward per candidate through PEFT's own forward, log-softmax over the whole vocabulary everywhere."""
    peft_model = model.peft_model
    choices = max(len(row.candidate_ids) for row in batch_rows)
    table = torch.full((len(batch_rows), choices), float("-inf"))
    for choice in range(choices):
        members = [n for n, row in enumerate(batch_rows) if choice < len(row.candidate_ids)]
        answers = [batch_rows[n].candidate_ids[choice] for n in members]
        if kind == "decoder":
            sequences = [batch_rows[n].input_ids + answer for n, answer in zip(members, answers)]
            width = max(map(len, sequences))
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
            log_probs = (
                peft_model(input_ids=ids, attention_mask=mask)
                .logits.float()
                .log_softmax(-1)[:, model_prompt_length(model) :]
            )
            for row, (n, answer) in enumerate(zip(members, answers)):
                start = len(batch_rows[n].input_ids)
                positions = torch.arange(start - 1, start - 1 + len(answer))
                table[n, choice] = log_probs[row, positions, torch.tensor(answer)].sum()
        else:
            inputs = [batch_rows[n].input_ids for n in members]
            width = max(map(len, inputs))
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in inputs])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in inputs])
            longest = max(map(len, answers))
            labels = torch.tensor([a + [IGNORE] * (longest - len(a)) for a in answers])
            log_probs = peft_model(input_ids=ids, attention_mask=mask, labels=labels).logits.float().log_softmax(-1)
            picked = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels != IGNORE)
            table[torch.tensor(members), choice] = picked.sum(-1)
    return table


def model_prompt_length(model: PromptedModel) -> int:
    return prompt_parameter(model.peft_model).shape[0]


@torch.no_grad()
def rank_eval_speedup(model: PromptedModel, pipeline: Pipeline, sizes: Sizes) -> dict:
    """Evaluation as `predict` runs it, against the naive way and against the layout before this benchmark
    (rows in split order; for decoders every (row, candidate) pair as its own input-plus-answer sequence)."""
    loader = make_loader(pipeline, "validation", training=False)
    kind, pad = pipeline.backbone.kind, pipeline.tokenizer.pad_token_id
    rows = encode(
        pipeline.task.examples["validation"], pipeline.tokenizer, kind, pipeline.scorer, pipeline.cfg.task.max_length
    )
    size = pipeline.cfg.trainer.eval_batch_size
    groups = [rows[i : i + size] for i in range(0, len(rows), size)]
    pairs = Collator(kind, "rank", pad, all_candidates=False)
    if kind == "decoder":
        before_batches = [
            pairs([replace(row, label=c) for row in group for c in range(len(row.candidate_ids))]) for group in groups
        ]
    else:
        before_batches = [loader.collate_fn(group) for group in groups]
    model.eval()

    def ours() -> torch.Tensor:
        table = torch.empty(len(rows), max(len(row.candidate_ids) for row in rows))
        for batch in loader:
            table[batch["index"]] = model(batch).scores
        return table

    def naive():
        return torch.cat([naive_scores(model, group, kind, pad) for group in groups])

    def before():
        return [model(batch) for batch in before_batches]

    medians = interleaved({"ours": ours, "before": before, "naive": naive}, sizes.repeats)
    return {
        "rows": len(rows),
        "ours_rows_per_s": len(rows) / medians["ours"],
        "before_rows_per_s": len(rows) / medians["before"],
        "naive_rows_per_s": len(rows) / medians["naive"],
        "ratio": medians["naive"] / medians["ours"],
        "ratio_before": medians["naive"] / medians["before"],
        "max_score_difference": (ours() - naive()).abs().max().item(),
    }


# ---- report ----------------------------------------------------------------------------------------


def machine() -> str:
    load = os.getloadavg()
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, "
        f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min)"
    )


def versions() -> str:
    import accelerate
    import peft
    import transformers

    return f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, accelerate {accelerate.__version__}"


def joined(values, spec: str = ".2f") -> str:
    return " / ".join(format(value, spec) for value in values)


def table(results: dict) -> str:
    """The goals' ratios per model and training mode, then the seconds and MiB behind them."""
    lines = [
        "| model (task) | step / forward: plain / checkpointed / accumulated | train / inference memory: plain / checkpointed / accumulated "
        "| samples/s ours / reference | vs reference | rank eval rows/s ours / naive | rank eval speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    details = [
        "| model (task) | tokens per batch | seconds: step plain / checkpointed / accumulated / forward "
        "| peak MiB: train plain / checkpointed / accumulated / inference | activations only: plain / checkpointed / accumulated |",
        "|---|---|---|---|---|",
    ]
    keys = [suffix(mode) for mode in MODES]
    for name, r in results.items():
        s, t, m, e = r["step"], r["throughput"], r["memory"], r.get("rank_eval")
        lines.append(
            f"| {name} ({MODELS[name][1]}) | {joined(s['ratio' + key] for key in keys)} | {joined(m['ratio' + key] for key in keys)} "
            f"| {t['ours_samples_per_s']:.1f} / {t['reference_samples_per_s']:.1f} | {t['ratio']:.2f}x "
            + (
                f"| {e['ours_rows_per_s']:.1f} / {e['naive_rows_per_s']:.1f} | {e['ratio']:.2f}x (before: {e['ratio_before']:.2f}x) |"
                if e
                else "| n/a | n/a |"
            )
        )
        details.append(
            f"| {name} ({MODELS[name][1]}) | {s['tokens_per_batch']:.0f} | {joined((s[kind + '_s'] for kind in MODES + ('forward',)), '.3f')} "
            f"| {joined((m[f'train{key}_peak_mib'] for key in keys), '.0f')} / {m['inference_peak_mib']:.0f} "
            f"| {joined(m['activation_ratio' + key] for key in keys)} |"
        )
    lines += [""] + details
    metric_lines = [
        f"- {name}: {t['metric']} on {t['dev_rows']} dev rows after {t['steps']} steps: ours {t['ours_metric']:.4f} "
        f"(best step {t['ours_best_step']}), reference {t['reference_metric']:.4f}, both from {t['initial_metric']:.4f}"
        for name, r in results.items()
        if "metric" in (t := r["throughput"])
    ]
    return "\n".join(lines + ([""] + metric_lines if metric_lines else []))


def command_line(script: str, dtype: str, models: list[str], quick: bool = False) -> str:
    """The command that reproduces a run of one of the benchmark scripts."""
    return (
        f"python scripts/{script}"
        + (" --quick" if quick else "")
        + ("" if dtype == "float32" else f" --dtype {dtype}")
        + ("" if models == list(MODELS) else " --models " + " ".join(models))
    )


def write_markdown(path: Path, body: str, script: str, dtype: str) -> None:
    """Replace the script's section for this dtype (between its markers), leaving other sections alone."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    tag = script if dtype == "float32" else f"{script} {dtype}"
    begin, end = f"<!-- {tag} -->", f"<!-- /{tag} -->"
    section = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a reduced run, under two minutes on 2 CPU cores")
    parser.add_argument("--json", type=Path, help="write the per-model ratios to this file")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="the backbone's dtype (the prompt and head stay fp32)",
    )
    parser.add_argument("--models", nargs="+", choices=[*MODELS, *SHARDED_MODELS], default=list(MODELS))
    parser.add_argument("--markdown", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument(
        "--sharding", action="store_true", help="data parallel against FSDP: memory per process (its own section)"
    )
    parser.add_argument("--sharding-probe", nargs=3, metavar=("MODEL", "MODE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.sharding_probe:
        name, mode, out = args.sharding_probe
        sharding_probe(name, mode, Path(out))
        return
    if args.sharding:
        models = list(SHARDED_MODELS) if args.models == list(MODELS) else args.models
        sharding_section(models, args.markdown)
        return
    register_configs()
    sizes = Sizes(args.quick, args.dtype)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    results = {}
    with tempfile.TemporaryDirectory() as work:
        for name in args.models:
            cfg = config(name, sizes)
            pipeline = build_pipeline(cfg)
            model = prompted(pipeline, cfg)
            twin = checkpointed_twin(pipeline, cfg)
            batches, halves = training_batches(pipeline, sizes), training_batches(pipeline, sizes, parts=2)
            result = {"step": step_over_forward(model, twin, cfg, batches, halves, sizes.repeats)}
            del twin
            if pipeline.scorer == "rank":
                result["rank_eval"] = rank_eval_speedup(model, pipeline, sizes)
            del model, pipeline
            result["memory"] = peak_memory(name, sizes)
            result["throughput"] = throughput(name, sizes, Path(work) / name)
            results[name] = result
            print(f"{name}: {json.dumps(result)}", flush=True)
    seconds = time.perf_counter() - started
    command = command_line("bench.py", args.dtype, args.models, args.quick)
    body = "\n".join(
        [
            "## Training loop" + ("" if args.dtype == "float32" else f", {args.dtype} backbone"),
            "",
            f"`{command}` ({seconds:.0f} s; load average {load_before:.2f} at the start). Machine: {machine()}. {versions()}.",
            (
                f"Batches of {sizes.batch} random training rows (prompt length 20); step = forward + backward + clip + AdamW step in"
                " train mode; forward = eval mode, no grad, same batches; medians of interleaved repeats; checkpointed ="
                " the same with `trainer.gradient_checkpointing=true`; accumulated = the batch's rows as two micro-batches of half"
                " the rows, gradients accumulated (`trainer.batch_size` halved, `trainer.grad_accum=2`). Memory: peak RSS (VmHWM,"
                " reset before the measured call) in a fresh process per mode, glibc's mmap threshold pinned at 128 KiB so that"
                " freed tensors leave the resident set; activations only = a step's growth over the memory held before it, over"
                " the forward's. Rank eval: `before` is the layout before this benchmark (split order, one sequence per"
                " (row, candidate) pair)."
            ),
            "",
            table(results),
        ]
    )
    print(body)
    write_markdown(args.markdown, body, "bench.py", args.dtype)
    if args.json:
        ratios = {
            name: {
                "step_over_forward": round(r["step"]["ratio"], 3),
                "throughput_vs_reference": round(r["throughput"]["ratio"], 3),
                "train_memory_over_inference": round(r["memory"]["ratio"], 3),
                **{
                    f"{measure}_{mode}": round(r[part][f"ratio_{mode}"], 3)
                    for mode in MODES[1:]
                    for measure, part in (("step_over_forward", "step"), ("train_memory_over_inference", "memory"))
                },
                **({"rank_eval_speedup": round(r["rank_eval"]["ratio"], 3)} if "rank_eval" in r else {}),
            }
            for name, r in results.items()
        }
        records.write_json(args.json, ratios)


if __name__ == "__main__":
    main()
