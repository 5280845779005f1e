"""Gated DeltaNet forward + backward on this CPU: recurkit's exported op vs the torch backend
under autograd vs flash-linear-attention's naive chunk code under autograd, in one run.

    pip install --no-deps fla-core einops   # FLA's reference code (optional)
    python benchmarks/gdn_train_cpu.py [--T 4096] [--repeats 5] [--mcpu znver3]

``--mcpu`` compiles recurkit's TVM kernels for another CPU of the family (sets
$RECURKIT_TVM_MCPU): ``znver3`` or ``haswell`` measures the AVX2 code on an AVX-512 machine,
against FLA in the same run.

Bars: at least 3x (issue 7) and 6x (issue 23) faster than FLA's naive chunk code under
autograd. The exported op
runs the TVM forward kernel; its backward is the generated adjoint (the backward step derived
from the declaration, walked back in time by one compiled TVM kernel from the chunk
checkpoints the forward kernel saved), or,
with backward="autograd", the forward recomputed with the torch backend under autograd.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import (add_shape_args, bench, cpu_features, fla_naive_gdn, gdn_inputs,  # noqa: E402
                    machine, save_results)

import recurkit as rk  # noqa: E402


OURS = "recurkit rk.export (TVM fwd, generated adjoint bwd)"
CHUNK = "recurkit rk.export, backward='chunk' (TVM fwd, chunk-form bwd in torch)"


def main() -> int:
    ap = argparse.ArgumentParser()
    add_shape_args(ap, repeats=5)
    ap.add_argument("--mcpu", default=None, help="LLVM CPU to compile recurkit's kernels for")
    args = ap.parse_args()
    if args.mcpu:
        os.environ["RECURKIT_TVM_MCPU"] = args.mcpu
    T, H, K = args.T, args.H, args.D
    base = gdn_inputs(1, T, H, K)
    print(f"machine: {machine()}")
    print(f"vector features: {' '.join(cpu_features())}")
    from recurkit.backends.tvm.build import target, vector_lanes
    print(f"recurkit's TVM kernels for: {target().attrs['mcpu']} ({vector_lanes()} fp32 lanes)")
    print(f"Gated DeltaNet forward + backward, B=1 T={T} H={H} K=V={K}, fp32\n")

    def step(fn):
        xs = [t.clone().requires_grad_() for t in base]
        o = fn(*xs)[0]
        o.backward(torch.ones_like(o))
        return xs

    exported = rk.export(rk.ops.gated_delta_rule, "bench::gdn")
    chunked = rk.export(rk.ops.gated_delta_rule, "bench::gdn_chunk", backward="chunk")
    recompute = rk.export(rk.ops.gated_delta_rule, "bench::gdn_recompute", backward="autograd")
    torch_op = rk.compile(rk.ops.gated_delta_rule, backend="torch")
    fns = {OURS: lambda: step(exported),
           CHUNK: lambda: step(chunked),
           "recurkit rk.export, backward='autograd' (recompute)": lambda: step(recompute),
           # the tile program differentiated by autograd directly (not through the custom op)
           "recurkit torch backend under autograd": lambda: step(
               lambda *a: torch_op.forward(**dict(zip(["q", "k", "v", "g", "beta"], a))))}
    fla = fla_naive_gdn()
    if fla is not None:
        fns["FLA naive_chunk_gated_delta_rule under autograd"] = lambda: step(fla)
    times = bench(fns, repeats=args.repeats)
    ours = times[OURS]
    width = max(map(len, times))
    for n, t in times.items():
        print(f"{n:<{width}}  {t * 1e3:9.1f} ms  {t / ours:6.2f}x the exported op")
    if fla is not None:
        g_ours = step(exported)
        g_fla = step(fla)
        err = max(((a.grad - b.grad).abs().max() / b.grad.abs().max()).item()
                  for a, b in zip(g_ours, g_fla))
        ratio = times["FLA naive_chunk_gated_delta_rule under autograd"] / ours
        print(f"\nmax relative gradient difference to FLA: {err:.1e}")
        for bar, issue in ((3, 7), (6, 23)):
            print(f"bar of issue {issue} (>= {bar}x faster than FLA naive under autograd): "
                  f"{ratio:.2f}x -> "
                  f"{'met' if ratio >= bar else 'MISSED by %.2fx' % (bar / ratio)}")
    name = "gdn_train_cpu" + (f"_{args.mcpu}" if args.mcpu else "")
    save_results(name, {"shape": {"B": 1, "T": T, "H": H, "K": K, "V": K}, "dtype": "float32",
                        "mcpu": target().attrs["mcpu"], "lanes": vector_lanes(),
                        "ms": {n: t * 1e3 for n, t in times.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
