"""Steps of several updates on this CPU, forward only: DeltaProduct (two erases per token)
and Mamba-3's MIMO write (rank R), each as sub-steps of the chunk forms (torch and TVM tile
programs over T * n tokens) against the declaration's own sequential TVM kernel and the
reference interpreter (the step in torch, token by token), in one run.

    python benchmarks/substeps_cpu.py [--T 2048] [--H 4] [--D 64] [--R 4] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import add_shape_args, bench, cpu_features, machine, save_results  # noqa: E402

import recurkit as rk  # noqa: E402


@rk.recurrence
def delta_product(S: rk.State["K", "V"], q: rk.Token["K"], k1: rk.Token["K"],
                  v1: rk.Token["V"], b1: rk.Token[()], k2: rk.Token["K"], v2: rk.Token["V"],
                  b2: rk.Token[()], g: rk.Token[()]):
    S = rk.exp(g) * S
    S = S + b1 * rk.outer(k1, v1 - k1 @ S)
    S = S + b2 * rk.outer(k2, v2 - k2 @ S)
    return S, q @ S


@rk.recurrence
def mimo(S: rk.State["K", "V"], q: rk.Token["K"], kt: rk.Token["K", "R"],
         vt: rk.Token["R", "V"], g: rk.Token[()]):
    S = rk.exp(g) * S + kt @ vt
    return S, q @ S


def inputs(decl, T, H, D, R):
    gen = torch.Generator().manual_seed(0)
    sizes = {"K": D, "V": D, "R": R}
    out = {}
    for s in decl.program.call_inputs:
        x = torch.randn(1, T, H, *(sizes[d] for d in s.dims), generator=gen)
        if s.name == "g":
            x = F.logsigmoid(x) / 8
        elif s.name.startswith("b"):
            x = torch.sigmoid(x)
        elif s.name.startswith("k") and s.dims == ("K",):
            x = F.normalize(x, dim=-1)
        elif s.name in ("kt", "vt"):
            x = x / D ** 0.5
        out[s.name] = x
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    add_shape_args(ap, repeats=5)
    ap.add_argument("--R", type=int, default=4)
    ap.set_defaults(T=2048, D=64)
    args = ap.parse_args()
    T, H, D, R = args.T, args.H, args.D, args.R
    print(f"machine: {machine()}")
    print(f"vector features: {' '.join(cpu_features())}")
    print(f"forward, B=1 T={T} H={H} K=V={D} R={R}, fp32, {torch.get_num_threads()} threads\n")
    rows = {}
    for decl in (delta_product, mimo):
        rec = rk.analyze(decl)
        xs = inputs(decl, T, H, D, R)
        form = rec.forms[0]
        ops = {"TVM sequential (the step itself)": rk.compile(decl, backend="tvm"),
               f"torch {form} (sub-steps)": rk.compile(decl, backend="torch", form=form),
               f"TVM {form} (sub-steps)": rk.compile(decl, backend="tvm", form=form),
               "reference (torch, token by token)": rk.compile(decl, backend="reference")}
        want = ops["reference (torch, token by token)"](**xs)[0]
        for name, op in ops.items():
            got = op(**xs)[0]
            err = ((got - want).abs().max() / want.abs().max()).item()
            assert err < 1e-4, (name, err)
        with torch.no_grad():
            t = bench({n: (lambda op=op: op(**xs)) for n, op in ops.items()},
                      repeats=args.repeats)
        base = t["TVM sequential (the step itself)"]
        print(f"{decl.name}: {rec.reasons[-1]}")
        for n, s in t.items():
            print(f"  {n:38s} {s * 1e3:9.1f} ms   {s / base:5.2f}x the sequential kernel")
        rows[decl.name] = {"note": rec.reasons[-1], "ms": {n: s * 1e3 for n, s in t.items()}}
        print()
    print(save_results("substeps_cpu", {"shape": {"B": 1, "T": T, "H": H, "K": D, "V": D,
                                                  "R": R}, "results": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
