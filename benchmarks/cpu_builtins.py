"""Every built-in on this CPU: the TVM backend's compiled kernel vs the torch backend vs
flash-linear-attention's naive torch code where it exists, in one run, with GFLOP/s next to
torch's fp32 matmul GFLOP/s measured in the same run.

    pip install --no-deps fla-core einops   # FLA's naive code (optional)
    python benchmarks/cpu_builtins.py [--T 4096] [--repeats 5]

Shapes: B=1, T=4096, H=4, K=V=128 (vector-state ops: D=512), fp32, forward. "torch seq" is
the same tile program as the TVM kernel (the sequential form) run by the torch backend;
"torch ms" is the torch backend's default (chunk or scan) form. "compiled seq" is that
sequential tile program under torch.compile: the step (every state-dependent node) compiled
once by inductor and called per token from Python, as the torch backend's loop calls it
eagerly (compiling the whole 4096-step loop, or the equivalent FLA chunk code, 342 s here in
TOOLCHAIN.md, is not a reasonable time). The bar compares the TVM kernel with the faster of
the two.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from common import add_shape_args, bench, cpu_features, machine, save_results  # noqa: E402

import recurkit as rk  # noqa: E402
from recurkit.ir.bind import bind_call  # noqa: E402
from recurkit.ir.interpret import evaluate, state_step  # noqa: E402
from recurkit.ir.node import depends_on_state  # noqa: E402


def step_flops(decl, sizes) -> int:
    """Floating-point operations of one step of the state-dependent part (per head)."""
    p = decl.program
    nodes = p.nodes()
    dep = depends_on_state(nodes)
    total = 0
    for n in nodes:
        if not dep[id(n)] or n.op == "input":
            continue
        dims = set(n.dims) | set(n.attr("over") or ())
        size = 1
        for d in dims:
            size *= sizes[d]
        total += size * (2 if n.op == "contract" else 1)
    return total


def compiled_sequential(decl):
    """The sequential form with its step under torch.compile: f(*inputs) -> (o, final)."""
    p = decl.program
    free, step = state_step(p)
    out_free = not depends_on_state(p.nodes())[id(p.output)]
    torch._dynamo.reset()   # one op's step per process-wide cache: no guards of another op
    cstep = torch.compile(step, fullgraph=True, dynamic=False)

    def run(*args):
        bc = bind_call(p, args, {})
        vals = evaluate(bc, free + ([p.output] if out_free else []))
        # [T, B, H, ...] with fresh strides (.contiguous() would keep a size-1 B's stride,
        # which depends on T): a token's values have the same strides at every T, so the
        # timed call at full length reuses the step compiled on the short warm-up call
        per_t = [vals[id(a)].expand(bc.B, bc.T, *vals[id(a)].shape[2:]).transpose(0, 1)
                 .clone(memory_format=torch.contiguous_format) for a in free]
        S = torch.zeros(bc.B, bc.H, *(bc.sizes[d] for d in p.state.dims))
        outs = []
        for t in range(bc.T):
            S, o = cstep(S, *[v[t] for v in per_t])
            outs.append(o)
        return (vals[id(p.output)] if out_free else torch.stack(outs, 1)), S
    return run


def fla_naive(name):
    """FLA's naive code for ``name`` as f(*inputs) on our [B, T, H, ...] layout, or None."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if name == "gated_delta_rule":
                from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule as f
                return lambda q, k, v, g, b: f(q, k, v, g, b)
            if name == "kda":
                from fla.ops.kda.naive import naive_chunk_kda as f
                return lambda q, k, v, g, b: f(q, k, v, g, b)
            if name == "simple_gla":
                from fla.ops.simple_gla.naive import naive_chunk_simple_gla as f
                return lambda q, k, v, g: f(q, k, v, g)
            if name == "gla":
                from fla.ops.gla.naive import naive_recurrent_gla as f
                return lambda q, k, v, g: f(q, k, v, g)
        except Exception:  # noqa: BLE001 - FLA absent or changed: report without it
            return None
    return None


def inputs(name, T, H, K, V, D):
    from cases import CASES, VECTOR_CASES, matrix_inputs, vector_inputs
    if name in VECTOR_CASES:
        return vector_inputs(name, 1, T, H, D)
    x = matrix_inputs(name, 1, T, H, K, V)
    return x


def main() -> None:
    ap = argparse.ArgumentParser()
    add_shape_args(ap, repeats=5)
    args = ap.parse_args()
    T, H, K = args.T, args.H, args.D
    sizes = {"K": K, "V": K, "D": 512}
    a = torch.randn(2048, 2048)
    t0 = time.perf_counter()
    for _ in range(3):
        a @ a
    mm = 3 * 2 * 2048 ** 3 / (time.perf_counter() - t0) / 1e9
    print(f"machine: {machine()}")
    print(f"vector features: {' '.join(cpu_features())}")
    print(f"B=1 T={T} H={H} K=V={K}, vector states D=512, fp32 forward; "
          f"torch fp32 matmul: {mm:.0f} GFLOP/s\n")
    head = (f"{'op':<18}{'tvm ms':>9}{'torch seq':>11}{'compiled seq':>14}{'torch ms':>10}"
            f"{'torch form':>13}{'FLA ms':>9}{'tvm/seq':>9}{'tvm/torch':>11}{'tvm/FLA':>9}"
            f"{'tvm GFLOP/s':>13}")
    print(head)
    worst = None
    rows = []
    for name, op in rk.ops.ALL.items():
        decl = op.decl
        x = inputs(name, T, H, K, K, 512)
        tvm_op = rk.compile(decl, backend="tvm")
        tvm_op(*[t[:, :4] for t in x])                    # compile outside the timing
        torch_op = rk.compile(decl, backend="torch")
        fns = {"tvm": lambda: tvm_op(*x), "torch": lambda: torch_op(*x)}
        fla = fla_naive(name)
        if fla is not None:
            fns["fla"] = lambda: fla(*x)
        t = bench(fns, repeats=args.repeats)
        seq = rk.compile(decl, backend="torch", form="sequential")   # the same tile program
        t.update(bench({"seq": lambda: seq(*x)}, repeats=1, warmup=0))
        cseq = compiled_sequential(decl)
        cseq(*[a[:, :4] for a in x])                     # compile outside the timing
        t.update(bench({"cseq": lambda: cseq(*x)}, repeats=1, warmup=0))
        gf = step_flops(decl, sizes) * T * H / t["tvm"] / 1e9
        fla_ms = f"{t['fla'] * 1e3:9.1f}" if "fla" in t else f"{'-':>9}"
        ratio_fla = f"{t['fla'] / t['tvm']:8.2f}x" if "fla" in t else f"{'-':>9}"
        best_seq = min(t["seq"], t["cseq"])
        print(f"{name:<18}{t['tvm'] * 1e3:9.1f}{t['seq'] * 1e3:11.1f}{t['cseq'] * 1e3:14.1f}"
              f"{t['torch'] * 1e3:10.1f}{torch_op.form:>13}{fla_ms}{best_seq / t['tvm']:8.1f}x"
              f"{t['torch'] / t['tvm']:10.2f}x{ratio_fla}{gf:13.1f}")
        r = best_seq / t["tvm"]
        worst = r if worst is None else min(worst, r)
        rows.append({"op": name, "torch_form": torch_op.form, "gflops": gf,
                     "ms": {"tvm": t["tvm"] * 1e3, "torch": t["torch"] * 1e3,
                            "torch_seq": t["seq"] * 1e3, "compiled_seq": t["cseq"] * 1e3,
                            **({"fla_naive": t["fla"] * 1e3} if "fla" in t else {})}})
    verdict = "met" if worst >= 1.5 else f"MISSED by {1.5 / worst:.2f}x"
    print(f"\nbar: every built-in >= 1.5x faster in TVM than the best of torch eager and "
          f"torch.compile on the same tile program (the sequential form): worst {worst:.1f}x, "
          f"{verdict}")
    save_results("cpu_builtins", {"shape": {"B": 1, "T": T, "H": H, "K": K, "V": K, "D": 512},
                                  "dtype": "float32", "matmul_gflops": mm, "rows": rows})


if __name__ == "__main__":
    main()
