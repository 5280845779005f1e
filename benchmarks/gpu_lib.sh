# Sourced by the GPU run scripts (gpu_run.sh, gpu_tiled.sh) with OUT_DIR set: the environment
# report, recurkit importable from this checkout, and `step LIMIT NAME CMD...` (CMD's output
# to OUT_DIR/NAME.txt with its exit status, the last 45 lines echoed).
mkdir -p "$OUT_DIR"
# the GPU machine has no package index to build an editable install with: PYTHONPATH serves
export RECURKIT_CACHE_DIR="$OUT_DIR/cache" PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
step() { local limit=$1 name=$2; shift 2; echo "== $name (limit ${limit}s)";
         timeout "$limit" "$@" > "$OUT_DIR/$name.txt" 2>&1; echo "rc=$?" >> "$OUT_DIR/$name.txt";
         tail -n 45 "$OUT_DIR/$name.txt"; }
{
  date -u; nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  lscpu | grep -E 'Model name|^CPU\(s\)'
} > "$OUT_DIR/env.txt" 2>&1; cat "$OUT_DIR/env.txt"
pip install -q --no-deps --no-build-isolation -e . > "$OUT_DIR/install.txt" 2>&1 \
  || echo "(no editable install, see install.txt: recurkit runs from PYTHONPATH)"
