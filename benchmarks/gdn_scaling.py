"""Gated DeltaNet forward on this CPU as the sequence grows: recurkit's TVM kernel and torch
backend against flash-linear-attention's naive chunk code (torch.compile of that code is left
out: it takes minutes to compile, see TOOLCHAIN.md); one run, the candidates interleaved.

    pip install --no-deps fla-core einops   # FLA's naive code (optional)
    python benchmarks/gdn_scaling.py [--Ts 256,512,1024,2048,4096,8192] [--H 4] [--D 128]

Writes benchmarks/results/gdn_scaling.json (``benchmarks/plot.py`` draws it).
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(__file__))
from common import (bench, cpu_features, fla_naive_gdn, gdn_inputs, machine,  # noqa: E402
                    save_results)

import recurkit as rk  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--Ts", default="256,512,1024,2048,4096,8192")
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    Ts = [int(t) for t in args.Ts.split(",")]
    H, K = args.H, args.D
    print(f"machine: {machine()}")
    print(f"vector features: {' '.join(cpu_features())}")
    print(f"Gated DeltaNet forward, B=1 H={H} K=V={K}, fp32; median of {args.repeats}\n")
    fla = fla_naive_gdn()
    tvm_op = rk.compile(rk.ops.gated_delta_rule, backend="tvm")
    torch_op = rk.compile(rk.ops.gated_delta_rule, backend="torch", chunk=64)
    names = ["recurkit tvm sequential", "recurkit torch chunk_wy 64"] + \
        (["FLA naive_chunk_gated_delta_rule"] if fla is not None else [])
    print(f"{'T':>6} " + " ".join(f"{n:>34}" for n in names))
    rows = []
    for T in Ts:
        x = gdn_inputs(1, T, H, K)
        tvm_op(*[t[:, :8] for t in x])   # compile outside the timing
        fns = {names[0]: lambda: tvm_op(*x, output_final_state=True),
               names[1]: lambda: torch_op(*x, output_final_state=True)}
        if fla is not None:
            fns[names[2]] = lambda: fla(*x, output_final_state=True)
        t = bench(fns, repeats=args.repeats)
        print(f"{T:>6} " + " ".join(f"{t[n] * 1e3:31.1f} ms" for n in names))
        rows.append({"T": T, "ms": {n: t[n] * 1e3 for n in names}})
    save_results("gdn_scaling", {"shape": {"B": 1, "H": H, "K": K, "V": K}, "dtype": "float32",
                                 "rows": rows})


if __name__ == "__main__":
    main()
