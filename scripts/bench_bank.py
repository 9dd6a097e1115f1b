"""Benchmark the prompt bank: mixed-prompt batches and one-batch ensembles against prompt-by-prompt passes.

    python scripts/bench_bank.py --model minilm-l6 --rows 256 --repeats 3 --markdown docs/benchmarks.md

Throughput is rows per second of scoring (inference), each configuration timed `--repeats` times
with the median kept, all interleaved in one process so machine load affects each alike.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from softprompt.cli import compose_config
from softprompt.config import validate
from softprompt.predict import score_rows
from softprompt.prompt_bank import BankEntry, PromptBank, load_entry
from softprompt.task import load_task
from softprompt.train import train


def make_bank(model: str, prompts: int, work: Path) -> tuple[PromptBank, list]:
    """One real run (0 steps) supplies backbone, task and head; the bank holds `prompts` random prompts."""
    overrides = [f"model={model}", "trainer.max_steps=0", "trainer.progress_bar=false", "prompt.length=20"]
    cfg = validate(compose_config(overrides))
    run_dir = work / "run"
    run_dir.mkdir(parents=True)
    train(cfg, run_dir)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(compose_config(overrides), run_dir / ".hydra" / "config.yaml")
    base = load_entry("base", run_dir)
    generator = torch.Generator().manual_seed(0)
    entries = [
        BankEntry(
            f"p{i}",
            run_dir,
            base.cfg,
            base.task,
            torch.rand(base.prompt.shape, generator=generator) - 0.5,
            {
                key: value + 0.01 * torch.randn(value.shape, generator=generator)
                for key, value in base.head_state.items()
            },
        )
        for i in range(prompts)
    ]
    return PromptBank(entries), load_task(base.cfg.task).examples["validation"]


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ensemble", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown", type=Path, help="append the table to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as work:
        bank, examples = make_bank(args.model, 16, Path(work))
        examples = (examples * (args.rows // len(examples) + 1))[: args.rows]

        def run(indices, rows=examples, batch=args.batch_size):
            return score_rows(bank, rows, indices, batch, progress=False)

        run([0] * len(examples))  # warm-up
        results = []
        single = timed(lambda: run([0] * len(examples)), args.repeats)
        results.append(("1 prompt, batches of one prompt", single, 1.0))
        for count in (4, 16):
            mixed = timed(lambda count=count: run([i % count for i in range(len(examples))]), args.repeats)
            results.append((f"{count} prompts mixed in every batch", mixed, single / mixed))

            def one_by_one(count=count):
                for prompt in range(count):
                    rows = examples[prompt::count]
                    run([prompt] * len(rows), rows)

            separate = timed(one_by_one, args.repeats)
            results.append((f"{count} prompts, each prompt's rows in its own batches", separate, single / separate))
        k = args.ensemble
        subset = examples[: len(examples) // k]
        together = timed(
            lambda: run(
                [i for _ in subset for i in range(k)], [e for e in subset for _ in range(k)], args.batch_size * k
            ),
            args.repeats,
        )
        apart = timed(lambda: [run([i] * len(subset), subset) for i in range(k)], args.repeats)
        lines = [
            f"### Prompt bank throughput ({args.model}, {bank.scorer} scorer)",
            "",
            f"Command: `python scripts/bench_bank.py --model {args.model} --rows {args.rows} --batch-size {args.batch_size} "
            f"--ensemble {k} --repeats {args.repeats}`; {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}; median of {args.repeats}.",
            "",
            "| configuration | seconds for the rows | rows/s | speed vs 1 prompt |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {name} | {seconds:.2f} | {len(examples) / seconds:.1f} | {ratio:.2f}x |"
            for name, seconds, ratio in results
        ]
        lines += [
            "",
            f"Ensemble of {k} prompts over {len(subset)} rows: one batch of all {k} prompts {together:.2f} s, "
            f"{k} separate passes {apart:.2f} s ({apart / together:.2f}x faster in one batch).",
            "",
        ]
        text = "\n".join(lines)
        print(text)
        if args.markdown:
            with open(args.markdown, "a", encoding="utf-8") as handle:
                handle.write("\n" + text)


if __name__ == "__main__":
    main()
