"""Shift-add GEMV on CPU: rk.nn.ShiftAddLinear (TVM look-up kernels) vs torch F.linear in fp32
and bf16, batch 1, in one run; effective GB/s against this machine's copy bandwidth measured
in the same run; then the output error of a small MLP quantized per bit width. "layer" is the
whole ShiftAddLinear call (no gradient: the shuffle kernels called directly), "kernel"
``run_lut_tvm``'s default (the AVX2 shuffle kernels where the CPU has AVX2, with the op's
argument handling), "permute" and "byte tables" the earlier kernels it replaces there.

Two timing modes, both interleaving the candidates: "idle", each call after 20 ms of idle
time (cold: the weights come from memory, the thread pools wake up, the Python path runs
cold); "b2b", 10 calls back to back after the idle time, per call (a decode loop's pattern).

    python benchmarks/shift_add_cpu.py [--repeats 50]

Bar (issue 8): 3-bit at least 4x faster than the fp32 GEMV. Codes and alphas for the timing
are random (the kernel's time does not depend on their values); the MLP check quantizes real
weights with bcq_quantize.

OMP_WAIT_POLICY is PASSIVE unless set otherwise: with torch's default (OpenMP threads spin
after each parallel region), a TVM kernel called right after a torch op shares the two cores
with spinning threads and measured up to 2x slower; the candidates here are interleaved.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch starts its threads
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from common import bench, bench_back_to_back, cpu_features, machine, save_results  # noqa: E402

import recurkit as rk  # noqa: E402
from recurkit.ir.tiled import bind_tiled  # noqa: E402
from recurkit.backends.tvm.lut import run_lut_tvm  # noqa: E402
from recurkit.lowering.lut import lower_lut  # noqa: E402

GROUP = 128


def copy_bandwidth(repeats: int) -> float:
    """GB/s of a 256 MiB tensor copy (read + write), median."""
    a = torch.empty(64 * 2 ** 20)
    b = torch.empty_like(a)
    t = bench({"copy": lambda: b.copy_(a)}, repeats=max(5, repeats // 5))["copy"]
    return 2 * a.numel() * 4 / t / 1e9


def random_layer(O: int, K: int, bits: int) -> rk.nn.ShiftAddLinear:
    G = K // GROUP
    codes = torch.randint(0, 256, (G, O, bits, GROUP // 8), dtype=torch.uint8)
    alpha = torch.rand(G, O, bits)
    return rk.nn.ShiftAddLinear(codes, alpha, None, GROUP)


def gemv_table(repeats: int, bw: float, rows: list) -> dict[str, float]:
    """Both timing modes; returns the 3-bit layer's ratio to fp32 at 4096x4096 per mode and
    appends a row per shape and path to ``rows``."""
    plan = lower_lut(rk.ops.shift_add.program)
    print(f"{'shape':>12} {'path':<30} {'MB moved':>9} {'ms idle':>8} {'GB/s':>6} "
          f"{'vs fp32':>7} {'ms b2b':>8} {'GB/s':>6} {'vs fp32':>7}")
    ratio3 = {}
    for O, K in ((4096, 4096), (11008, 4096)):
        x = torch.randn(1, K)
        W = torch.randn(O, K)
        Wb, xb = W.bfloat16(), x.bfloat16()
        fns = {"torch F.linear fp32": lambda: F.linear(x, W),
               "torch F.linear bf16": lambda: F.linear(xb, Wb)}
        moved = {"torch F.linear fp32": W.numel() * 4, "torch F.linear bf16": W.numel() * 2}
        for bits in (2, 3, 4):
            layer = random_layer(O, K, bits)
            xs = x.reshape(1, K // GROUP, GROUP)
            tc = bind_tiled(rk.ops.shift_add.program, (xs, layer.codes, layer.alpha), {})
            layer(x)   # compile
            fns[f"recurkit {bits}-bit layer"] = lambda layer=layer: layer(x)
            fns[f"recurkit {bits}-bit kernel"] = lambda tc=tc: run_lut_tvm(plan, tc)
            fns[f"recurkit {bits}-bit permute"] = \
                lambda tc=tc: run_lut_tvm(plan, tc, kernel="perm")
            fns[f"recurkit {bits}-bit byte tables"] = \
                lambda tc=tc: run_lut_tvm(plan, tc, kernel="bytes")
            for row in ("layer", "kernel", "permute", "byte tables"):
                moved[f"recurkit {bits}-bit {row}"] = layer.nbytes()
        for f in fns.values():
            f()
        idle = bench(fns, repeats=repeats, warmup=3)
        b2b = bench_back_to_back(fns, repeats=max(5, repeats // 5))
        for name in fns:
            cols = []
            for times in (idle, b2b):
                t = times[name]
                cols.append(f"{t * 1e3:8.3f} {moved[name] / t / 1e9:6.1f} "
                            f"{times['torch F.linear fp32'] / t:6.2f}x")
            print(f"{O:>5}x{K:<6} {name:<30} {moved[name] / 1e6:9.2f} {' '.join(cols)}")
            rows.append({"shape": f"{O}x{K}", "path": name, "bytes": moved[name],
                         "ms_idle": idle[name] * 1e3, "ms_b2b": b2b[name] * 1e3})
        if O == 4096:
            ratio3 = {mode: times["torch F.linear fp32"] / times["recurkit 3-bit layer"]
                      for mode, times in (("idle", idle), ("b2b", b2b))}
        print()
    print(f"copy bandwidth measured in this run: {bw:.1f} GB/s")
    return ratio3


def mlp_check() -> None:
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.GELU(),
                              torch.nn.Linear(1024, 512))
    x = torch.randn(64, 512)
    ref = mlp(x)
    print("\nMLP 512 -> 1024 -> 512 (GELU), 64 samples, both Linear layers quantized "
          f"(group {GROUP}, power-of-two alphas):")
    print(f"{'bits':>4} {'rel. output error':>18} {'weight bytes':>13} {'fp32 bytes':>11}")
    for bits in (2, 3, 4):
        q = torch.nn.Sequential(rk.nn.ShiftAddLinear.from_linear(mlp[0], bits, GROUP),
                                torch.nn.GELU(),
                                rk.nn.ShiftAddLinear.from_linear(mlp[2], bits, GROUP))
        with torch.no_grad():
            err = ((q(x) - ref).norm() / ref.norm()).item()
        nb = q[0].nbytes() + q[2].nbytes()
        fp = sum(p.numel() * 4 for p in mlp.parameters())
        print(f"{bits:>4} {err:18.4f} {nb:13d} {fp:11d}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    print(f"machine: {machine()}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    print(f"batch-1 GEMV y = x W^T, K = 4096, group {GROUP}; median of {args.repeats}\n")
    bw = copy_bandwidth(args.repeats)
    print(f"vector features: {' '.join(cpu_features())}")
    rows: list = []
    ratio3 = gemv_table(args.repeats, bw, rows)
    for mode, r in ratio3.items():
        print(f"bar: 3-bit layer >= 4x faster than fp32 F.linear at 4096x4096 ({mode}): "
              f"{r:.2f}x -> {'met' if r >= 4 else 'MISSED by %.2fx' % (4 / r)}")
    mlp_check()
    save_results("shift_add_cpu", {"batch": 1, "group": GROUP, "copy_gbps": bw,
                                   "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
                                   "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
