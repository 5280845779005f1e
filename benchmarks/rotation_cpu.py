"""Rotating states on this CPU, forward only: a complex-diagonal gated linear attention
(Mamba-3's complex SSD: a scalar decay and a per-pair turn) and a turned gated delta rule,
each in the rotating frame (torch and TVM chunk forms of the rotation-free declaration,
the turns on the host) against the declaration's own sequential TVM kernel, the reference
interpreter (token by token) and the same step without the turn (what the frame costs), in
one run.

    python benchmarks/rotation_cpu.py [--T 2048] [--H 4] [--D 64] [--repeats 5]
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
def complex_gla(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"],
                v: rk.Token["V"], g: rk.Token[()], th: rk.Token["P"]):
    S = rk.exp(g) * rk.rotate(S, th, "K") + rk.outer(k, v)
    return S, q @ S


@rk.recurrence
def plain_gla(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"],
              v: rk.Token["V"], g: rk.Token[()]):
    S = rk.exp(g) * S + rk.outer(k, v)
    return S, q @ S


@rk.recurrence
def turned_gdn(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"],
               v: rk.Token["V"], g: rk.Token[()], b: rk.Token[()], th: rk.Token["P"]):
    S = rk.exp(g) * rk.rotate(S, th, "K")
    S = S + b * rk.outer(k, v - k @ S)
    return S, q @ S


@rk.recurrence
def plain_gdn(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"],
              v: rk.Token["V"], g: rk.Token[()], b: rk.Token[()]):
    S = rk.exp(g) * S
    S = S + b * rk.outer(k, v - k @ S)
    return S, q @ S


def inputs(decl, T, H, D):
    gen = torch.Generator().manual_seed(0)
    sizes = {"K": D, "V": D, "P": D // 2}
    out = {}
    for s in decl.program.call_inputs:
        x = torch.randn(1, T, H, *(sizes[d] for d in s.dims), generator=gen)
        if s.name == "g":
            x = F.logsigmoid(x) / 8
        elif s.name == "b":
            x = torch.sigmoid(x)
        elif s.name == "k":
            x = F.normalize(x, dim=-1)
        elif s.name == "th":
            x = 0.1 * x
        out[s.name] = x
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    add_shape_args(ap, repeats=5)
    ap.set_defaults(T=2048, D=64)
    args = ap.parse_args()
    T, H, D = args.T, args.H, args.D
    print(f"machine: {machine()}")
    print(f"vector features: {' '.join(cpu_features())}")
    print(f"forward, B=1 T={T} H={H} K=V={D}, fp32, {torch.get_num_threads()} threads\n")
    rows = {}
    for decl, twin in ((complex_gla, plain_gla), (turned_gdn, plain_gdn)):
        rec = rk.analyze(decl)
        xs = inputs(decl, T, H, D)
        plain = {n: x for n, x in xs.items() if n != "th"}
        form = rec.forms[0]
        ops = {"TVM sequential (the step itself)": (rk.compile(decl, backend="tvm"), xs),
               f"torch {form} (rotating frame)": (rk.compile(decl, backend="torch",
                                                             form=form), xs),
               f"TVM {form} (rotating frame)": (rk.compile(decl, backend="tvm", form=form),
                                               xs),
               "reference (torch, token by token)": (rk.compile(decl, backend="reference"),
                                                     xs),
               f"torch {form}, no turn ({twin.name})": (rk.compile(twin, backend="torch",
                                                                   form=form), plain)}
        want = ops["reference (torch, token by token)"][0](**xs)[0]
        for name, (op, x) in ops.items():
            if x is xs:
                got = op(**x)[0]
                err = ((got - want).abs().max() / want.abs().max()).item()
                assert err < 1e-4, (name, err)
        with torch.no_grad():
            t = bench({n: (lambda op=op, x=x: op(**x)) for n, (op, x) in ops.items()},
                      repeats=args.repeats)
        base = t["TVM sequential (the step itself)"]
        print(f"{decl.name}: {rec.reasons[0]}")
        for n, s in t.items():
            print(f"  {n:40s} {s * 1e3:9.1f} ms   {s / base:5.2f}x the sequential kernel")
        rows[decl.name] = {"note": rec.reasons[0], "ms": {n: s * 1e3 for n, s in t.items()}}
        print()
    print(save_results("rotation_cpu", {"shape": {"B": 1, "T": T, "H": H, "K": D, "V": D},
                                        "results": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
