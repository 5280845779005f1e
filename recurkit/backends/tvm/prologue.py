"""The prologue inside the sequential CPU kernel (a mixin of ``tvm.sequential._Gen``).

The step's state-free values (gates, sigmoids, normalised keys, products of token inputs) are
computed per token where the kernel uses them, from the call's tensors read in their own dtype
and head layout (grouped heads index their head group), instead of as whole-tensor torch ops
over [B, T, H, *dims] before the kernel. Each such value is either inlined into the
expressions that read it or, where that would repeat work, stored once per token in a small
buffer over its dims (a column block's share of them in the column-blocked layout):
reductions, transcendental functions (exp, sigmoid: ``fastmath``), values read more than once,
and values broadcast into a loop over more dims than their own (beta * k read per state row).

What the kernel cannot compute per token stays a torch-computed feed, as before: values of
ops without an in-kernel rule (rotations), and in the column-blocked layout values that reduce
over the blocked dim (each block sees only its own columns).
"""
from __future__ import annotations

import torch

from ...ir.bind import BoundCall, as_given
from ...ir.node import Node

REDUCTIONS = ("contract", "sum", "max")
COSTLY = ("exp", "log", "sigmoid", "tanh", "softplus", "silu", "sqrt", "rsqrt", "pow", "div")
LEAF_ROLES = ("token", "param", "scalar", "head")
_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def leaf_layout(bc: BoundCall) -> tuple:
    """(name, dtype, head group) of each tensor input as the call gives it: part of a
    kernel's key (the kernel reads them in place)."""
    out = []
    for s in bc.program.call_inputs:
        if s.role in ("token", "param"):
            x, G = as_given(bc, s.name)
            out.append((s.name, _DTYPES.get(x.dtype, "float32"), G))
    return tuple(out)


class InKernelPrologue:
    leaf_of: dict = {}    # id(input node) -> its kernel argument's index (empty: no leaves)
    pro: set = frozenset()   # ids of the state-free nodes computed in the kernel
    pro_mat: list = []    # those stored per token, in evaluation order
    fast = False          # exp / sigmoid as vector arithmetic (``fastmath``)
    in_pro = False        # while the prologue's own code is generated (names carry suffixes)

    def _plan_prologue(self, layout: dict) -> None:
        """Sort the step's state-free arguments into call tensors read in place (leaves),
        values computed per token in the kernel, and torch-computed feeds; choose which of
        the computed ones are stored. ``layout``: name -> (dtype, head group) of each tensor
        input (fp32 and ungrouped where absent)."""
        p = self.p
        L = self.cb[0] if self.cb else None
        self.layout = layout
        self.leaves: list[Node] = []
        self.scalars: list[str] = []
        self.leaf_of, self.pro, self.feeds = {}, set(), []
        seen: set[int] = set()
        order: list[Node] = []

        def visit(a: Node) -> None:
            if id(a) in seen or self.dep[id(a)] or a.op == "const":
                return
            seen.add(id(a))
            if a.op == "input":
                role = a.attr("role")
                if role not in LEAF_ROLES:
                    self.feeds.append(a)
                    return
                if role == "scalar" and a.attr("name") not in self.scalars:
                    self.scalars.append(a.attr("name"))
                self.leaf_of[id(a)] = len(self.leaves)
                self.leaves.append(a)
                return
            inner = a.op in self.UNARY or a.op in self.BINARY or a.op in REDUCTIONS or \
                a.op == "where"
            if not inner or (L is not None and L in (a.attr("over") or ())):
                self.feeds.append(a)
                return
            for x in a.args:
                visit(x)
            self.pro.add(id(a))
            order.append(a)
        for n in self.step:
            for a in n.args:
                visit(a)
        if self.out_free:
            visit(p.output)
        # stored per token: see the module docstring
        uses: dict[int, int] = {}
        wide: set[int] = set()
        for c in self.step + order + ([p.output] if self.out_free else []):
            cdims = set(c.dims) | set(c.attr("over") or ())
            for a in c.args:
                uses[id(a)] = uses.get(id(a), 0) + 1
                if set(a.dims) < cdims:
                    wide.add(id(a))
        if self.out_free:
            uses[id(p.output)] = uses.get(id(p.output), 0) + 1

        def leafy(n: Node) -> bool:
            return id(n) in self.leaf_of or n.op == "const" or id(n) not in self.pro

        self.pro_mat = [a for a in order if a.dtype == "f32" and (
            a.op in REDUCTIONS or a.op in COSTLY or uses.get(id(a), 0) > 1 or
            (id(a) in wide and not all(leafy(x) for x in a.args)))]
        for i, a in enumerate(self.pro_mat):
            self.names[id(a)] = f"P{i}"
        for i, f in enumerate(self.feeds):
            self.names[id(f)] = f"F{i}"
        for i, a in enumerate(self.leaves):
            self.names[id(a)] = f"X{i}"

    def leaf_expr(self, n: Node, env: dict[str, str]) -> str:
        """A call tensor's value at this token and head (fp32)."""
        role = n.attr("role")
        if role == "scalar":
            return f"SC[{self.scalars.index(n.attr('name'))}]"
        if role == "head":
            return 'T.Cast("float32", h)'
        spec = self.p.inputs[n.attr("index")]
        dtype, G = self.layout.get(spec.name, ("float32", 1))
        hx = "h" if G == 1 else f"(h // {G})"
        lead = f"row, {self.tvar}, {hx}" if role == "token" else hx
        idx = "".join(f", {self.gi(d, env)}" for d in spec.dims)
        load = f"{self.names[id(n)]}[{lead}{idx}]"
        return load if dtype == "float32" else f'T.Cast("float32", {load})'

    def leaf_buffers(self) -> list[str]:
        """match_buffer lines of the leaves (and of the scalars' table)."""
        H, out = self.gsizes["__H"], []
        for a in self.leaves:
            if a.attr("role") not in ("token", "param"):
                continue
            spec = self.p.inputs[a.attr("index")]
            dtype, G = self.layout.get(spec.name, ("float32", 1))
            dims = "".join(f", {self.gsizes[d]}" for d in spec.dims)
            lead = f"B, TT, {H // G}" if spec.role == "token" else f"{H // G}"
            out.append(f"    {self.names[id(a)]} = T.match_buffer(x{self.leaf_of[id(a)]}, "
                       f"({lead}{dims}), \"{dtype}\")")
        out.append(f"    SC = T.match_buffer(sc, ({max(1, len(self.scalars))},), \"float32\")")
        return out

    def leaf_params(self) -> list[str]:
        return [f"x{self.leaf_of[id(a)]}: T.handle" for a in self.leaves
                if a.attr("role") in ("token", "param")] + ["sc: T.handle"]

    def pro_code(self, tvar: str, suffix: str, ind: int) -> list[str]:
        """The stored prologue values of token ``tvar`` into their buffers (+ ``suffix``)."""
        saved, self.tvar, self.in_pro = self.tvar, tvar, True
        names = {id(a): self.names[id(a)] for a in self.pro_mat}
        for a in self.pro_mat:
            self.names[id(a)] += suffix
        try:
            lines: list[str] = []
            pairs = self.sigmoid_pairs()
            done: set[int] = set()
            for a in self.pro_mat:
                if id(a) in done:
                    continue
                if id(a) in pairs:   # sigmoid(x) and sigmoid(-x) together
                    pos, neg = pairs[id(a)]
                    done |= {id(pos), id(neg)}
                    lines += self.pair_code(pos, neg, ind)
                else:
                    lines += self.node_code(a, ind)
            return lines
        finally:
            self.names.update(names)
            self.tvar, self.in_pro = saved, False

    def sigmoid_pairs(self) -> dict[int, tuple[Node, Node]]:
        """Stored values sigmoid(x) and sigmoid(-x) of one x (a gate and its complement),
        by the id of each: made together from one exp (``fastmath.sigmoid_pair_steps``)."""
        if not self.fast:
            return {}
        sig = {id(a.args[0]): a for a in self.pro_mat if a.op == "sigmoid"}
        out = {}
        for a in self.pro_mat:
            x = a.args[0] if a.op == "sigmoid" else None
            if x is not None and x.op == "neg" and id(x.args[0]) in sig:
                pos = sig[id(x.args[0])]
                if tuple(pos.dims) == tuple(a.dims) and id(pos) not in out:
                    out[id(pos)] = out[id(a)] = (pos, a)
        return out

    def pair_code(self, pos: Node, neg: Node, ind: int) -> list[str]:
        from .fastmath import sigmoid_pair_steps
        e = self.env(pos.dims)
        bufs, steps = sigmoid_pair_steps(self.expr(pos.args[0], e), self.names[id(pos)],
                                         self.names[id(neg)], self.idx(pos.dims, e))
        return self.scratch_steps(bufs, steps, pos.dims, ind)


def leaf_args(bc: BoundCall, gen) -> list[torch.Tensor]:
    """The kernel's leaf arguments: the call's tensors as given (contiguous, in their dtype;
    grouped inputs not repeated), then the scalars' table."""
    out = []
    for a in gen.leaves:
        if a.attr("role") not in ("token", "param"):
            continue
        x, _ = as_given(bc, bc.program.inputs[a.attr("index")].name)
        if x.dtype not in _DTYPES:
            x = x.float()
        out.append(x.contiguous())
    sc = [float(bc.scalars[s]) for s in gen.scalars] or [0.0]
    out.append(torch.tensor(sc, dtype=torch.float32, device=bc.device))
    return out
