"""Benchmark trainer.compile: training step and inference forward with the backbone compiled, against eager.

    python scripts/bench_compile.py                        # minilm-l6, smollm2-135m, t5-small-shape
    python scripts/bench_compile.py --models smollm2-135m --dtype bfloat16

The models, batches and step of scripts/bench.py (full sizes). Compilation is timed as the first pass
over the batches (a training step and a forward each; dynamic shapes, so every length shares the
graphs); then eager and compiled variants are interleaved and medians kept.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import bench
from softprompt.config import register_configs
from softprompt.pipeline import build_pipeline
from softprompt.train import make_optimizer


def variants(name: str, sizes: bench.Sizes, compiled: bool) -> tuple[dict, float]:
    """Timed closures for each batch's step and forward, and the seconds of the first pass (compilation)."""
    cfg = bench.config(name, sizes, **{"trainer.compile": compiled})
    pipeline = build_pipeline(cfg)
    model = bench.prompted(pipeline, cfg)
    optimizer = make_optimizer(cfg.trainer, [p for p in model.parameters() if p.requires_grad])
    batches = bench.training_batches(pipeline, sizes)
    started = time.perf_counter()
    for batch in batches:
        bench.train_step(model, optimizer, batch)
        bench.inference_forward(model, batch)
    first_pass = time.perf_counter() - started
    runs = {}
    for k, batch in enumerate(batches):
        runs[f"step{k}"] = lambda batch=batch: bench.train_step(model, optimizer, batch)
        runs[f"forward{k}"] = lambda batch=batch: bench.inference_forward(model, batch)
    return runs, first_pass


def measure(name: str, sizes: bench.Sizes) -> dict:
    eager, eager_first = variants(name, sizes, compiled=False)
    compiled, compiled_first = variants(name, sizes, compiled=True)
    medians = bench.interleaved(
        {**{f"eager {k}": run for k, run in eager.items()}, **{f"compiled {k}": run for k, run in compiled.items()}},
        sizes.repeats,
    )

    def total(mode, kind):
        return sum(seconds for key, seconds in medians.items() if key.startswith(f"{mode} {kind}")) / sizes.batches

    out = {"compile_s": compiled_first - eager_first}
    for mode in ("eager", "compiled"):
        out[mode] = {"step_s": total(mode, "step"), "forward_s": total(mode, "forward")}
        out[mode]["ratio"] = out[mode]["step_s"] / out[mode]["forward_s"]
    out["step_speedup"] = out["eager"]["step_s"] / out["compiled"]["step_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(bench.MODELS), default=list(bench.MODELS))
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--markdown", type=Path, default=bench.ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    register_configs()
    sizes = bench.Sizes(False, args.dtype)
    started = time.perf_counter()
    lines = [
        "| model (task) | compilation s | step s eager / compiled | step speedup | forward s eager / compiled | step / forward eager / compiled |",
        "|---|---|---|---|---|---|",
    ]
    for name in args.models:
        r = measure(name, sizes)
        print(f"{name}: {r}", flush=True)
        e, c = r["eager"], r["compiled"]
        lines.append(
            f"| {name} ({bench.MODELS[name][1]}) | {r['compile_s']:.0f} | {e['step_s']:.3f} / {c['step_s']:.3f} | {r['step_speedup']:.2f}x "
            f"| {e['forward_s']:.3f} / {c['forward_s']:.3f} | {e['ratio']:.2f} / {c['ratio']:.2f} |"
        )
    command = bench.command_line("bench_compile.py", args.dtype, args.models)
    body = "\n".join(
        [
            "## Compiled backbone (`trainer.compile=true`)",
            "",
            f"`{command}` ({time.perf_counter() - started:.0f} s). Machine: {bench.machine()}. {bench.versions()}.",
            f"Backbone in {args.dtype}; batches of {sizes.batch} as in the training-loop table; compilation = the first pass over"
            f" {sizes.batches} batches (a step and a forward each) less the same pass in eager mode; then medians of"
            f" {sizes.repeats} interleaved repeats.",
            "",
            *lines,
        ]
    )
    print(body)
    bench.write_markdown(args.markdown, body, "bench_compile.py", args.dtype)


if __name__ == "__main__":
    main()
