"""The tiled form as compiled TVM CPU kernels: the forward and the three backward passes.

Kernels are TVMScript specialised to the output and gathered-row sizes, with the number of rows
N left symbolic (one compiled kernel serves every batch size). Each value of the expression DAG
is bound once (a let per node) inside the loop over output elements:

  forward   parallel over rows n, loop over m:        out[n, m] = f(inputs at (n, m))
  rows      parallel over rows n, loop over m:        drow[n, m], G_r[n, s * M + m]
  columns   parallel over m, loop over rows n:        dw[m] = sum_n (cotangent of w)(n, m)
  inverse   parallel over rows n, loop over inputs i: dx_r[n, i] = sum of G_r[n, e] over the
                                                      entries e of i (host-built CSR index)
"""
from __future__ import annotations

from typing import Callable

import torch

from ...ir.node import Node
from ...ir.tiled import TiledCall
from ...lowering.tiled import TiledPlan
from ..shared.tiled import (RenderBase, declared_grads, inverse_index, kernel_args, out_size,
                           reduced_size, wide_address)
from .sequential import _Gen
from .build import _LOCK, compile_source

_KERNELS: dict[tuple, Callable] = {}


class _Render(RenderBase):
    """TVMScript expressions of a plan's nodes at (row n, output element m)."""

    def __init__(self, plan: TiledPlan, sizes: dict[str, int]):
        super().__init__(plan, sizes)
        self.names: dict[int, str] = {}
        self.count = 0   # values bound so far
        self.reds = 0    # reductions so far

    def buf(self, spec) -> str:
        return f"A_{spec.name}"

    def row_width(self, spec) -> int:
        """Elements per sample of a row: M (direct), I (gathered) or M * R (in a reduction)."""
        if spec.name in self.plan.gathered_rows():
            return self.sizes[spec.dims[0]]
        return self.M * reduced_size(self.plan, self.sizes, spec.dims)

    def header(self, extra_in: list[str], outs: list[tuple[str, str, str]]) -> list[str]:
        """The prim_func head: handles, the symbolic N, every buffer."""
        handles = [f"h_{x}" for x in extra_in] + ["h_sc"] + [f"h_{s.name}" for s in self.specs] \
            + [f"h_{o[0]}" for o in outs]
        lines = ["@T.prim_func", f"def main({', '.join(h + ': T.handle' for h in handles)}):",
                 '    T.func_attr({"global_symbol": "main", "tir.noalias": True})',
                 "    N = T.int32()"]
        M = self.M
        for x in extra_in:
            lines.append(f"    {x} = T.match_buffer(h_{x}, (N, {M}), \"float32\")")
        lines.append(f"    SC = T.match_buffer(h_sc, ({max(1, len(self.scalars))},), "
                     "\"float32\")")
        for s in self.specs:
            if s.role == "row":
                shape = f"(N, {self.row_width(s)})"
                lines.append(f"    {self.buf(s)} = T.match_buffer(h_{s.name}, {shape}, "
                             "\"float32\")")
            else:
                dt = "int32" if s.role == "index" else "float32"
                lines.append(f"    {self.buf(s)} = T.match_buffer(h_{s.name}, ({M},), "
                             f"\"{dt}\")")
        for name, shape, dt in outs:
            lines.append(f"    {name} = T.match_buffer(h_{name}, {shape}, \"{dt}\")")
        return lines

    def const(self, v: float) -> str:
        return f"T.float32({v!r})"

    def scalar_at(self, i: int) -> str:
        return f"SC[{i}]"

    def weight_at(self, buf: str) -> str:
        return f"{buf}[m]"

    def row_at(self, buf: str, width: int, at: str) -> str:
        return f"{buf}[n, {at}]"

    def expr(self, n: Node, names) -> str:
        ref = lambda a: self.ref(a, names)  # noqa: E731
        if n.op == "gather":
            src, idx = n.args
            return f"A_{src.attr('name')}[n, A_{idx.attr('name')}[m]]"
        if n.op == "where":
            return "T.Select({}, {}, {})".format(*(ref(a) for a in n.args))
        if n.op in _Gen.UNARY:
            return _Gen.UNARY[n.op].format(ref(n.args[0]))
        return _Gen.BINARY[n.op].format(*(ref(a) for a in n.args))

    def fresh(self, names: dict, wide: bool) -> str:
        self.count += 1
        return f"v{self.count}"

    def reduction(self, names, R: int, inner: list[str], value: str, pad: str):
        """An accumulator slot in the RED buffer (see ``with_reds``) summed over r."""
        j = self.reds
        self.reds += 1
        return ([f"{pad}RED[{j}] = T.float32(0)", f"{pad}for r in T.serial({R}):", *inner,
                 f"{pad}    RED[{j}] = RED[{j}] + {value}"], f"RED[{j}]")

    def with_reds(self, lines: list[str], at: int, pad: str) -> list[str]:
        """Insert the reductions' accumulator buffer at line ``at``."""
        if not self.reds:
            return lines
        return lines[:at] + [f"{pad}RED = T.alloc_buffer(({self.reds},), \"float32\")"] + \
            lines[at:]


def forward_source(plan: TiledPlan, sizes: dict[str, int]) -> str:
    r = _Render(plan, sizes)
    lines = r.header([], [("OUT", f"(N, {r.M})", "float32")])
    lines += ["    for n in T.parallel(N):", f"        for m in T.serial({r.M}):"]
    at = len(lines) - 1
    lines += r.lets([plan.program.output], r.names, " " * 12)
    lines.append(f"            OUT[n, m] = {r.ref(plan.program.output, r.names)}")
    return "\n".join(r.with_reds(lines, at, " " * 8)) + "\n"


def rows_source(plan: TiledPlan, sizes: dict[str, int]) -> str:
    """Per (n, m): the directly read rows' gradients and each gathered row's G buffer."""
    r = _Render(plan, sizes)
    gathered = plan.gathered_rows()
    specs = {x.name: x for x in r.specs}
    outs = [(f"D_{name}", f"(N, {r.row_width(specs[name])})", "float32")
            for name in plan.row_grads]
    outs += [(f"G_{row}", f"(N, {len(sc) * r.M})", "float32") for row, sc in gathered.items()]
    lines = r.header(["DY"], outs)
    lines += ["    for n in T.parallel(N):", f"        for m in T.serial({r.M}):"]
    at = len(lines) - 1
    pad = " " * 12
    roots = [*plan.row_grads.values(), *(s.cot for s in plan.scatters)]
    lines += r.lets(roots, r.names, pad)
    for name, node in plan.row_grads.items():
        wide = plan.program.canonical(specs[name].dims)
        if wide != plan.out_dims:   # a row read inside a reduction: its gradient at every r
            body, names = r.wide_lets([node], r.names, pad + "    ")
            lines += [f"{pad}for r in T.serial({reduced_size(plan, sizes, wide)}):", *body,
                      f"{pad}    D_{name}[n, {wide_address(plan, sizes, wide, 'm', 'r')}]"
                      f" = {r.ref(node, names)}"]
        else:
            lines.append(f"{pad}D_{name}[n, m] = {r.ref(node, r.names)}")
    for row, sc in gathered.items():
        for k, s in enumerate(sc):
            lines.append(f"{pad}G_{row}[n, {k * r.M} + m] = {r.ref(s.cot, r.names)}")
    return "\n".join(r.with_reds(lines, at, " " * 8)) + "\n"


def columns_source(plan: TiledPlan, sizes: dict[str, int]) -> str:
    """Per m: every weight's gradient, summed over the rows in one pass."""
    r = _Render(plan, sizes)
    outs = [(f"D_{name}", f"({r.M},)", "float32") for name in plan.weight_grads]
    lines = r.header(["DY"], outs)
    lines.append(f"    for m in T.parallel({r.M}):")
    at = len(lines)
    for name in plan.weight_grads:
        lines.append(f"        D_{name}[m] = T.float32(0)")
    lines.append("        for n in T.serial(N):")
    lines += r.lets(list(plan.weight_grads.values()), r.names, " " * 12)
    for name, node in plan.weight_grads.items():
        lines.append(f"            D_{name}[m] = D_{name}[m] + {r.ref(node, r.names)}")
    return "\n".join(r.with_reds(lines, at, " " * 8)) + "\n"


INVERSE_SOURCE = '''@T.prim_func
def main(h_g: T.handle, h_off: T.handle, h_ent: T.handle, h_dx: T.handle):
    T.func_attr({"global_symbol": "main", "tir.noalias": True})
    N = T.int32()
    W = T.int32()
    I = T.int32()
    E = T.int32()
    G = T.match_buffer(h_g, (N, W), "float32")
    OFF = T.match_buffer(h_off, (I + 1,), "int32")
    ENT = T.match_buffer(h_ent, (E,), "int32")
    DX = T.match_buffer(h_dx, (N, I), "float32")
    for n in T.parallel(N):
        for i in T.serial(I):
            DX[n, i] = T.float32(0)
            for e in T.serial(OFF[i + 1] - OFF[i]):
                DX[n, i] = DX[n, i] + G[n, ENT[OFF[i] + e]]
'''


def _kernel(kind: str, plan: TiledPlan, sizes: dict[str, int]) -> Callable:
    key = (kind, plan.program.content_hash(), tuple(sorted(sizes.items())),
           torch.get_num_threads())
    with _LOCK:
        hit = _KERNELS.get(key)
    if hit is None:
        src = {"forward": forward_source, "rows": rows_source,
               "columns": columns_source}[kind](plan, sizes) if kind != "inverse" \
            else INVERSE_SOURCE
        hit = compile_source(src)
        with _LOCK:
            _KERNELS[key] = hit
    return hit


def run_tiled_tvm(plan: TiledPlan, tc: TiledCall) -> torch.Tensor:
    M = out_size(plan, tc.sizes)
    out = torch.empty(tc.N, M)
    _kernel("forward", plan, tc.sizes)(*kernel_args(plan, tc), out)
    return out.reshape(tc.out_shape).to(tc.out_dtype)


def tiled_grads_tvm(plan: TiledPlan, tc: TiledCall, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    M, N = out_size(plan, tc.sizes), tc.N
    args = kernel_args(plan, tc)
    d = dy.float().reshape(N, M).contiguous()
    grads: dict[str, torch.Tensor] = {}
    gathered = plan.gathered_rows()
    if plan.row_grads or gathered:
        drow = {name: torch.empty(N, tc.tensors[name][0].numel()) for name in plan.row_grads}
        G = {row: torch.empty(N, len(sc) * M) for row, sc in gathered.items()}
        _kernel("rows", plan, tc.sizes)(d, *args, *drow.values(), *G.values())
        grads.update(drow)
        inv = _kernel("inverse", plan, tc.sizes)
        for row in gathered:
            off, ent = inverse_index(plan, tc, row, M)
            dx = torch.empty(N, tc.tensors[row].shape[-1])
            inv(G[row], off, ent, dx)
            grads[row] = dx if row not in grads else grads[row] + dx
    if plan.weight_grads:
        dw = {name: torch.empty(M) for name in plan.weight_grads}
        _kernel("columns", plan, tc.sizes)(d, *args, *dw.values())
        grads.update(dw)
    return declared_grads(plan, tc, grads)
