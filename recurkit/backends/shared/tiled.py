"""What every backend needs to render a tiled plan: the inputs in kernel order, the order in
which to bind the values of some roots, and the host-side inverse (CSR) index of a gather."""
from __future__ import annotations

import torch

from ...ir.interpret import _to_canonical
from ...ir.node import Node, toposort
from ...lowering.tiled import TiledPlan


class RenderBase:
    """What a backend's renderer of a tiled plan shares: the output size M (its dims
    flattened), the tensor inputs in kernel order, the scalars' names, and the binding of
    values (one per node, a loop per reduction) and of leaves. A backend supplies the syntax:
    ``const``, ``scalar_at``, ``weight_at``, ``row_at``, ``expr``, ``reduction``, ``fresh``."""

    def __init__(self, plan: TiledPlan, sizes: dict[str, int]):
        self.plan, self.sizes = plan, sizes
        self.M = out_size(plan, sizes)
        self.specs = kernel_inputs(plan)
        self.scalars = scalar_names(plan)

    def leaf(self, n: Node) -> str:
        """An input or constant at (n, m), or at reduced position r inside a reduction."""
        if n.op == "const":
            return self.const(float(n.attr("value")))
        if n is self.plan.dy:
            return self.row_at("DY", self.M, "m")
        role, name = n.attr("role"), n.attr("name")
        if role == "scalar":
            return self.scalar_at(self.scalars.index(name))
        if role == "weight":
            return self.weight_at(f"A_{name}")
        if is_wide(self.plan, n):   # a row inside a reduction, at position r
            width = self.M * reduced_size(self.plan, self.sizes, n.dims)
            return self.row_at(f"A_{name}", width,
                               wide_address(self.plan, self.sizes, n.dims, "m", "r"))
        return self.row_at(f"A_{name}", self.M, "m")   # a row read directly

    def ref(self, n: Node, names: dict) -> str:
        return names[id(n)] if id(n) in names else self.leaf(n)

    def lets(self, roots: list[Node], names: dict, pad: str) -> list[str]:
        """Bind (into ``names``) every output-level value behind ``roots``; a reduction
        becomes a loop over its reduced positions."""
        lines: list[str] = []
        for n in bindings(roots):
            if id(n) in names or is_wide(self.plan, n):
                continue
            if n.op == "sum":
                R = reduced_size(self.plan, self.sizes, n.args[0].dims)
                inner, local = self.wide_lets([n.args[0]], names, pad + "    ")
                loop, e = self.reduction(names, R, inner, self.ref(n.args[0], local), pad)
                lines += loop
            else:
                e = self.expr(n, names)
            names[id(n)] = self.fresh(names, wide=False)
            lines.append(f"{pad}{names[id(n)]} = {e}")
        return lines

    def wide_lets(self, roots: list[Node], names: dict, pad: str) -> tuple[list[str], dict]:
        """Bind the values inside a reduction (at position r), in a scope of their own."""
        local = dict(names)
        lines = []
        for n in bindings(roots):
            if id(n) in local:
                continue
            e = self.expr(n, local)
            local[id(n)] = self.fresh(local, wide=True)
            lines.append(f"{pad}{local[id(n)]} = {e}")
        return lines, local


def out_size(plan: TiledPlan, sizes: dict[str, int]) -> int:
    M = 1
    for d in plan.out_dims:
        M *= sizes[d]
    return M


def kernel_args(plan: TiledPlan, tc) -> list[torch.Tensor]:
    """The scalars (one fp32 buffer) and the tensor inputs as kernels read them."""
    sc = [tc.scalars[n] for n in scalar_names(plan)] or [0.0]
    out = [torch.tensor(sc, dtype=torch.float32, device=tc.device)]
    for s in kernel_inputs(plan):
        x = canonical_flat(plan, tc, s)
        out.append(x.to(torch.int32 if s.role == "index" else torch.float32).contiguous())
    return out


def kernel_inputs(plan: TiledPlan) -> list:
    """The declaration's tensor inputs (rows, weights, indices) in declaration order."""
    return [s for s in plan.program.call_inputs if s.role != "scalar"]


def scalar_names(plan: TiledPlan) -> list[str]:
    return [s.name for s in plan.program.call_inputs if s.role == "scalar"]


def bindings(roots: list[Node]) -> list[Node]:
    """The computed nodes behind ``roots``, each after its arguments (a value per node)."""
    return [n for n in toposort(roots) if n.op not in ("input", "const")]


def is_wide(plan: TiledPlan, n: Node) -> bool:
    """Whether a value lives inside a reduction (it carries a dim the output lacks)."""
    return n.op != "gather" and n.dtype == "f32" and any(d not in plan.out_dims
                                                         for d in n.dims)


def reduced_size(plan: TiledPlan, sizes: dict[str, int], dims) -> int:
    """The number of positions r of the dims in ``dims`` that the output lacks."""
    R = 1
    for d in dims:
        if d not in plan.out_dims:
            R *= sizes[d]
    return R


def wide_address(plan: TiledPlan, sizes: dict[str, int], dims, m: str, r: str) -> str:
    """The flat position, in canonical order of ``dims`` (the output's plus reduced ones), of
    output element ``m`` and reduced position ``r`` (both flattened in canonical order)."""
    out = list(plan.out_dims)
    red = [d for d in dims if d not in out]
    R = reduced_size(plan, sizes, dims)
    if list(dims) == out + red:
        return f"{m} * {R} + {r}" if out else r

    def strides(ds):
        st, acc = {}, 1
        for d in reversed(ds):
            st[d], acc = acc, acc * sizes[d]
        return st
    so, sr, sw = strides(out), strides(red), strides(list(dims))
    terms = []
    for d in dims:
        v, st = (m, so[d]) if d in out else (r, sr[d])
        terms.append(f"(({v} // {st}) % {sizes[d]}) * {sw[d]}")
    return "(" + " + ".join(terms) + ")"


def canonical_flat(plan: TiledPlan, tc, spec) -> torch.Tensor:
    """A tensor input as kernels read it: dims in canonical order, the output's dims (or a
    gathered row's one dim) flattened: rows [N, M | I], weights and indices [M]."""
    lead = 1 if spec.role == "row" else 0
    x = _to_canonical(tc.tensors[spec.name], spec.dims, plan.program.canonical(spec.dims), lead)
    return x.reshape(tc.N, -1) if lead else x.reshape(-1)


def to_declared(plan: TiledPlan, tc, spec, g: torch.Tensor) -> torch.Tensor:
    """A gradient computed in canonical order (any flattening) back in ``spec``'s layout and
    the input's dtype."""
    x = tc.tensors[spec.name]
    lead = 1 if spec.role == "row" else 0
    canon = plan.program.canonical(spec.dims)
    shape = list(x.shape[:lead]) + [x.shape[lead + spec.dims.index(d)] for d in canon]
    g = g.reshape(shape)
    if canon != spec.dims:
        g = g.permute(*range(lead), *(lead + canon.index(d) for d in spec.dims))
    return g.to(x.dtype).contiguous()


def declared_grads(plan: TiledPlan, tc, grads: dict[str, torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    """Every row and weight input's gradient in its layout and dtype (zeros where ``grads``,
    computed in canonical order, has none)."""
    out = {}
    for s in plan.program.call_inputs:
        if s.role in ("row", "weight"):
            g = grads.get(s.name)
            out[s.name] = (torch.zeros_like(tc.tensors[s.name]) if g is None else
                           to_declared(plan, tc, s, g))
    return out


def inverse_index(plan: TiledPlan, tc, row: str, M: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For row ``row`` read through gathers s = 0.. (in plan order among its scatters):
    ``offsets`` [I + 1] and ``entries`` [E] (int32) such that the entries of input position i,
    ``entries[offsets[i]:offsets[i+1]]``, are the flat positions s * M + m whose index is i.
    ``M`` is the number of output elements. (Gradients gather through it: no atomics.)"""
    scat = plan.gathered_rows()[row]
    I = tc.tensors[row].shape[-1]
    flat = torch.cat([flat_index(plan, tc, s.index) for s in scat])
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=I)
    offsets = torch.zeros(I + 1, dtype=torch.int64, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return offsets.to(torch.int32), order.to(torch.int32)


def flat_index(plan: TiledPlan, tc, name: str) -> torch.Tensor:
    """Index input ``name`` flattened in canonical order (int64)."""
    spec = next(s for s in plan.program.inputs if s.name == name)
    return canonical_flat(plan, tc, spec).long()
