"""Generated Triton kernels vs flash-linear-attention's hand-written ones, on one GPU.

    python benchmarks/gpu_chunk.py [--quick | --protocol] [--no-backward] [--json PATH]

For Gated DeltaNet, GLA and KDA (bf16, D = 128, B in {1, 8}, T in {2048, 8192, 16384},
H in {16, 32}; ``--protocol``: the GPU run protocol's B1 T8192 H16 and H32, B8 T2048 H16)
prints milliseconds per forward call (``triton.testing.do_bench`` medians) of FLA's chunk_*
function (its Triton path: FLA_FLASH_QLA=0) and of rk.compile(..., backend="triton") at its
default config, with the ratio FLA / recurkit (> 1: recurkit is faster), plus the max
relative difference of the outputs; then forward +
backward (a loss through the output, gradients of every input) at B = 1 for both (recurkit's
backward on a GPU is the chunk-form backward, Triton kernels generated from the declaration),
with each side's peak memory (torch.cuda.max_memory_allocated over one step, inputs
excluded) and the max relative difference of the gradients. Needs a CUDA GPU and fla-core
(pip install fla-core); on a machine without one it says so and exits. Results of one H100
run: benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("FLA_FLASH_QLA", "0")   # FLA's own Triton kernels, not FlashQLA's

import torch
import torch.nn.functional as F

import recurkit as rk


def inputs(op: str, B: int, T: int, H: int, D: int, dev: str):
    g = torch.Generator(device=dev).manual_seed(0)

    def r(*s):
        return torch.randn(*s, device=dev, generator=g)
    q, k, v = r(B, T, H, D), F.normalize(r(B, T, H, D), dim=-1), r(B, T, H, D)
    if op == "gla":
        gate = F.logsigmoid(r(B, T, H, D)) / 16
        return [x.bfloat16() for x in (q, k, v, gate)]
    beta = torch.sigmoid(r(B, T, H))
    gate = F.logsigmoid(r(B, T, H)) if op == "gated_delta_rule" else \
        F.logsigmoid(r(B, T, H, D)) / 16
    return [x.bfloat16() for x in (q, k, v, gate, beta)]


def fla_fn(op: str):
    if op == "gated_delta_rule":
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        return chunk_gated_delta_rule
    if op == "gla":
        from fla.ops.gla import chunk_gla
        return chunk_gla
    from fla.ops.kda import chunk_kda
    return chunk_kda


def pairs(quiet: bool = False, autotune: bool = False):
    """(op, recurkit's compiled op, FLA's function or None) for each op compared."""
    for op in ("gated_delta_rule", "gla", "kda"):
        ours = rk.compile(getattr(rk.ops, op).decl, backend="triton",
                          autotune="quick" if autotune else False)
        try:
            theirs = fla_fn(op)
        except ImportError as e:
            if not quiet:
                print(f"{op}: flash-linear-attention not importable ({e}); pip install fla-core")
            theirs = None
        yield op, ours, theirs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="B=1, T=2048, H=16 only")
    ap.add_argument("--no-backward", action="store_true", help="forward only")
    ap.add_argument("--protocol", action="store_true",
                    help="B1 T8192 H16, B1 T8192 H32, B8 T2048 H16 (the GPU run protocol)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--autotune", action="store_true",
                    help="recurkit with autotune='quick' (tuned winners from the cache)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_chunk.py: no CUDA device here; run it on a machine with a GPU "
              "(the kernels' GPU-readiness is checked without one by tests/test_triton_backend.py)")
        return 0
    import triton
    from triton.testing import do_bench
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | "
          f"triton {triton.__version__} | recurkit {rk.__version__}")
    shapes = [(1, 2048, 16)] if args.quick else \
        [(1, 8192, 16), (1, 8192, 32), (8, 2048, 16)] if args.protocol else [
        (B, T, H) for B in (1, 8) for T in (2048, 8192, 16384) for H in (16, 32)]
    rows = []
    D = 128
    print(f"{'op':18} {'B':>2} {'T':>6} {'H':>3}  {'FLA ms':>8} {'rk ms':>8} {'FLA/rk':>7} "
          f"{'max rel diff':>12}")
    for op, ours, theirs in pairs(autotune=args.autotune):
        for B, T, H in shapes:
            x = inputs(op, B, T, H, D, "cuda")
            t_rk = do_bench(lambda: ours(*x))
            o_rk = ours(*x)[0].float()
            t_fla = diff = float("nan")
            if theirs is not None:
                t_fla = do_bench(lambda: theirs(*x))
                o_fla = theirs(*x)[0].float()
                diff = ((o_rk - o_fla).abs().max() / o_fla.abs().max()).item()
            print(f"{op:18} {B:>2} {T:>6} {H:>3}  {t_fla:8.3f} {t_rk:8.3f} "
                  f"{t_fla / t_rk:7.2f} {diff:12.2e}", flush=True)
            rows.append({"op": op, "pass": "forward", "B": B, "T": T, "H": H, "D": D,
                         "fla_ms": t_fla, "recurkit_ms": t_rk, "max_rel_diff": diff})
    def dump():
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "triton": triton.__version__, "rows": rows}, f, indent=1)
    dump()
    if args.no_backward:
        return 0
    print(f"forward + backward, ms and peak MiB\n{'op':18} {'B':>2} {'T':>6} {'H':>3}  "
          f"{'FLA ms':>8} {'rk ms':>8} {'FLA/rk':>7} {'FLA MiB':>8} {'rk MiB':>8} "
          f"{'grad diff':>10}")
    for op, ours, theirs in pairs(quiet=True):
        for B, T, H in [s for s in shapes if s[0] == 1 and s[1] <= 8192]:
            x = [t.requires_grad_() for t in inputs(op, B, T, H, D, "cuda")]

            def step(fn):
                o = fn(*x)[0]
                return torch.autograd.grad(o.float().square().sum(), x)

            def peak(fn):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                g = step(fn)
                torch.cuda.synchronize()
                return (torch.cuda.max_memory_allocated() - base) / 2 ** 20, g
            t_rk = do_bench(lambda: step(ours))
            m_rk, g_rk = peak(ours)
            t_fla, m_fla, diff = float("nan"), float("nan"), float("nan")
            if theirs is not None:
                t_fla = do_bench(lambda: step(theirs))
                m_fla, g_fla = peak(theirs)
                diff = max(((a.float() - b.float()).abs().max() /
                            b.float().abs().max().clamp_min(1e-30)).item()
                           for a, b in zip(g_rk, g_fla))
            print(f"{op:18} {B:>2} {T:>6} {H:>3}  {t_fla:8.3f} {t_rk:8.3f} {t_fla / t_rk:7.2f} "
                  f"{m_fla:8.0f} {m_rk:8.0f} {diff:10.2e}", flush=True)
            rows.append({"op": op, "pass": "forward+backward", "B": B, "T": T, "H": H, "D": D,
                         "fla_ms": t_fla, "recurkit_ms": t_rk, "fla_peak_mib": m_fla,
                         "recurkit_peak_mib": m_rk, "max_rel_grad_diff": diff})
            dump()
    return 0


if __name__ == "__main__":
    sys.exit(main())
