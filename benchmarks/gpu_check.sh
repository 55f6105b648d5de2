#!/bin/bash
# The GPU check (benchmarks/gpu_check.py): bf16 training of shrunk OLMo2 and OLMoE models with MFU against the
# measured bf16 matmul peak and peak memory, grouped-matmul MoE parity with the loop, sparse and sharded OE at world
# size 1. Under 10 minutes on one CUDA GPU; writes a JSON summary to --output, default $OUT/gpu_check.json when $OUT
# is set, else ./gpu_check.json. Copy its figures into BENCHMARKS.md.
#
#   bash benchmarks/gpu_check.sh [--output PATH]
#   python benchmarks/gpu_check.py --cpu-smoke --output /tmp/gpu_check.json   # check the script on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
DEFAULT_OUTPUT=gpu_check.json
if [ -n "${OUT:-}" ]; then DEFAULT_OUTPUT="$OUT/gpu_check.json"; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
timeout 570 python benchmarks/gpu_check.py --output "$DEFAULT_OUTPUT" "$@"
