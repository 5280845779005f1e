"""Gated DeltaNet forward on this CPU: recurkit's torch backend vs the reference interpreter vs
flash-linear-attention's naive chunk code, in one run.

    pip install --no-deps fla-core einops   # FLA's reference code (optional)
    python benchmarks/gdn_forward.py [--T 4096] [--repeats 7]

Bars: the torch backend at least 1.5x (issue 3) and the TVM backend at least 3x (issue 4)
faster than FLA's naive_chunk_gated_delta_rule.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import (add_shape_args, bench, cpu_features, fla_naive_gdn, gdn_inputs,  # noqa: E402
                    machine, save_results)

import recurkit as rk  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=1)
    add_shape_args(ap, repeats=7)
    ap.add_argument("--skip-reference", action="store_true")
    args = ap.parse_args()
    B, T, H, K = args.B, args.T, args.H, args.D
    q, k, v, g, beta = gdn_inputs(B, T, H, K)
    print(f"machine: {machine()}")
    print(f"vector features: {' '.join(cpu_features())}")
    print(f"Gated DeltaNet forward, B={B} T={T} H={H} K=V={K}, fp32\n")

    fns = {}
    for chunk in (32, 64):
        op = rk.compile(rk.ops.gated_delta_rule, backend="torch", chunk=chunk)
        fns[f"recurkit torch, {op.form} chunk {chunk}"] = \
            lambda op=op: op(q, k, v, g, beta, output_final_state=True)
    tvm_op = rk.compile(rk.ops.gated_delta_rule, backend="tvm")
    tvm_op(q[:, :8], k[:, :8], v[:, :8], g[:, :8], beta[:, :8])   # compile outside the timing
    fns["recurkit tvm, sequential"] = lambda: tvm_op(q, k, v, g, beta, output_final_state=True)
    fla = fla_naive_gdn()
    if fla is not None:
        fns["FLA naive_chunk_gated_delta_rule"] = \
            lambda: fla(q, k, v, g, beta, output_final_state=True)
    times = bench(fns, repeats=args.repeats)
    if not args.skip_reference:
        ref = rk.compile(rk.ops.gated_delta_rule, backend="reference")
        times.update(bench({"recurkit reference interpreter":
                            lambda: ref(q, k, v, g, beta, output_final_state=True)},
                           repeats=1, warmup=0))

    o_ref, _ = fns[next(iter(fns))]()
    best = min(t for n, t in times.items() if n.startswith(("recurkit torch", "recurkit tvm")))
    width = max(map(len, times))
    print(f"{'':<{width}}  {'ms':>9}  {'vs best recurkit':>16}")
    for n, t in times.items():
        print(f"{n:<{width}}  {t * 1e3:9.1f}  {t / best:15.2f}x")
    if fla is not None:
        o_fla, _ = fla(q, k, v, g, beta)
        err = ((o_fla - o_ref).abs().max() / o_fla.abs().max()).item()
        ratio = times["FLA naive_chunk_gated_delta_rule"] / best
        print(f"\nmax relative difference to FLA: {err:.1e}")
        torch_best = min(t for n, t in times.items() if n.startswith("recurkit torch"))
        for label, t, bar in (("torch backend", torch_best, 1.5),
                              ("tvm backend", times["recurkit tvm, sequential"], 3.0)):
            r = times["FLA naive_chunk_gated_delta_rule"] / t
            verdict = "met" if r >= bar else f"MISSED by {bar / r:.2f}x"
            print(f"bar: {label} >= {bar}x faster than FLA's naive chunk code: {r:.2f}x, "
                  f"{verdict}")
    save_results("gdn_forward", {"shape": {"B": B, "T": T, "H": H, "K": K, "V": K},
                                 "dtype": "float32",
                                 "ms": {n: t * 1e3 for n, t in times.items()}})


if __name__ == "__main__":
    main()
