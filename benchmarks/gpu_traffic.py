"""GPU forward (or backward) traffic counted on the CPU: recurkit's Triton kernels and
flash-linear-attention's for the same op and shape, run in Triton's interpreter, with launches,
bytes read and written and tl.dot FLOPs per kernel and per token-head, and a roofline time for
H100 and H200.

    pip install --no-deps fla-core einops     # FLA's kernels, the peer (optional)
    python benchmarks/gpu_traffic.py [--ops gated_delta_rule,gla,kda] [--T 256] [--H 2] [--D 128]
                                     [--l2norm] [--backward]

--backward counts the gradients of every input (from random cotangents of the output and the
final state) after an uncounted forward: recurkit's chunk-form backward kernels (the prologue's
backward in its gradient kernel) and the host's ops, FLA's backward kernels and torch ops.

Counting: see ``recurkit.backends.triton.traffic`` (every masked-in global load and store of a
kernel at its element size, tl.dot as 2 M N K, every torch op on tensors between kernels as a
launch reading its inputs and writing its outputs). Inputs: q, k, v (and beta) in bf16,
log-gates in fp32. FLA's kernels are adapted to the interpreter without changing what they load:
its autotuners run their first config (there is no driver to time configs with) and loop
indices from ``range`` are interpreter tensors (they call ``.to()`` on them). The interpreter
computes bf16 arithmetic wrongly, so FLA's values are not checked here; its loads and stores
are what the kernels ask for. The roofline per launch is max(bytes / HBM bandwidth, FLOPs /
dense bf16 tensor rate) plus a launch cost (``traffic.DEVICES``), summed over launches.

Writes benchmarks/results/gpu_traffic[_backward][_l2norm].json.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"   # before FLA's kernels are decorated at import

import argparse  # noqa: E402
import builtins  # noqa: E402
import contextlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from common import cpu_features, machine, save_results  # noqa: E402

import recurkit as rk  # noqa: E402
from recurkit.backends import REGISTRY  # noqa: E402
from recurkit.backends.triton.traffic import DEVICES, count_traffic  # noqa: E402

# FLA's entry point per op, called with the same positional inputs as recurkit's op
FLA = {"gated_delta_rule": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
       "gla": ("fla.ops.gla", "chunk_gla"), "kda": ("fla.ops.kda", "chunk_kda")}


def inputs(name: str, B: int, T: int, H: int, K: int) -> list[torch.Tensor]:
    """q, k, v (bf16), log-gates (fp32: per head for GDN, per key channel for GLA and KDA),
    beta (bf16) where the op has one; seeded."""
    torch.manual_seed(0)
    q = torch.randn(B, T, H, K).bfloat16()
    k = F.normalize(torch.randn(B, T, H, K), dim=-1).bfloat16()
    v = torch.randn(B, T, H, K).bfloat16()
    per_channel = name in ("gla", "kda")
    g = F.logsigmoid(torch.randn(B, T, H, *((K,) if per_channel else ()))) / (
        16 if per_channel else 1)
    x = [q, k, v, g]
    if name != "gla":
        x.append(torch.rand(B, T, H).bfloat16())
    return x


@contextlib.contextmanager
def fla_in_the_interpreter():
    """FLA's autotuned kernels run their first config; ``range`` in a kernel yields
    interpreter tensors while it runs."""
    import triton.language as tl
    from triton.runtime import autotuner
    from triton.runtime import interpreter as ip

    def first_config(self, *args, **kwargs):
        cfg = self.configs[0]
        self.best_config = cfg
        kw = {**kwargs, **cfg.all_kwargs()}
        if cfg.pre_hook is not None:
            cfg.pre_hook({**dict(zip(self.arg_names, args)), **kw})
        return self.fn.run(*args, **kw)

    def as_int(x):
        return int(x.handle.data.item()) if isinstance(x, tl.tensor) else int(x)

    def tensor_range(*a, **_):
        for i in builtins.range(*map(as_int, a)):
            yield ip._implicit_cvt(i)

    real_run, real_call = autotuner.Autotuner.run, ip.GridExecutor.__call__

    def call(self, *args, **kwargs):
        g = self.fn.__globals__
        if not g.get("__name__", "").startswith("fla"):
            return real_call(self, *args, **kwargs)
        had, old = "range" in g, g.get("range")
        g["range"] = tensor_range
        try:
            return real_call(self, *args, **kwargs)
        finally:
            if had:
                g["range"] = old
            else:
                del g["range"]

    autotuner.Autotuner.run, ip.GridExecutor.__call__ = first_config, call
    try:
        yield
    finally:
        autotuner.Autotuner.run, ip.GridExecutor.__call__ = real_run, real_call


def backward_of(fn, kw: dict, T: int | None = None, positional: bool = False,
                inner: bool = False):
    """Run ``fn``'s forward on ``kw`` (``positional``: its keys are positions; ``T``: the
    first T tokens only) now, outside any count, and return the backward: a function taking
    the gradients of every floating input from seeded random cotangents of the output and
    the final state. ``inner``: ``fn`` is a compiled op whose custom op's backward is run as
    its Python implementation (``TorchOp._gradients``), not as one opaque op."""
    leaves = {k: (v[:, :T] if T else v).detach().clone().requires_grad_(v.is_floating_point())
              for k, v in kw.items()}
    if positional:
        o, S = fn(*[leaves[i] for i in sorted(leaves)])
    else:
        o, S = fn(**leaves, output_final_state=True)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=gen).to(o.dtype)
    dS = torch.randn(S.shape, generator=gen).to(S.dtype)
    if inner:
        return lambda *_: fn.torch_op._gradients(do, dS, {**leaves})
    return lambda *_: torch.autograd.grad(
        [o, S], [v for v in leaves.values() if v.requires_grad], [do, dS], allow_unused=True)


def modelled_traffic(op, kw: dict, backward: bool):
    """The op's Triton kernels' traffic for the call ``kw`` (with an initial state and a
    final state, or their cotangents) as the generator recorded it, not run: the backward's
    kernels where ``backward`` (host ops: none where the prologue's backward is in the
    kernel, which the script checks), else the forward's."""
    from recurkit.backends.triton.chunk_module import chunk_source, model_traffic
    from recurkit.backends.triton.runtime import check_config
    from recurkit.ir.bind import bind_call
    from recurkit.lowering.chunk_adjoint import lower_adjoint
    p = op.program
    q, v = kw["q"], kw["v"]
    S0 = torch.zeros(q.shape[0], q.shape[2], q.shape[-1], v.shape[-1])
    bc = bind_call(p, (), {**kw, "initial_state": S0, "output_final_state": True})
    cfg = check_config(None)
    if not backward:
        return model_traffic(op.tile_program, bc, cfg)
    tp = lower_adjoint(p, op.form, REGISTRY["triton"].default_adjoint_chunk(p, op.form))
    _, io = chunk_source(tp, bc.sizes, bc.H, cfg, dtype="bf16", has_dsf=True)
    if io.input_grads is None:
        raise SystemExit(f"{p.name}: the prologue's backward is not in the kernel; count it")
    return model_traffic(tp, bc, cfg)


def count(fn, x):
    t0 = time.perf_counter()
    with count_traffic() as t:
        fn(*x)
    return t, time.perf_counter() - t0


def report(label: str, t, th: int) -> dict:
    print(f"\n{label}")
    print(f"  {'kind':7} {'kernel or op':44} {'calls':>5} {'read B/th':>10} {'write B/th':>11} "
          f"{'dot FLOP/th':>12}")
    rows = []
    for x in t.by_name():
        print(f"  {x.kind:7} {x.name[:44]:44} {x.calls:5d} {x.read / th:10.1f} "
              f"{x.written / th:11.1f} {x.flops / th:12.0f}")
        rows.append({"kind": x.kind, "name": x.name, "calls": x.calls, "read": x.read,
                     "written": x.written, "flops": x.flops})
    total = {"launches": t.count(), "triton_launches": t.count("triton"),
             "torch_launches": t.count("torch"), "bytes_per_token_head": (t.read + t.written) / th,
             "read_per_token_head": t.read / th, "written_per_token_head": t.written / th,
             "flops_per_token_head": t.flops / th,
             **{f"roofline_us_{d}": t.roofline(d) * 1e6 for d in DEVICES}}
    print(f"  total: {total['launches']} launches ({total['triton_launches']} Triton + "
          f"{total['torch_launches']} torch), {total['bytes_per_token_head'] / 1e3:.2f} KB per "
          f"token-head ({total['read_per_token_head'] / 1e3:.2f} read, "
          f"{total['written_per_token_head'] / 1e3:.2f} written), "
          f"{total['flops_per_token_head'] / 1e3:.1f} kFLOP per token-head; roofline "
          + ", ".join(f"{d.upper()} {total[f'roofline_us_{d}']:.1f} us" for d in DEVICES))
    return {"kernels": rows, "total": total}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", default="gated_delta_rule,gla,kda")
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--T", type=int, default=256)
    ap.add_argument("--H", type=int, default=2)
    ap.add_argument("--D", type=int, default=128, help="K = V")
    ap.add_argument("--backward", action="store_true",
                    help="count the backward (the gradients of every input from random "
                         "cotangents of the output and final state) instead of the forward; "
                         "writes gpu_traffic_backward.json")
    ap.add_argument("--l2norm", action="store_true",
                    help="q and k l2-normalised inside the op (FLA's use_qk_l2norm_in_kernel; "
                         "GDN and KDA); writes gpu_traffic_l2norm.json")
    ap.add_argument("--model", default="",
                    help="ops (comma-separated) whose recurkit side is modelled from what the "
                         "generator emitted (chunk_module.model_traffic: the same loads, stores "
                         "and dots, not interpreted; for shapes whose interpretation takes too "
                         "long) instead of counted")
    args = ap.parse_args()
    B, T, H, K = args.B, args.T, args.H, args.D
    th = B * T * H
    print(f"machine: {machine()}")
    print(f"vector features: {' '.join(cpu_features())}")
    what = "backward" if args.backward else "forward"
    print(f"{what}, B={B} T={T} H={H} K=V={K}, bf16 q/k/v/beta, fp32 log-gates; counted in "
          f"Triton's interpreter (bytes and FLOPs per token-head, th = B*T*H = {th})"
          + ("; q, k l2-normalised in the op" if args.l2norm else ""))
    results = {}
    summary = []
    names = [n for n in args.ops.split(",") if not (args.l2norm and n == "gla")]
    extra = {"use_qk_l2norm_in_kernel": True} if args.l2norm else {}
    for name in names:
        x = inputs(name, B, T, H, K)
        decl = getattr(rk.ops, name).decl
        if args.l2norm:   # the built-in's variant with the norms in its prologue
            from recurkit.ops import delta
            decl = getattr(delta, f"{name}_l2_decl")
        op = rk.compile(decl, backend="triton")
        kw = dict(zip([s.name for s in op.program.call_inputs if s.role == "token"], x))
        modelled = name in args.model.split(",")
        if modelled:
            t, sec = modelled_traffic(op, kw, args.backward), 0.0
        elif args.backward:   # the custom op's backward, its implementation called directly
            backward_of(op, kw, T=8, inner=True)()   # (so that its torch ops are counted)
            t, sec = count(backward_of(op, kw, inner=True), x)
        else:
            op.forward(**{k: v[:, :8] for k, v in kw.items()})   # load the modules first
            t, sec = count(lambda *_: op.forward(**kw), x)
        chunk = op.tile_program.chunk if not args.backward else \
            REGISTRY["triton"].default_adjoint_chunk(op.program, op.form)
        res = {"recurkit": report(f"{name}: recurkit (backend='triton', form={op.form}, "
                                  f"chunk={chunk}; " + ("modelled, not counted)" if modelled
                                                        else f"{sec:.0f} s to count)"), t, th)}
        mod, fn = FLA[name]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fla = getattr(__import__(mod, fromlist=[fn]), fn)
                with fla_in_the_interpreter():
                    if args.backward:
                        ft, fsec = count(backward_of(
                            lambda *b: fla(*b, output_final_state=True, **extra),
                            dict(enumerate(x)), positional=True), x)
                    else:
                        ft, fsec = count(lambda *a: fla(*a, output_final_state=True, **extra),
                                         x)
            res["fla"] = report(f"{name}: FLA {fn} ({fsec:.0f} s to count)", ft, th)
        except Exception as e:  # noqa: BLE001 - report and go on without the peer
            print(f"\n{name}: FLA {fn} not counted: {type(e).__name__}: {str(e)[:200]}")
        results[name] = res
        summary.append((name, res))
    print(f"\n{'op':18} {'':9} {'KB/token-head':>14} {'launches':>9} {'kFLOP/th':>9} "
          + " ".join(f"{d.upper() + ' us':>9}" for d in DEVICES))
    for name, res in summary:
        for who in ("fla", "recurkit"):
            if who in res:
                tot = res[who]["total"]
                print(f"{name:18} {who:9} {tot['bytes_per_token_head'] / 1e3:14.2f} "
                      f"{tot['launches']:9d} {tot['flops_per_token_head'] / 1e3:9.1f} "
                      + " ".join(f"{tot[f'roofline_us_{d}']:9.1f}" for d in DEVICES))
        if "fla" in res:
            r, f = res["recurkit"]["total"], res["fla"]["total"]
            print(f"{'':18} {'ratio':9} {r['bytes_per_token_head'] / f['bytes_per_token_head']:13.2f}x "
                  f"{r['launches'] / f['launches']:8.2f}x")
    save_results("gpu_traffic" + ("_backward" if args.backward else "") +
                 ("_l2norm" if args.l2norm else ""), {
                                 "pass": what, "l2norm": args.l2norm, "shape": {"B": B, "T": T, "H": H, "K": K, "V": K},
                                 "dtypes": {"qkv": "bfloat16", "gates": "float32"},
                                 "devices": {d: {"bytes_per_s": bw, "flops": pk, "launch_s": ln}
                                             for d, (bw, pk, ln) in DEVICES.items()},
                                 "ops": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
