#!/usr/bin/env bash
# The GPU check: the real trainer on one GPU, for the 125m and 350m presets in bf16 with compile,
# each with DDP and FSDP2, a few hundred steps on the demo shards (data/tokens, made by `make run`
# or `dvc repro tokenize`). Prints tokens/s, MFU against the GPU's bf16 datasheet peak, peak
# memory, and whether DDP and FSDP2 give the same losses. Under 8 minutes on an H100/H200.
#
#   bash bench/gpu_check.sh                      # defaults below
#   PRESETS="125m" STEPS=300 bash bench/gpu_check.sh
#
# Needs python3 with torch (CUDA), numpy, pyyaml and pydantic; wheels in .whl/ (for a machine
# that cannot reach a package index) are installed to /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PRESETS=${PRESETS:-"125m 350m"}
STEPS=${STEPS:-200}
DEVICE=${DEVICE:-cuda}
TOKENS=${TOKENS:-data/tokens}
SEQ=${SEQ:-2048}
MICRO=${MICRO:-8}
COMPILE=${COMPILE:-true}
RESULTS=${RESULTS:-$(mktemp -t gpu_check.XXXXXX.jsonl)}

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ ! -f "$TOKENS/index.json" ]; then
  echo "error: $TOKENS/index.json not found: run 'make run' or 'dvc repro tokenize' first (or set TOKENS=)" >&2
  exit 2
fi
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

: >"$RESULTS"
for preset in $PRESETS; do
  for parallel in ddp fsdp; do
    echo "== $preset $parallel ($STEPS steps, seq $SEQ, micro-batch $MICRO, compile $COMPILE)" >&2
    $PY -m torch.distributed.run --standalone --nproc_per_node=1 -m bench.gpu_check \
      --preset "$preset" --parallel "$parallel" --steps "$STEPS" --seq "$SEQ" \
      --micro-batch "$MICRO" --device "$DEVICE" --tokens "$TOKENS" --compile "$COMPILE" \
      | grep '^{' >>"$RESULTS"
  done
done
$PY -m bench.gpu_check --report "$RESULTS"
