"""Every built-in on this CPU: the TVM backend's compiled kernel vs the torch backend vs
flash-linear-attention's naive torch code where it exists, in one run, with each kernel's
share of its roofline, the matmul rate and copy bandwidth measured in the same run.

    pip install --no-deps fla-core einops   # FLA's naive code (optional)
    python benchmarks/cpu_builtins.py [--T 4096] [--repeats 5] [--fast]

Shapes: B=1, T=4096, H=4, K=V=128 (vector-state ops: D=512), fp32, forward. "torch seq" is
the same tile program as the TVM kernel (the sequential form) run by the torch backend;
"torch ms" is the torch backend's default (chunk or scan) form. "compiled seq" is that
sequential tile program under torch.compile: the step (every state-dependent node) compiled
once by inductor and called per token from Python, as the torch backend's loop calls it
eagerly (compiling the whole 4096-step loop, or the equivalent FLA chunk code, 342 s here in
TOOLCHAIN.md, is not a reasonable time). ``--fast`` leaves those two out.

Roofline: max(FLOPs / torch's fp32 matmul rate, bytes / copy bandwidth), where FLOPs are the
state-dependent nodes' (the step) and bytes the inputs read and the output and states written
once; "share" is roofline time / TVM time. A call also pays the page faults of its output's
fresh memory, which the copy bandwidth (measured on warm buffers) does not: "fresh" is the
time torch takes to allocate and fill a tensor of the output's size, measured in the same run,
and "share+" the share against roofline + fresh. OMP_WAIT_POLICY is PASSIVE unless set
otherwise: torch's OpenMP threads otherwise spin after each parallel region and take the
cores from the TVM kernel that follows (TOOLCHAIN.md).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch starts its threads
import torch  # noqa: E402

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


def rates() -> tuple[float, float]:
    """(torch's fp32 matmul GFLOP/s, copy GB/s counting bytes read and written), best of 3."""
    a = torch.randn(2048, 2048)
    a @ a
    mm = max(2 * 2048 ** 3 / _time(lambda: a @ a) for _ in range(3)) / 1e9
    x = torch.randn(64 << 20)
    y = torch.empty_like(x)
    y.copy_(x)
    bw = max(2 * x.numel() * 4 / _time(lambda: y.copy_(x)) for _ in range(3)) / 1e9
    return mm, bw


def _time(f) -> float:
    time.sleep(0.02)
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def fresh_write(shape) -> float:
    """Seconds to allocate a tensor of ``shape`` and write it once (page faults included)."""
    return min(_time(lambda: torch.empty(shape).fill_(1.0)) for _ in range(3))


def main() -> None:
    ap = argparse.ArgumentParser()
    add_shape_args(ap, repeats=5)
    ap.add_argument("--fast", action="store_true",
                    help="leave out the per-token torch loops (eager and compiled)")
    args = ap.parse_args()
    T, H, K = args.T, args.H, args.D
    sizes = {"K": K, "V": K, "D": 512}
    mm, bw = rates()
    print(f"machine: {machine()}")
    print(f"vector features: {' '.join(cpu_features())}")
    print(f"B=1 T={T} H={H} K=V={K}, vector states D=512, fp32 forward; torch fp32 matmul: "
          f"{mm:.0f} GFLOP/s, copy: {bw:.0f} GB/s, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}\n")
    head = (f"{'op':<18}{'tvm ms':>8}{'roof ms':>9}{'share':>7}{'fresh':>7}{'share+':>8}"
            f"{'torch seq':>11}{'compiled':>10}{'torch ms':>10}{'torch form':>12}"
            f"{'FLA ms':>8}{'tvm/seq':>9}{'tvm/torch':>10}{'tvm/FLA':>9}")
    print(head)
    worst, worst_share = None, None
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
        if not args.fast:
            seq = rk.compile(decl, backend="torch", form="sequential")   # the same program
            t.update(bench({"seq": lambda: seq(*x)}, repeats=1, warmup=0))
            cseq = compiled_sequential(decl)
            cseq(*[a[:, :4] for a in x])                 # compile outside the timing
            t.update(bench({"cseq": lambda: cseq(*x)}, repeats=1, warmup=0))
        o, _ = tvm_op(*x)
        S = [sizes[d] for d in decl.program.state.dims]
        state_bytes = 4 * H * int(torch.tensor(S).prod())
        nbytes = sum(a.numel() * a.element_size() for a in x) + o.numel() * o.element_size() \
            + state_bytes
        flops = step_flops(decl, sizes) * T * H
        roof = max(flops / (mm * 1e9), nbytes / (bw * 1e9))
        fresh = fresh_write(o.shape)
        share, share_plus = roof / t["tvm"], (roof + fresh) / t["tvm"]
        fla_ms = f"{t['fla'] * 1e3:8.1f}" if "fla" in t else f"{'-':>8}"
        ratio_fla = f"{t['fla'] / t['tvm']:8.2f}x" if "fla" in t else f"{'-':>9}"
        seq_ms = (f"{t['seq'] * 1e3:11.1f}{t['cseq'] * 1e3:10.1f}" if "seq" in t
                  else f"{'-':>11}{'-':>10}")
        best_seq = min(t["seq"], t["cseq"]) if "seq" in t else None
        vs_seq = f"{best_seq / t['tvm']:8.1f}x" if best_seq else f"{'-':>9}"
        print(f"{name:<18}{t['tvm'] * 1e3:8.1f}{roof * 1e3:9.2f}{share:7.0%}{fresh * 1e3:7.1f}"
              f"{share_plus:8.0%}{seq_ms}{t['torch'] * 1e3:10.1f}{torch_op.form:>12}{fla_ms}"
              f"{vs_seq}{t['torch'] / t['tvm']:9.2f}x{ratio_fla}")
        if best_seq:
            worst = best_seq / t["tvm"] if worst is None else min(worst, best_seq / t["tvm"])
        worst_share = share if worst_share is None else min(worst_share, share)
        rows.append({"op": name, "torch_form": torch_op.form, "gflops": flops / t["tvm"] / 1e9,
                     "flops": flops, "bytes": nbytes, "roofline_ms": roof * 1e3,
                     "roofline_share": share, "fresh_output_ms": fresh * 1e3,
                     "roofline_share_with_fresh_output": share_plus,
                     "ms": {"tvm": t["tvm"] * 1e3, "torch": t["torch"] * 1e3,
                            **({"torch_seq": t["seq"] * 1e3, "compiled_seq": t["cseq"] * 1e3}
                               if "seq" in t else {}),
                            **({"fla_naive": t["fla"] * 1e3} if "fla" in t else {})}})
    print(f"\nroofline: worst share {worst_share:.0%} (every built-in >= 50%: "
          f"{'met' if worst_share >= 0.5 else 'MISSED'})")
    if worst is not None:
        verdict = "met" if worst >= 1.5 else f"MISSED by {1.5 / worst:.2f}x"
        print(f"bar: every built-in >= 1.5x faster in TVM than the best of torch eager and "
              f"torch.compile on the same tile program (the sequential form): worst "
              f"{worst:.1f}x, {verdict}")
    save_results("cpu_builtins", {"shape": {"B": 1, "T": T, "H": H, "K": K, "V": K, "D": 512},
                                  "dtype": "float32", "matmul_gflops": mm, "copy_gbps": bw,
                                  "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
                                  "rows": rows})


if __name__ == "__main__":
    main()
