#!/usr/bin/env bash
# The GPU run protocol: one call of at most ~8 minutes (the step limits add up to 460 s, plus
# install) on a machine with a CUDA GPU.
#
#   bash benchmarks/gpu_run.sh [OUT_DIR]        (default: $OUT, else benchmarks/results/gpu)
#
# Works on the GPU machine's own torch / Triton (recurkit is installed without dependencies
# so they are kept): 1. environment report, 2. tests/test_gpu.py (correctness on the GPU),
# 3. benchmarks/gpu_chunk.py --protocol (GDN, GLA, KDA forward against FLA's Triton path,
# B1 T8192 H16 / H32 and B8 T2048 H16, K = V = 128, bf16; then forward + backward at the B1
# shapes with each side's peak memory: the generated chunk-form backward), 4. tuning of the built-ins at
# those shapes (benchmarks/gpu_tune.py --package: the autotuner within the Triton backend
# on CUDA tensors, winners written as this GPU's shipped configs), 5. the forward again at
# the default config, which now reads those configs. Each step has its own time limit; raw
# output and the configs file (to commit into recurkit/backends/triton/configs/) land in
# OUT_DIR.
set -u
OUT_DIR="${1:-${OUT:-benchmarks/results/gpu}}"
export FLA_FLASH_QLA=0
source "$(dirname "$0")/gpu_lib.sh"
python -c "import fla" 2>/dev/null || pip install -q --no-deps fla-core einops >> "$OUT_DIR/install.txt" 2>&1
step 120 test_gpu python -m pytest -q -x tests/test_gpu.py -p no:cacheprovider
step 210 gpu_chunk python benchmarks/gpu_chunk.py --protocol --json "$OUT_DIR/gpu_chunk.json"
step 70 tune python benchmarks/gpu_tune.py --package --out "$OUT_DIR/tuned.json"
cp recurkit/backends/triton/configs/*.json "$OUT_DIR/" 2>/dev/null   # to commit: the shipped configs
step 60 gpu_chunk_tuned python benchmarks/gpu_chunk.py --protocol --no-backward --json "$OUT_DIR/gpu_chunk_tuned.json"
