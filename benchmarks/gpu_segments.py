"""In-GPU segments of the Triton chunk forms: when they pay. For each op and shape, the
modelled time (``traffic.Traffic.roofline``: bytes over bandwidth, dot FLOPs over the
tensor-core rate, and the state passes' chains of dependent chunk steps over the device's
multiprocessors) of the forward and of the backward's kernels at 1, 2, 4, ... segments on
H100 and H200, their launches and bytes, and the count the automatic choice
(``segments=None``) takes. No GPU is needed: the
kernels' traffic is modelled from the generated source (``chunk_module.model_traffic``,
checked against the interpreter's counts in ``tests/test_segments.py``). With ``--time`` on
a GPU the same shapes are also timed (median of CUDA-event timings) at each count.

    python benchmarks/gpu_segments.py [--time]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, save_results  # noqa: E402

import recurkit as rk  # noqa: E402
from recurkit.backends.triton import segments as seg  # noqa: E402
from recurkit.backends.triton.chunk_module import model_traffic  # noqa: E402
from recurkit.backends.triton.runtime import check_config  # noqa: E402
from recurkit.ir.bind import bind_meta  # noqa: E402
from recurkit.lowering.chunk_adjoint import lower_adjoint  # noqa: E402

SHAPES = [(1, 32768, 4), (1, 8192, 16), (4, 8192, 16), (16, 4096, 32)]   # (B, T, H)
OPS = ["gated_delta_rule", "gla", "kda"]
COUNTS = [1, 2, 4, 8, 16, 32]


def call(name, B, T, H, K=128):
    """Random inputs on the GPU (log-gates fp32, the rest bf16), by name."""
    decl = getattr(rk.ops, name).decl
    xs = {}
    for spec in decl.program.call_inputs:
        if spec.role == "scalar":
            xs[spec.name] = 1.0
        elif spec.role in ("token", "param"):
            lead = (B, T, H) if spec.role == "token" else (H,)
            shape = (*lead, *(K for _ in spec.dims))
            if spec.name in ("g", "gk"):   # log-gates: fp32, as FLA takes them
                xs[spec.name] = -torch.rand(shape, device="cuda") * 0.1
            else:
                xs[spec.name] = torch.randn(shape, device="cuda").bfloat16() * 0.1
    return decl, xs


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--time", action="store_true", help="also time on this GPU")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    rows = []
    for name in OPS:
        for B, T, H in SHAPES:
            decl = getattr(rk.ops, name).decl
            tp = rk.compile(decl, backend="triton").tile_program
            bc = bind_meta(decl.program, B, T, H, {"K": 128, "V": 128}, torch.bfloat16,
                           output_final_state=True)
            row = {"op": name, "B": B, "T": T, "H": H, "K": 128, "V": 128, "dtype": "bfloat16",
                   "chunk": tp.chunk, "counts": {}}
            bwd = lower_adjoint(decl.program, tp.form, 16)   # the backward's default chunk
            row["backward"] = {}
            for s in COUNTS:
                t = model_traffic(tp, bc, check_config({"segments": s}))
                row["counts"][s] = {"h100_us": t.roofline("h100") * 1e6,
                                    "h200_us": t.roofline("h200") * 1e6,
                                    "launches": t.count(), "bytes": t.read + t.written,
                                    "serial_steps": max(x.serial for x in t.launches)}
                b = model_traffic(bwd, bc, check_config({"segments": s}))
                row["backward"][s] = {"h100_us": b.roofline("h100") * 1e6,
                                      "h200_us": b.roofline("h200") * 1e6,
                                      "launches": b.count(), "bytes": b.read + b.written}
            row["auto"] = seg.auto_count(tp, bc, check_config(None))
            one = row["counts"][1]["h100_us"]
            best = min(row["counts"], key=lambda s: row["counts"][s]["h100_us"])
            row["best"], row["best_speedup_h100"] = best, one / row["counts"][best]["h100_us"]
            if args.time and torch.cuda.is_available():
                row["measured_us"] = measure(name, B, T, H)
            rows.append(row)
            print(f"{name:17} B{B:<3} T{T:<6} H{H:<3} fwd " + " ".join(
                f"{s}:{row['counts'][s]['h100_us']:7.1f}" for s in COUNTS) +
                f"  auto {row['auto']:2}  best {best:2} ({row['best_speedup_h100']:.2f}x)")
            print(f"{'':34} bwd " + " ".join(
                f"{s}:{row['backward'][s]['h100_us']:7.1f}" for s in COUNTS))
    save_results("gpu_segments", {"model": "traffic.Traffic.roofline (H100, H200 constants; "
                                           "state-pass step 0.5 us, an estimate)",
                                  "rows": rows})
    return 0


def measure(name, B, T, H) -> dict:
    decl, xs = call(name, B, T, H)
    out = {}
    for s in COUNTS:
        op = rk.compile(decl, backend="triton", knobs={"segments": s})
        op(**xs)
        torch.cuda.synchronize()
        ts = []
        for _ in range(10):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            op(**xs)
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b) * 1e3)
        out[s] = sorted(ts)[len(ts) // 2]
    return out


if __name__ == "__main__":
    sys.exit(main())
