"""Shift-add matmul on one CUDA GPU: the Triton look-up kernels ("lut") vs the decode +
``tl.dot`` kernel ("dot") vs torch F.linear in fp32, fp16 and bf16, over batch sizes, in one
run; effective GB/s of the packed weight against the device's copy bandwidth measured in the
same run; and which kernel wins where (the switch in ``triton.lut.run_lut_triton``).

    python benchmarks/shift_add_gpu.py [--quick]

Codes and alphas are random (the kernels' time does not depend on their values). Every
kernel's output is checked against the fp64 matmul with the dequantized weight first.
"lut" / "dot": time per call (host included); "(g)": the same call replayed from a CUDA
graph (the GPU's time alone; GB/s is computed from it).
On a machine without a GPU it says so and exits.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import recurkit as rk
from recurkit.ir.tiled import bind_tiled, unpack_signs
from recurkit.lowering.lut import lower_lut

GROUP = 128


def random_codes(G: int, O: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed codes [G, O, bits, GROUP // 8] and alphas [G, O, bits] on the GPU."""
    codes = torch.randint(0, 256, (G, O, bits, GROUP // 8), dtype=torch.uint8, device="cuda")
    return codes, torch.rand(G, O, bits, device="cuda") + 0.1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4096x4096, 3 bits, N in {1, 16}")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("shift_add_gpu.py: no CUDA device here; run it on a machine with a GPU")
        return 0
    import triton
    from triton.testing import do_bench, do_bench_cudagraph
    from recurkit.backends.triton.lut import LUT_MAX_N, run_lut_triton

    def ms(fn):
        return do_bench(fn, warmup=25, rep=100, return_mode="median")

    def graph_ms(fn):   # replayed from a CUDA graph: the GPU's time without the host's
        try:
            return do_bench_cudagraph(fn, rep=50, return_mode="median")
        except Exception as e:   # noqa: BLE001 - a call that cannot be captured
            print(f"(no CUDA graph: {type(e).__name__}: {e})")
            return float("nan")

    def copy_bandwidth() -> float:   # GB/s of a 1 GiB device copy, read + write
        a = torch.empty(2 ** 28, device="cuda")
        b = torch.empty_like(a)
        return 2 * a.numel() * 4 / ms(lambda: b.copy_(a)) / 1e6
    bw = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton "
          f"{triton.__version__} | copy bandwidth {bw:.0f} GB/s | group {GROUP} | "
          f"lut up to N={LUT_MAX_N}, dot above")
    plan = lower_lut(rk.ops.shift_add.program)
    # the look-up kernel's blocks and program budget, at N = 1 (the defaults are the runner's)
    G, O = 4096 // GROUP, 4096
    codes, alpha = random_codes(G, O, 3)
    for N in (1, 8):
        tc = bind_tiled(rk.ops.shift_add.program,
                        (torch.randn(N, G, GROUP, device="cuda"), codes, alpha), {})
        sweep = {(bo, bb, pr): ms(lambda: run_lut_triton(
            plan, tc, kernel="lut", lut_block_o=bo, lut_block_b=bb, lut_programs=pr)) * 1e3
            for bo in (32, 64, 128) for bb in (8, 16) for pr in (512, 1024, 4096)
            if bo * bb <= 1024}
        best = sorted(sweep, key=sweep.get)[:4]
        print(f"lut configs, 4096x4096 3 bits N={N} (block_o, block_b, programs): us " +
              ", ".join(f"{c}: {sweep[c]:.1f}" for c in best) + f"; default (128, 8, 1024): "
              f"{sweep[(128, 8, 1024)]:.1f}")
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (11008, 4096)]
    bits_list = [3] if args.quick else [2, 3, 4]
    batches = [1, 16] if args.quick else [1, 4, 8, 16, 64, 256]
    print(f"{'O x K':>11} {'bits':>4} {'N':>4} | {'fp32':>7} {'fp16':>7} {'bf16':>7} "
          f"{'lut':>7} {'dot':>7} {'lut(g)':>7} {'dot(g)':>7} us | {'lut GB/s':>8} "
          f"{'best':>4} {'vs fp16':>7} {'err lut':>8} {'err dot':>8}")
    wins = {}
    for O, Kd in shapes:
        G = Kd // GROUP
        W32 = torch.randn(O, Kd, device="cuda")
        W16, Wb = W32.half(), W32.bfloat16()
        for bits in bits_list:
            codes, alpha = random_codes(G, O, bits)
            Wq = torch.einsum("goq,goqe->oge", alpha.double(),
                              unpack_signs(codes).double()).reshape(O, Kd)
            for N in batches:
                x = torch.randn(N, Kd, device="cuda")
                tc = bind_tiled(rk.ops.shift_add.program, (x.view(N, G, GROUP), codes, alpha),
                                {})
                want = x.double() @ Wq.T
                err = {}
                for k in ("lut", "dot"):
                    y = run_lut_triton(plan, tc, kernel=k)
                    err[k] = ((y.double() - want).abs().max() / want.abs().max()).item()
                x16, xb = x.half(), x.bfloat16()
                t = {"fp32": ms(lambda: F.linear(x, W32)),
                     "fp16": ms(lambda: F.linear(x16, W16)),
                     "bf16": ms(lambda: F.linear(xb, Wb)),
                     "lut": ms(lambda: run_lut_triton(plan, tc, kernel="lut")),
                     "dot": ms(lambda: run_lut_triton(plan, tc, kernel="dot")),
                     "lut(g)": graph_ms(lambda: run_lut_triton(plan, tc, kernel="lut")),
                     "dot(g)": graph_ms(lambda: run_lut_triton(plan, tc, kernel="dot"))}
                best = min(("lut", "dot"), key=t.get)
                wins[(O, bits, N)] = best
                gbs = (codes.numel() + alpha.numel() * 4 + x.numel() * 4 + N * O * 4) \
                    / t["lut(g)"] / 1e6
                print(f"{O:>5}x{Kd:<5} {bits:>4} {N:>4} | " +
                      " ".join(f"{t[k] * 1e3:7.1f}" for k in ("fp32", "fp16", "bf16", "lut",
                                                            "dot", "lut(g)", "dot(g)")) +
                      f" | {gbs:8.0f} {best:>4} {t['fp16'] / t[best]:7.2f} "
                      f"{err['lut']:8.1e} {err['dot']:8.1e}", flush=True)
    lut_ns = sorted({n for (_, _, n), w in wins.items() if w == "lut"})
    print(f"lut won at N in {lut_ns}; dot won elsewhere (the switch: lut up to N={LUT_MAX_N})")
    layer = rk.nn.ShiftAddLinear.from_linear(torch.nn.Linear(4096, 4096), bits=3).cuda()
    x = torch.randn(1, 4096, device="cuda")
    print(f"ShiftAddLinear(4096, 4096, 3 bits) on cuda, N=1, through its custom op: "
          f"{ms(lambda: layer(x)) * 1e3:.1f} us ({layer.nbytes() / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
