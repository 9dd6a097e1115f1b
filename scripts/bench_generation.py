"""Benchmark generation: softprompt's batched, KV-cached decoder against PEFT's own `generate`, one row at a time.

    python scripts/bench_generation.py                        # smollm2-135m on E2E: 64 dev inputs, 32 new tokens
    python scripts/bench_generation.py --quick --json g.json  # tiny-llama (random): 16 inputs, 8 new tokens, seconds
    python scripts/bench_generation.py --write-docs           # also replace the section in docs/benchmarks.md

Same model, rows, soft prompt (prompt.length=20, init from text, untrained), max_new_tokens and
eos_token_id, greedy, under torch.inference_mode:

- ours: what `write_answers` does: the validation loader (rows sorted by length, batches of
  trainer.eval_batch_size, left-padded) through `Decoding.of(pipeline).write`, that is
  `PromptedModel.generate`, KV-cached;
- reference: the `PeftModel` that `attach_prompt` returns, `peft_model.generate(input_ids=...,
  attention_mask=..., max_new_tokens=..., do_sample=False)`, one unpadded row at a time.

Each side counts the new tokens it wrote before its first EOS (an untrained prompt may never write one),
over its median seconds of interleaved repeats, after one warm-up batch (ours) and row (reference).
The rows whose tokens before EOS are identical on both sides are counted, not asserted: PEFT drops
position ids, which matters in left-padded batches only, so one unpadded row at a time should match.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

import bench
from softprompt import run_dir as records
from softprompt.cli import compose_config
from softprompt.config import TrainConfig, register_configs, validate
from softprompt.pipeline import Decoding, Pipeline, build_pipeline, make_loader

PROMPT_TEXT = "Write one sentence that describes the restaurant from its table of attributes."


class Sizes:
    """What a run generates: the model, dev inputs, batch and token budget (--quick: a random tiny model)."""

    def __init__(self, quick: bool, repeats: int | None = None):
        self.model = "tiny-llama" if quick else "smollm2-135m"
        self.rows = 16 if quick else 64
        self.max_new_tokens = 8 if quick else 32
        self.batch = 8 if quick else 32
        self.repeats = repeats or (1 if quick else 3)


def config(sizes: Sizes) -> TrainConfig:
    overrides = [
        f"model={sizes.model}",
        "task=e2e",
        "prompt.length=20",
        "prompt.init=text",
        f"prompt.text='{PROMPT_TEXT}'",
        f"generation.max_new_tokens={sizes.max_new_tokens}",
        f"trainer.eval_batch_size={sizes.batch}",
        "trainer.progress_bar=false",
    ]
    return validate(compose_config(overrides))


class Recorder:
    """Stands in for the model in `Decoding.write`, keeping the tokens and options each `generate` call got."""

    def __init__(self, model):
        self.model = model
        self.tokens: list[torch.Tensor] = []
        self.options: dict = {}

    def generate(self, batch, prompts=None, max_new_tokens=8, num_beams=1, **options):
        self.options = options
        tokens = self.model.generate(batch, prompts, max_new_tokens, num_beams, **options)
        self.tokens.append(tokens)
        return tokens


def before_eos(tokens: torch.Tensor, eos: int | None) -> list[int]:
    """A row's new tokens up to (not including) its first EOS."""
    tokens = tokens.tolist()
    return tokens[: tokens.index(eos)] if eos is not None and eos in tokens else tokens


def measure(pipeline: Pipeline, cfg: TrainConfig, sizes: Sizes) -> dict:
    model = bench.prompted(pipeline, cfg).eval()
    peft_model = model.peft_model
    loader = make_loader(pipeline, "validation", training=False, indices=list(range(sizes.rows)))
    batches = list(loader)
    rows = list(loader.dataset)  # the same rows, sorted by length as the batches hold them
    decoding = Decoding.of(pipeline)
    eos = pipeline.tokenizer.eos_token_id
    pad = model.backbone.generation_config.pad_token_id or 0
    written: dict[str, dict[int, list[int]]] = {"ours": {}, "reference": {}}

    def ours() -> None:
        recorder = Recorder(model)
        for batch in batches:
            decoding.write(recorder, batch)
        for batch, tokens in zip(batches, recorder.tokens):
            for index, row in zip(batch["index"].tolist(), tokens):
                written["ours"][index] = before_eos(row, eos)

    def reference(some: list | None = None) -> None:
        for row in some or rows:
            ids = torch.tensor([row.input_ids])
            output = peft_model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=decoding.max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                **options,
            )
            written["reference"][row.index] = before_eos(output[0, ids.shape[1] :], eos)

    times: dict[str, list[float]] = {"ours": [], "reference": []}
    options: dict = {}
    with torch.inference_mode():
        # warm-up: one batch, one row; the reference gets the options Decoding.write gives generate (eos_token_id, ...)
        recorder = Recorder(model)
        decoding.write(recorder, batches[0])
        options.update(recorder.options)
        reference(rows[:1])
        for _ in range(sizes.repeats):
            for name, run in (("ours", ours), ("reference", reference)):
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    seconds = {name: statistics.median(values) for name, values in times.items()}
    tokens = {name: sum(map(len, answers.values())) for name, answers in written.items()}
    speed = {name: tokens[name] / seconds[name] for name in seconds}
    identical = sum(written["ours"][index] == written["reference"][index] for index in written["ours"])
    return {
        "model": sizes.model,
        "task": cfg.task.name,
        "rows": len(rows),
        "batch_size": cfg.trainer.eval_batch_size,
        "batches": len(batches),
        "max_new_tokens": decoding.max_new_tokens,
        "eos_token_id": eos,
        "repeats": sizes.repeats,
        "ours_new_tokens": tokens["ours"],
        "reference_new_tokens": tokens["reference"],
        "ours_s": seconds["ours"],
        "reference_s": seconds["reference"],
        "ours_tokens_per_s": speed["ours"],
        "reference_tokens_per_s": speed["reference"],
        "ratio": speed["ours"] / speed["reference"],
        "rows_ended_ours": sum(len(answer) < decoding.max_new_tokens for answer in written["ours"].values()),
        "identical_rows": identical,
        "agreement": identical / len(rows),
    }


def table(r: dict) -> str:
    return "\n".join(
        [
            "| model (task) | rows / batch | max new tokens | new tokens ours / reference | seconds ours / reference "
            "| new tokens/s ours / reference | ours / reference | identical rows |",
            "|---|---|---|---|---|---|---|---|",
            f"| {r['model']} ({r['task']}) | {r['rows']} / {r['batch_size']} | {r['max_new_tokens']} "
            f"| {r['ours_new_tokens']} / {r['reference_new_tokens']} | {r['ours_s']:.2f} / {r['reference_s']:.2f} "
            f"| {r['ours_tokens_per_s']:.1f} / {r['reference_tokens_per_s']:.1f} | {r['ratio']:.2f}x "
            f"| {r['identical_rows']} / {r['rows']} ({r['agreement']:.0%}) |",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny-llama (random weights), 16 rows, 8 new tokens")
    parser.add_argument("--repeats", type=int, help="timed passes of each side, median kept (default 3, --quick 1)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--write-docs", action="store_true", help="replace this script's section of --markdown")
    parser.add_argument("--markdown", type=Path, default=bench.ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    register_configs()
    sizes = Sizes(args.quick, args.repeats)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    cfg = config(sizes)
    result = measure(build_pipeline(cfg, splits=("validation",)), cfg, sizes)
    print(f"{sizes.model}: {result}", flush=True)
    command = (
        "python scripts/bench_generation.py"
        + (" --quick" if args.quick else "")
        + (f" --repeats {args.repeats}" if args.repeats else "")
    )
    body = "\n".join(
        [
            "## Generation throughput",
            "",
            f"`{command}` ({time.perf_counter() - started:.0f} s; load average {load_before:.2f} at the start). "
            f"Machine: {bench.machine()}. {bench.versions()}.",
            (
                f"The first {result['rows']} E2E dev inputs, prompt.length=20 (init from text, untrained), greedy, at most"
                f" {result['max_new_tokens']} new tokens, eos_token_id {result['eos_token_id']} on both sides. Ours:"
                " `Decoding.write` (`PromptedModel.generate`, KV-cached) over the validation loader, rows sorted by length,"
                f" batches of {result['batch_size']}. Reference: PEFT's `peft_model.generate(input_ids, attention_mask,"
                " max_new_tokens, do_sample=False)`, one unpadded row at a time. New tokens: those written before the first"
                f" EOS ({result['rows_ended_ours']} of our rows wrote one). Seconds: median of {result['repeats']}"
                f" interleaved pass{'es' if result['repeats'] > 1 else ''} after one warm-up batch / row. Identical rows:"
                " the same tokens before EOS on both sides."
            ),
            "",
            table(result),
        ]
    )
    print(body)
    if args.write_docs:
        bench.write_markdown(args.markdown, body, "bench_generation.py", "float32")
    if args.json:
        records.write_json(args.json, result)


if __name__ == "__main__":
    main()
