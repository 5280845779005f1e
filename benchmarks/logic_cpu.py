"""Logic-gate networks on this CPU, in one run: hard (compiled, bit-packed) inference, the soft
float forward, and soft training steps, against plain torch.

    python benchmarks/logic_cpu.py [--samples 262144] [--soft-samples 4096] [--repeats 5]

Network: difflogic's MNIST size, 784 inputs, 6 layers of 8000 gates, GroupSum over 10
classes, random connections, in two versions:
  all 16 gates      each neuron's gate drawn from all 16 (as a random init's argmax is): the
                    constant and one-input gates (6 of 16) fold away, and with them what only
                    they read
  two-input gates   each gate drawn from the 10 truly two-input gates: nothing folds, only
                    unread gates go; every kept gate costs one op (the worst case)
Inputs: random bits. Hard rows (``rk.nn.compile_hard``, TVM):
  hard kernel        on inputs already packed 64 per word
  hard end to end    from a bool tensor [N, 784]: packing, kernel and the float scores
Soft rows (the all-16 network, float32, ``--soft-samples`` rows):
  soft forward       eval mode: recurkit (each layer the compiled tiled op) vs plain torch
  soft train step    train mode (softmax over each neuron's 16 gate logits), forward + backward
                     of the cross entropy: recurkit vs the same math in plain torch
                     (k = softmax(z) @ GATE_COEFFS; y = k0 + k1 a + k2 b + k3 ab, autograd)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import bench, cpu_features, machine, save_results  # noqa: E402

import recurkit as rk  # noqa: E402
from recurkit.lowering.packed import GATE_COEFFS  # noqa: E402

TWO_INPUT = torch.tensor([1, 2, 4, 6, 7, 8, 9, 11, 13, 14])


def model(gates: str, seed: int = 0) -> torch.nn.Sequential:
    widths = [784] + [8000] * 6
    g = torch.Generator().manual_seed(seed)
    layers = [rk.nn.LogicLayer(a, b, generator=g) for a, b in zip(widths, widths[1:])]
    if gates == "two-input":   # each argmax a two-input gate
        with torch.no_grad():
            for m in layers:
                pick = TWO_INPUT[torch.randint(0, 10, (m.out_dim,), generator=g)]
                m.weights.scatter_(1, pick[:, None], 10.0)
    return torch.nn.Sequential(*layers, rk.nn.GroupSum(10, tau=1.0))


def plain_torch_forward(model: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """difflogic in plain torch: per layer the gathered columns a, b and the real form
    k0 + k1 a + k2 b + k3 a b with k = softmax(z) @ GATE_COEFFS (the argmax gate's in eval)."""
    for m in model:
        if isinstance(m, rk.nn.LogicLayer):
            C = GATE_COEFFS.to(m.weights.device)
            k = F.softmax(m.weights, -1) @ C if m.training else C[m.gates()]
            a, b = x.index_select(1, m.ia), x.index_select(1, m.ib)
            x = k[:, 0] + k[:, 1] * a + k[:, 2] * b + k[:, 3] * a * b
        else:
            x = x.reshape(x.shape[0], m.k, -1).sum(-1) / m.tau
    return x


def train_steps(model: torch.nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> dict:
    """The soft train step (train mode; forward and backward of the cross entropy of ``x``
    against ``y``) through recurkit ("rk") and in plain torch ("torch"), as callables, after
    checking that both give the same gradients (the same math)."""
    model.train()

    def step(fwd):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(fwd(x), y).backward()
    steps = {"rk": lambda: step(model),
             "torch": lambda: step(lambda v: plain_torch_forward(model, v))}
    grads = {}
    for name, fn in steps.items():
        fn()
        grads[name] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads["rk"], grads["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=262144)
    ap.add_argument("--soft-samples", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hard-only", action="store_true",
                    help="only the hard rows (e.g. with RECURKIT_TVM_MCPU=znver3: AVX2 code)")
    args = ap.parse_args()
    # (here, not at the top: benchmarks/logic_gpu.py imports this file where TVM may be absent)
    from recurkit.backends.tvm.packed import (choose_words, pack_bits, program_tables,
                                              run_packed_tvm)
    torch.manual_seed(0)
    N = args.samples
    x = torch.rand(N, 784) < 0.5
    print(f"machine: {machine()}")
    print(f"vector features: {' '.join(cpu_features())}")
    print(f"network: 784 -> 6 x 8000 gates -> GroupSum(10); {N} samples for the hard rows, "
          f"{args.soft_samples} for the soft rows")
    rows, nets = {}, {}
    for gates in ("all 16", "two-input"):
        m = model("two-input" if gates == "two-input" else "all").eval()
        t0 = time.perf_counter()
        hard = rk.nn.compile_hard(m)
        hard(x[:1])   # builds the TVM kernels (or loads them from the disk cache)
        build_s = time.perf_counter() - t0
        with torch.no_grad():   # exact: the eval-mode model's scores, also past a word
            xs = x[:1000]
            assert torch.equal(hard(xs), m(xs.float())), f"hard != eval model ({gates})"
        words = hard.words or choose_words(hard.program)
        xp, tabs = pack_bits(x, words), program_tables(hard.program, words)
        t = bench({"k": lambda: run_packed_tvm(hard.program, xp, words, tabs),
                   "e2e": lambda: hard(x)}, args.repeats)
        rows[f"hard kernel, {gates} gates"] = (t["k"], N)
        rows[f"hard end to end, {gates} gates"] = (t["e2e"], N)
        nets[gates] = dict(hard.stats, words=words, compile_s=build_s)
        s = hard.stats
        print(f"{gates} gates: {s['gates']} gates -> {s['ops']} ops ({s['removed']} removed: "
              f"{s['folded']} folded, {s['shared']} shared, {s['dead']} unread), "
              f"{s['levels']} levels, {s['slots']} slots, {words} words/block; optimised in "
              f"{s['optimize_s']:.2f} s, compiled and first call {build_s:.1f} s")
    if args.hard_only:
        for name, (sec, n) in rows.items():
            print(f"{name:<38} {sec * 1e3:9.2f} {n / sec:12.3e}")
        save_results("logic_cpu_hard", {"network": "784 -> 6 x 8000 gates -> GroupSum(10)",
                                        "mcpu": os.environ.get("RECURKIT_TVM_MCPU", "host"),
                                        "nets": nets,
                                        "rows": [{"path": n, "ms": sec * 1e3, "samples": k}
                                                 for n, (sec, k) in rows.items()]})
        return
    m = model("all")
    xs = x[:args.soft_samples].float()
    y = torch.randint(0, 10, (args.soft_samples,))
    m.eval()
    with torch.no_grad():
        t = bench({"rk": lambda: m(xs), "torch": lambda: plain_torch_forward(m, xs)},
                  args.repeats)
    rows["soft forward, recurkit (TVM)"] = (t["rk"], args.soft_samples)
    rows["soft forward, plain torch"] = (t["torch"], args.soft_samples)
    t = bench(train_steps(m, xs, y), args.repeats)
    rows["soft train step, recurkit (TVM)"] = (t["rk"], args.soft_samples)
    rows["soft train step, plain torch"] = (t["torch"], args.soft_samples)
    print(f"{'path':<38} {'ms':>9} {'samples/s':>12} {'vs peer':>8}")
    for name, (sec, n) in rows.items():
        peer = {"hard": rows["soft forward, plain torch"],
                "soft forward": rows["soft forward, plain torch"],
                "soft train": rows["soft train step, plain torch"]}
        base = next(v for k, v in peer.items() if name.startswith(k))
        print(f"{name:<38} {sec * 1e3:9.2f} {n / sec:12.3e} {n / sec / (base[1] / base[0]):7.1f}x")
    print("(vs peer: the plain torch soft forward for the hard rows and soft forward, the plain "
          "torch train step for the train step)")
    save_results("logic_cpu", {"network": "784 -> 6 x 8000 gates -> GroupSum(10)",
                               "nets": nets,
                               "rows": [{"path": n, "ms": sec * 1e3, "samples": k}
                                        for n, (sec, k) in rows.items()]})


if __name__ == "__main__":
    main()
