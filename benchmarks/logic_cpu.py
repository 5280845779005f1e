"""Logic-gate network inference on this CPU: the compiled hard (bit-packed) kernel vs the soft
float forward, in one run.

    python benchmarks/logic_cpu.py [--samples 262144] [--repeats 5]

Network: difflogic's MNIST size, 784 inputs, 6 layers of 8000 gates, GroupSum over 10 classes,
random connections and gates (a trained net of this shape costs the same: every gate is one
branch-free formula). Inputs: random bits.

Rows:
  hard kernel       ``rk.nn.compile_hard``'s TVM kernel on inputs already packed 64 per word
  hard end to end   the same from a bool tensor [N, 784] (packing included)
  soft, recurkit    the float model in eval mode (each layer the compiled tiled op, TVM)
  soft, torch       the same float forward written in plain torch (gathers and the 16-gate
                    mix, difflogic's formulation), eval mode
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import bench, cpu_features, machine, save_results  # noqa: E402

import recurkit as rk  # noqa: E402
from recurkit.backends.tvm.packed import net_buffers, pack_bits, run_packed_tvm  # noqa: E402
from recurkit.lowering.packed import GATE_COEFFS  # noqa: E402


def plain_torch_forward(model: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode difflogic in torch: per layer a, b = the gathered columns and the argmax gate's
    real form k0 + k1 a + k2 b + k3 a b."""
    for m in model:
        if isinstance(m, rk.nn.LogicLayer):
            k = GATE_COEFFS[m.gates()]
            a, b = x.index_select(1, m.ia), x.index_select(1, m.ib)
            x = k[:, 0] + k[:, 1] * a + k[:, 2] * b + k[:, 3] * a * b
        else:
            x = m(x)
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=262144)
    ap.add_argument("--soft-samples", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    widths = [784] + [8000] * 6
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(*[rk.nn.LogicLayer(a, b, generator=g)
                                  for a, b in zip(widths, widths[1:])],
                                rk.nn.GroupSum(10, tau=1.0)).eval()
    N = args.samples
    x = torch.rand(N, 784) < 0.5
    print(f"machine: {machine()}")
    print(f"vector features: {' '.join(cpu_features())}")
    print(f"network: 784 -> 6 x 8000 gates -> GroupSum(10); {N} samples for the hard rows, "
          f"{args.soft_samples} for the soft rows")
    rows = {}
    for words in (4, 8, 16):
        hard = rk.nn.compile_hard(model, words=words)
        xp = pack_bits(x, words)
        bufs = net_buffers(hard.net)
        t = bench({"k": lambda: run_packed_tvm(hard.net, xp, words, bufs),
                   "e2e": lambda: hard(x)}, args.repeats)
        rows[f"hard kernel, {words} words/block"] = (t["k"], N)
        rows[f"hard end to end, {words} words/block"] = (t["e2e"], N)
    hard = rk.nn.compile_hard(model)
    xs = x[:args.soft_samples]
    with torch.no_grad():
        assert torch.equal(hard(xs), model(xs.float())), "hard != eval-mode model"
        t = bench({"rk": lambda: model(xs.float()),
                   "torch": lambda: plain_torch_forward(model, xs.float())}, args.repeats)
    rows["soft float, recurkit tiled op (TVM)"] = (t["rk"], args.soft_samples)
    rows["soft float, plain torch"] = (t["torch"], args.soft_samples)
    base = rows["soft float, plain torch"]
    base_rate = base[1] / base[0]
    print(f"{'path':<40} {'ms':>9} {'samples/s':>12} {'vs torch soft':>14}")
    for name, (sec, n) in rows.items():
        rate = n / sec
        print(f"{name:<40} {sec * 1e3:9.2f} {rate:12.3e} {rate / base_rate:13.1f}x")
    save_results("logic_cpu", {"network": "784 -> 6 x 8000 gates -> GroupSum(10)",
                               "rows": [{"path": n, "ms": sec * 1e3, "samples": k}
                                        for n, (sec, k) in rows.items()]})


if __name__ == "__main__":
    main()
