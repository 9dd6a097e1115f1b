#!/usr/bin/env bash
# The checks that need a GPU, in one table: a bf16 training run of a zoo decoder with data parallelism and with
# trainer.sharding=fsdp (all GPUs of the machine; FSDP needs two), then the training step in bf16 with its
# achieved TFLOP/s against the card's dense bf16 peak.
#   bash scripts/gpu_check.sh                 # smollm2-135m on SST-2, 300 steps each
#   MODEL=gemma3-270m STEPS=100 bash scripts/gpu_check.sh
# GPU_CHECK_DEVICE=cpu runs the same steps on CPU (a rehearsal of the script itself, nothing measured).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-smollm2-135m}
STEPS=${STEPS:-300}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
if [ "$DEVICE" = cuda ] && ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "error: no CUDA device here: this check needs a GPU (GPU_CHECK_DEVICE=cpu rehearses it on CPU)" >&2
    exit 2
fi
GPUS=$(python -c "import torch; print(max(torch.cuda.device_count(), 1) if '$DEVICE' == 'cuda' else 2)")
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
COMMON=(model="$MODEL" task=sst2 model.dtype=bfloat16 trainer=standard trainer.max_steps="$STEPS"
        trainer.eval_every="$STEPS" task.eval_rows=256 trainer.progress_bar=false)

for sharding in none fsdp; do
    if [ "$sharding" = fsdp ] && [ "$GPUS" -lt 2 ]; then
        continue
    fi
    start=$(date +%s)
    torchrun --standalone --nproc_per_node "$GPUS" -m softprompt.train "${COMMON[@]}" \
        trainer.sharding="$sharding" hydra.run.dir="$OUT/$sharding" > "$OUT/$sharding.log" 2>&1 \
        || { tail -20 "$OUT/$sharding.log" >&2; exit 1; }
    echo $(( $(date +%s) - start )) > "$OUT/$sharding.seconds"
done

python - "$OUT" "$MODEL" "$DEVICE" "$GPUS" <<'EOF'
import json, sys, time
from pathlib import Path

import torch

sys.path.insert(0, "scripts")
from bench import TASKS, training_batches, Sizes, prompted
from softprompt.cli import compose_config
from softprompt.config import register_configs, validate
from softprompt.pipeline import build_pipeline
from softprompt.train import make_optimizer

# dense bf16 peak TFLOP/s by card (vendor datasheets, without sparsity)
PEAKS = {"H200": 989.0, "H100 80GB HBM3": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "A100": 312.0, "L40S": 362.0}
out, model_name, device, gpus = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
rows = []
for sharding in ("none", "fsdp"):
    run = out / sharding
    if not (run / "metrics.json").is_file():
        rows.append(f"| training run, sharding={sharding} | needs 2 GPUs, {gpus} here | | |")
        continue
    metrics = json.loads((run / "metrics.json").read_text())
    env = json.loads((run / "env.json").read_text())
    seconds = (out / f"{sharding}.seconds").read_text().strip()
    rows.append(
        f"| training run, sharding={env['sharding']}, {env['num_processes']} processes | "
        f"{metrics['initial_eval']['accuracy']:.4f} -> {metrics['eval']['accuracy']:.4f} | "
        f"{metrics['train_samples_per_second']:.1f} rows/s | {seconds} s wall |"
    )

# the training step alone, bf16 backbone: forward and the input gradients of backward, 4 x parameters x tokens
register_configs()
sizes = Sizes(quick=False, dtype="bfloat16")
sizes.batch = 32
cfg = validate(compose_config([f"model={model_name}", *TASKS["sst2"], "prompt.length=20", "model.dtype=bfloat16",
                               "task.max_train_rows=2000", "task.max_eval_rows=8", f"trainer.batch_size={sizes.batch}"]))
pipeline = build_pipeline(cfg)
model = prompted(pipeline, cfg).to(device)
optimizer = make_optimizer(cfg.trainer, [p for p in model.parameters() if p.requires_grad])
batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in training_batches(pipeline, sizes)]
tokens = sum(int(b["attention_mask"].sum()) + cfg.prompt.length * b["attention_mask"].shape[0] for b in batches)

def step(batch):
    model.train()
    model(batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()

for batch in batches:  # warm-up
    step(batch)
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
repeats = 10
sync()
started = time.perf_counter()
for _ in range(repeats):
    for batch in batches:
        step(batch)
sync()
seconds = time.perf_counter() - started
flops = 4 * pipeline.backbone.num_params * tokens * repeats
achieved = flops / seconds / 1e12
name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
peak = next((value for key, value in PEAKS.items() if key in name), None)
fraction = f"{achieved / peak:.1%} of {peak:.0f}" if peak else "peak unknown for this card"
rows.append(f"| training step, bf16, batch {sizes.batch} | {achieved:.1f} TFLOP/s | {fraction} | {name} |")
print(f"## GPU check: {model_name}, {gpus} processes, {name}\n")
print("| what | result | rate | notes |\n|---|---|---|---|")
print("\n".join(rows))
EOF
