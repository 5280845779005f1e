"""Logic-gate networks on one CUDA GPU, in one run: the hard Triton kernel (the gate program,
``recurkit/backends/triton/packed.py``) with a sweep of its blocks, against the eval-mode
float model in plain torch and through recurkit's soft Triton op; and soft training steps.

    python benchmarks/logic_gpu.py [--samples 2097152] [--soft-samples 32768] [--json PATH]

Network: ``benchmarks/logic_cpu.py``'s (784 -> 6 x 8000 random gates -> GroupSum(10)), with
all-16 and two-input gates. Every hard configuration's counts are checked against the
eval-mode model first. Rows:
  hard kernel (cfg)   counts from bool inputs [N, 784] on the GPU (packing included), per
                      block configuration (block_w words per program, block_o gates per
                      block, block_m members per count step, warps) and scratch budget
  hard end to end     ``rk.nn.compile_hard(model)(x)``: the float scores, default blocks
  soft forward        eval mode (float 0/1 inputs): plain torch, and recurkit (Triton op)
  soft train step     forward + backward of the cross entropy: recurkit vs plain torch
On a machine without a GPU it says so and exits.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from logic_cpu import model, plain_torch_forward, train_steps  # noqa: E402

import recurkit as rk  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2 ** 21)
    ap.add_argument("--soft-samples", type=int, default=32768)
    ap.add_argument("--json", default=None)
    ap.add_argument("--check-on-cpu", action="store_true",
                    help="run the script's steps in Triton's interpreter with few samples "
                         "and one configuration (a check of the script, not a measurement)")
    args = ap.parse_args()
    dev = "cpu" if args.check_on_cpu else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        print("logic_gpu.py: no CUDA device here; run it on a machine with a GPU")
        return 0
    import triton
    from triton.testing import do_bench
    from recurkit.backends.triton import packed as tp

    def ms(fn):
        if dev == "cpu":
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return do_bench(fn, warmup=25, rep=200, return_mode="median")

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    torch.manual_seed(0)
    N = args.samples
    x = torch.rand(N, 784, device=dev) < 0.5
    device = torch.cuda.get_device_name() if dev == "cuda" else "cpu (interpreter check)"
    print(f"device: {device} | torch {torch.__version__} | triton "
          f"{triton.__version__} | {N} hard samples, {args.soft_samples} soft")
    rows, nets, sweep = {}, {}, {}

    def row(name, t, n):   # printed as measured: a run cut short keeps what it had
        rows[name] = (t, n)
        print(f"  {name}: {t:.3f} ms, {n / t * 1e3:.3e} samples/s", flush=True)
    best = None
    for gates in ("all 16", "two-input"):
        m = model("two-input" if gates == "two-input" else "all").eval().to(dev)
        t0 = time.perf_counter()
        hard = rk.nn.compile_hard(m, backend="triton")
        hard(x[:64])
        sync()
        build_s = time.perf_counter() - t0
        prog = hard.program
        bufs = tp.program_buffers(prog, dev)
        xs = x[:5000 if dev == "cuda" else 100]
        with torch.no_grad():
            want = m(xs.float())
        assert torch.equal(hard(xs), want), f"hard != eval model ({gates})"
        want_counts = hard.counts(xs)
        nets[gates] = dict(hard.stats, compile_s=build_s)
        s = hard.stats
        print(f"{gates} gates: {s['gates']} gates -> {s['ops']} ops, {s['levels']} levels, "
              f"{s['slots']} slots; optimised in {s['optimize_s']:.2f} s, compiled and first "
              f"call {build_s:.1f} s", flush=True)
        if dev == "cpu":
            cfgs = [(4, 32, 4, 4)]
        elif best is None:   # the sweep, on the first network; the second runs its winner
            cfgs = [(16, 64, 4, 4), (32, 64, 4, 4)]
        else:
            cfgs = [best, (tp.BLOCK_W, tp.BLOCK_O, tp.BLOCK_M, tp.NUM_WARPS)]
        for phase in (0, 1):
            for cfg in dict.fromkeys(cfgs):
                bw, bo, bm, nw = cfg
                fn = lambda: tp.run_packed_triton(prog, x, bufs, bw, bo, bm, nw)  # noqa: E731
                try:
                    got = tp.run_packed_triton(prog, xs, bufs, bw, bo, bm, nw)[:xs.shape[0]]
                    assert torch.equal(got, want_counts), f"counts differ at {cfg}"
                    t = ms(fn)
                except Exception as e:   # noqa: BLE001 - a configuration that fails is reported
                    print(f"  {cfg}: failed: {type(e).__name__}: {str(e)[:200]}")
                    continue
                sweep[(gates, cfg)] = t
                print(f"  hard kernel {gates} (block_w, block_o, block_m, warps) = {cfg}: "
                      f"{t:.3f} ms, {N / t * 1e3:.3e} samples/s", flush=True)
            mine = {c: v for (g, c), v in sweep.items() if g == gates}
            if not mine:
                break
            top = min(mine, key=mine.get)
            if best is not None or phase == 1 or dev == "cpu":
                break
            cfgs = [(top[0], top[1], bm, nw) for bm in (2, 8) for nw in (4, 8)]
        mine = {c: v for (g, c), v in sweep.items() if g == gates}
        top = min(mine, key=mine.get)
        best = best or top
        row(f"hard kernel, {gates} gates, best {top}", mine[top], N)
        for sb in ((1 << 28, 1 << 32) if dev == "cuda" else ()):
            t = ms(lambda: tp.run_packed_triton(prog, x, bufs, *top, scratch_bytes=sb))
            row(f"hard kernel, {gates} gates, best, scratch {sb >> 20} MiB", t, N)
        row(f"hard end to end (defaults), {gates} gates", ms(lambda: hard(x)), N)
    m = model("all").to(dev)
    ns = args.soft_samples
    xf = (torch.rand(ns, 784, device=dev) < 0.5).float()
    y = torch.randint(0, 10, (ns,), device=dev)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(xf), plain_torch_forward(m, xf))
        row("soft forward, recurkit (Triton)", ms(lambda: m(xf)), ns)
        row("soft forward, plain torch", ms(lambda: plain_torch_forward(m, xf)), ns)
    steps = train_steps(m, xf, y)
    row("soft train step, recurkit (Triton)", ms(steps["rk"]), ns)
    row("soft train step, plain torch", ms(steps["torch"]), ns)
    print(f"{'path':<58} {'ms':>9} {'samples/s':>12} {'vs peer':>8}")
    for name, (t, n) in rows.items():
        base = rows["soft train step, plain torch" if "train" in name
                    else "soft forward, plain torch"]
        print(f"{name:<58} {t:9.3f} {n / t * 1e3:12.3e} "
              f"{(n / t) / (base[1] / base[0]):7.1f}x")
    print("(vs peer: the plain torch eval forward; for the train steps, the plain torch step)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "torch": torch.__version__,
                       "triton": triton.__version__, "nets": nets,
                       "sweep": [{"gates": g, "cfg": list(c), "ms": t}
                                 for (g, c), t in sweep.items()],
                       "rows": [{"path": k, "ms": t, "samples": n}
                                for k, (t, n) in rows.items()]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
