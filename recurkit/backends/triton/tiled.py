"""The tiled form as Triton kernels: forward and the three backward passes (see
``lowering.tiled``), one generated module per declaration and output size.

Programs tile (rows n, output elements m) in [BLOCK_N, BLOCK_M] blocks; a gathered row is read
with the index loaded for the block's m. The weight pass loops over all rows for its block of
m and reduces in registers; the inverse pass loops, for its block of input positions i, over
the longest entry list of the block (shorter lists masked). Runs on the GPU for CUDA tensors
and in Triton's interpreter for CPU tensors.
"""
from __future__ import annotations

import torch

from ...ir.node import Node
from ...ir.tiled import TiledCall
from ...lowering.tiled import TiledPlan
from ..shared.tiled import (RenderBase, inverse_index, is_wide, kernel_args,
                           kernel_inputs, out_size, reduced_size, declared_grads, wide_address)
from .runtime import aot_compile_kernel, load_module
from .sequential import HEADER, TRITON_BINARY, TRITON_UNARY, lit, power

BLOCK_N, BLOCK_M, BLOCK_I = 16, 64, 64


class _Render(RenderBase):
    def params(self) -> list[str]:
        return ["SC"] + [f"A_{s.name}" for s in self.specs]

    def const(self, v: float) -> str:
        return lit(v)

    def scalar_at(self, i: int) -> str:
        return f"tl.load(SC + {i})"

    def weight_at(self, buf: str) -> str:
        return f"tl.load({buf} + m, mask=mmask, other=0.0)"

    def row_at(self, buf: str, width: int, at: str) -> str:
        return f"tl.load({buf} + n * {width} + {at}, mask=mask, other=0.0)"

    def expr(self, n: Node, names: dict) -> str:
        a = [names[id(x)] if id(x) in names else self.leaf(x) for x in n.args]
        if n.op == "gather":
            src, idx = n.args
            I = self.sizes[src.dims[0]]
            return (f"tl.load(A_{src.attr('name')} + n * {I} + tl.load(A_{idx.attr('name')} + m,"
                    f" mask=mmask, other=0), mask=mask, other=0.0)")
        if n.op == "pow":
            return power(a[0], n.args[1], a[1])
        if n.op == "where":
            return f"tl.where({a[0]}, {a[1]}, {a[2]})"
        if n.op == "div":   # correctly rounded, as torch's (plain / is approximate on GPUs)
            z = "tl.full([BLOCK_N, BLOCK_M], 0.0, tl.float32)"
            return f"tl.div_rn({a[0]} + {z}, {a[1]} + {z})"
        if n.op in TRITON_UNARY:
            return TRITON_UNARY[n.op].format(*a)
        return TRITON_BINARY[n.op].format(*a)

    def fresh(self, names: dict, wide: bool) -> str:
        return f"{'w' if wide else 'v'}{len(names)}"

    def reduction(self, names, R: int, inner: list[str], value: str, pad: str):
        """A register tile summed over r."""
        acc = f"red{len(names)}"
        return ([f"{pad}{acc} = tl.full([BLOCK_N, BLOCK_M], 0.0, tl.float32)",
                 f"{pad}for r in range({R}):", *inner, f"{pad}    {acc} += {value}"], acc)

    def body(self, roots: list[Node], pad: str = "    ") -> tuple[list[str], dict[int, str]]:
        """Bind every output-level value behind ``roots``; returns the lines and every
        output-level root's expression."""
        names: dict[int, str] = {}
        lines = self.lets(roots, names, pad)
        return lines, {**names, **{id(r): self.ref(r, names) for r in roots
                                   if not is_wide(self.plan, r)}}


_TILE = ["    n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N))[:, None].to(tl.int64)",
         "    m = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M))[None, :]"]


def module_source(plan: TiledPlan, sizes: dict[str, int]) -> str:
    r = _Render(plan, sizes)
    M, P = r.M, ", ".join(r.params())
    gathered = plan.gathered_rows()
    out = [HEADER]
    # forward
    lines, names = r.body([plan.program.output])
    out += ["", "@triton.jit",
            f"def fwd(OUT, {P}, N, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):", *_TILE,
            f"    mmask = m < {M}", "    mask = (n < N) & mmask", *lines,
            f"    tl.store(OUT + n * {M} + m, {names[id(plan.program.output)]} + "
            "tl.full([BLOCK_N, BLOCK_M], 0.0, tl.float32), mask=mask)"]
    # rows pass
    roots = [*plan.row_grads.values(), *(s.cot for s in plan.scatters)]
    douts = [f"D_{x}" for x in plan.row_grads] + [f"G_{x}" for x in gathered]
    lines, names = r.body(roots)
    out += ["", "@triton.jit",
            f"def rows(DY, {P}, {', '.join(douts) or 'UNUSED'}, N, BLOCK_N: tl.constexpr, "
            "BLOCK_M: tl.constexpr):", *_TILE,
            f"    mmask = m < {M}", "    mask = (n < N) & mmask", *lines,
            "    zero = tl.full([BLOCK_N, BLOCK_M], 0.0, tl.float32)"]
    specs = {x.name: x for x in r.specs}
    for x, node in plan.row_grads.items():
        wide = plan.program.canonical(specs[x].dims)
        if wide == plan.out_dims:
            out.append(f"    tl.store(D_{x} + n * {M} + m, {names[id(node)]} + zero, mask=mask)")
            continue
        R = reduced_size(plan, sizes, wide)   # a row read inside a reduction: every r
        inner, local = r.wide_lets([node], names, "        ")
        out += [f"    for r in range({R}):", *inner,
                f"        tl.store(D_{x} + n * {M * R} + "
                f"{wide_address(plan, sizes, wide, 'm', 'r')}, {r.ref(node, local)} + zero, "
                "mask=mask)"]
    for row, sc in gathered.items():
        for k, s in enumerate(sc):
            out.append(f"    tl.store(G_{row} + n * {len(sc) * M} + {k * M} + m, "
                       f"{names[id(s.cot)]} + zero, mask=mask)")
    # columns pass
    wnames = list(plan.weight_grads)
    lines, names = r.body(list(plan.weight_grads.values()), pad="        ")
    out += ["", "@triton.jit",
            f"def columns(DY, {P}, {', '.join('D_' + w for w in wnames) or 'UNUSED'}, N, "
            "BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):",
            "    m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M))[None, :]",
            f"    mmask = m < {M}"]
    out += [f"    acc{j} = tl.full([BLOCK_M], 0.0, tl.float32)" for j in range(len(wnames))]
    out += ["    for n0 in range(0, N, BLOCK_N):",
            "        n = (n0 + tl.arange(0, BLOCK_N))[:, None].to(tl.int64)",
            "        mask = (n < N) & mmask", *lines]
    for j, w in enumerate(wnames):
        out.append(f"        acc{j} += tl.reduce(tl.where(mask, {names[id(plan.weight_grads[w])]}, "
                   "0.0), 0, _add)")
    for j, w in enumerate(wnames):
        out.append(f"    tl.store(D_{w} + m, acc{j}[None, :], mask=mmask)")
    # inverse-index pass
    out += ["", "@triton.jit",
            "def inverse(G, OFF, ENT, DX, N, W, I, BLOCK_N: tl.constexpr, "
            "BLOCK_I: tl.constexpr):",
            "    n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N))[:, None].to(tl.int64)",
            "    i = (tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I))[None, :]",
            "    imask = i < I",
            "    lo = tl.load(OFF + i, mask=imask, other=0)",
            "    cnt = tl.load(OFF + i + 1, mask=imask, other=0) - lo",
            "    longest = tl.reduce(tl.reduce(cnt, 1, _max), 0, _max)",
            "    acc = tl.full([BLOCK_N, BLOCK_I], 0.0, tl.float32)",
            "    for e in range(0, longest):",
            "        ok = imask & (e < cnt)",
            "        ent = tl.load(ENT + lo + e, mask=ok, other=0)",
            "        acc += tl.load(G + n * W + ent, mask=ok & (n < N), other=0.0)",
            "    tl.store(DX + n * I + i, acc, mask=(n < N) & imask)"]
    return "\n".join(out) + "\n"


def _module(plan: TiledPlan, tc: TiledCall):
    return load_module(module_source(plan, tc.sizes), tc.device.type != "cuda")


def _run(mod, interpret: bool, name: str, grid, *args) -> None:
    import triton

    def call():
        getattr(mod, name)[grid](*args)
    if interpret:
        with triton.knobs.runtime.scope():
            triton.knobs.runtime.interpret = True
            call()
    else:
        call()


def run_tiled_triton(plan: TiledPlan, tc: TiledCall) -> torch.Tensor:
    M, N = out_size(plan, tc.sizes), tc.N
    mod, interp = _module(plan, tc), tc.device.type != "cuda"
    out = torch.empty(N, M, device=tc.device)
    grid = (-(-N // BLOCK_N), -(-M // BLOCK_M))
    _run(mod, interp, "fwd", grid, out, *kernel_args(plan, tc), N, BLOCK_N, BLOCK_M)
    return out.reshape(tc.out_shape).to(tc.out_dtype)


def tiled_grads_triton(plan: TiledPlan, tc: TiledCall, dy: torch.Tensor
                       ) -> dict[str, torch.Tensor]:
    M, N, dev = out_size(plan, tc.sizes), tc.N, tc.device
    mod, interp = _module(plan, tc), dev.type != "cuda"
    args = kernel_args(plan, tc)
    d = dy.float().reshape(N, M).contiguous()
    dummy = torch.empty(1, device=dev)
    grads: dict[str, torch.Tensor] = {}
    gathered = plan.gathered_rows()
    grid = (-(-N // BLOCK_N), -(-M // BLOCK_M))
    if plan.row_grads or gathered:
        drow = {x: torch.empty(N, tc.tensors[x][0].numel(), device=dev)
                for x in plan.row_grads}
        G = {row: torch.empty(N, len(sc) * M, device=dev) for row, sc in gathered.items()}
        outs = [*drow.values(), *G.values()] or [dummy]
        _run(mod, interp, "rows", grid, d, *args, *outs, N, BLOCK_N, BLOCK_M)
        grads.update(drow)
        for row, sc in gathered.items():
            off, ent = inverse_index(plan, tc, row, M)
            I = tc.tensors[row].shape[-1]
            dx = torch.empty(N, I, device=dev)
            _run(mod, interp, "inverse", (-(-N // BLOCK_N), -(-I // BLOCK_I)), G[row], off, ent,
                 dx, N, len(sc) * M, I, BLOCK_N, BLOCK_I)
            grads[row] = dx if row not in grads else grads[row] + dx
    if plan.weight_grads:
        dw = {x: torch.empty(M, device=dev) for x in plan.weight_grads}
        _run(mod, interp, "columns", (-(-M // BLOCK_M),), d, *args, *dw.values(), N,
             BLOCK_N, BLOCK_M)
        grads.update(dw)
    return declared_grads(plan, tc, grads)


def aot_report(plan: TiledPlan, sizes: dict[str, int], arch: str = "sm_90") -> list[dict]:
    """Compile the four kernels for ``arch`` with no GPU (registers, spills, shared memory)."""
    mod = load_module(module_source(plan, sizes), interpret=False)
    index = {f"A_{s.name}" for s in kernel_inputs(plan) if s.role == "index"}
    out = []
    for name, blocks in (("fwd", ("BLOCK_N", "BLOCK_M")), ("rows", ("BLOCK_N", "BLOCK_M")),
                         ("columns", ("BLOCK_N", "BLOCK_M")), ("inverse", ("BLOCK_N", "BLOCK_I"))):
        fn = getattr(mod, name)
        sig = {a: ("constexpr" if a in blocks else "i32" if a in ("N", "W", "I") else
                   "*i32" if a in index or a in ("OFF", "ENT") else "*fp32")
               for a in fn.arg_names}
        consts = {"BLOCK_N": BLOCK_N, "BLOCK_M": BLOCK_M, "BLOCK_I": BLOCK_I}
        out.append(aot_compile_kernel(fn, sig, {b: consts[b] for b in blocks}, arch))
    return out
