#!/usr/bin/env bash
# The tiled families on a CUDA GPU, in one call of at most ~8 minutes (the step limits add up
# to 450 s, plus install):
#
#   bash benchmarks/gpu_tiled.sh [OUT_DIR]        (default: $OUT, else benchmarks/results/gpu)
#
# On the GPU machine's own torch / Triton (recurkit installed without dependencies, and on
# PYTHONPATH where that install fails: the machine has no package index for its build):
# 1. environment report, 2. the tiled ops' GPU tests (tests/test_gpu.py -k "shift_add or
# logic"), 3. benchmarks/shift_add_gpu.py (the look-up and decode + dot kernels against torch
# F.linear in fp32 / fp16 / bf16), 4. benchmarks/logic_gpu.py (the hard Triton kernel with
# a sweep of its blocks, the soft forward and train step against plain torch). Raw output
# lands in OUT_DIR.
set -u
OUT_DIR="${1:-${OUT:-benchmarks/results/gpu}}"
source "$(dirname "$0")/gpu_lib.sh"
step 100 test_gpu_tiled python -m pytest -q -x tests/test_gpu.py -k "shift_add or logic" -p no:cacheprovider
step 140 shift_add_gpu python benchmarks/shift_add_gpu.py
step 210 logic_gpu python benchmarks/logic_gpu.py --json "$OUT_DIR/logic_gpu.json"
rm -rf "$OUT_DIR/cache"
