"""The reference interpreter: the semantic definition every other path is tested against.

It evaluates the step token by token in fp32 torch. Nodes that do not depend on the state are
evaluated once for all tokens (the same values, computed together); only the state-dependent
part loops over time. Autograd flows through it.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .bind import BoundCall, bind_call
from .node import Node, depends_on_state, toposort
from .program import Program

UNARY_TORCH: dict[str, Callable] = {
    "neg": torch.neg, "exp": torch.exp, "log": torch.log, "sigmoid": torch.sigmoid,
    "softplus": F.softplus, "silu": F.silu, "tanh": torch.tanh, "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt, "abs": torch.abs, "relu": torch.relu,
}
BINARY_TORCH: dict[str, Callable] = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "pow": torch.pow,
    "maximum": torch.maximum, "minimum": torch.minimum, "lt": torch.lt, "le": torch.le,
    "gt": torch.gt, "ge": torch.ge, "eq": torch.eq, "ne": torch.ne,
}


def align(v: torch.Tensor, have: tuple[str, ...], want: tuple[str, ...], nb: int) -> torch.Tensor:
    """View ``v`` (``nb`` batch axes, then ``have`` dims) with size-1 axes for dims it lacks.

    Both dim tuples are in the program's canonical order, so no transpose is ever needed.
    """
    if have == want:
        return v
    shape = list(v.shape[:nb]) + [v.shape[nb + have.index(d)] if d in have else 1 for d in want]
    return v.reshape(shape)


def apply_node(n: Node, vals: list[torch.Tensor], nb: int) -> torch.Tensor:
    """Evaluate one non-input node on values with ``nb`` leading batch axes."""
    if n.op in UNARY_TORCH:
        return UNARY_TORCH[n.op](vals[0])
    if n.op in BINARY_TORCH or n.op == "where":
        xs = [align(v, a.dims, n.dims, nb) for v, a in zip(vals, n.args)]
        if n.op == "where":
            return torch.where(*xs)
        return BINARY_TORCH[n.op](*xs)
    if n.op == "contract":
        (a, b), (va, vb) = n.args, vals
        letters = {d: chr(ord("a") + i) for i, d in enumerate(dict.fromkeys(a.dims + b.dims))}
        spec = "...{},...{}->...{}".format(*("".join(letters[d] for d in x)
                                             for x in (a.dims, b.dims, n.dims)))
        return torch.einsum(spec, va, vb)
    if n.op in ("sum", "max"):
        (a,) = n.args
        axes = tuple(nb + a.dims.index(d) for d in n.attr("over"))
        return vals[0].sum(axes) if n.op == "sum" else vals[0].amax(axes)
    if n.op == "rotate":
        (x, a) = n.args
        return rotate_pairs(vals[0], x.dims, vals[1], a.dims, n.attr("dim"), n.attr("pair"),
                            n.attr("layout"), nb)
    if n.op == "pairs":
        return spread_pairs(vals[0], n.args[0].dims, n.dims, n.attr("pair"), n.attr("dim"),
                            n.attr("layout"), nb)
    raise NotImplementedError(f"reference interpreter has no rule for op '{n.op}'")


def _split_pairs(x: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The two members of each pair along x's last axis."""
    if layout == "interleaved":
        return x[..., 0::2], x[..., 1::2]
    h = x.shape[-1] // 2
    return x[..., :h], x[..., h:]


def _join_pairs(a: torch.Tensor, b: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "interleaved":
        return torch.stack([a, b], -1).flatten(-2)
    return torch.cat([a, b], -1)


def _lay_out(v: torch.Tensor, have: tuple[str, ...], want: tuple[str, ...], nb: int
             ) -> torch.Tensor:
    """``v`` (``nb`` batch axes, then ``have``) on the axes ``want`` (any order; size 1 where
    it lacks the dim; ``have`` within ``want``)."""
    perm = list(range(nb)) + [nb + have.index(d) for d in want if d in have]
    v = v.permute(perm)
    return v.reshape(*v.shape[:nb], *[v.shape[nb + [d for d in want if d in have].index(d)]
                                      if d in have else 1 for d in want])


def rotate_pairs(x: torch.Tensor, dims: tuple[str, ...], angle: torch.Tensor,
                 angle_dims: tuple[str, ...], dim: str, pair: str | None, layout: str,
                 nb: int) -> torch.Tensor:
    """``rk.rotate``: x (``nb`` batch axes, then ``dims``) with its pairs along ``dim``
    rotated by ``angle`` (batch axes, then ``angle_dims``: x's and at most ``pair``). Computed
    in the angle's dtype."""
    return turn_pairs(x, dims, torch.cos(angle), torch.sin(angle), angle_dims, dim, pair,
                      layout, nb)


def turn_pairs(x: torch.Tensor, dims: tuple[str, ...], c: torch.Tensor, s: torch.Tensor,
               cs_dims: tuple[str, ...], dim: str, pair: str | None, layout: str,
               nb: int) -> torch.Tensor:
    """``rotate_pairs`` by the angle whose cosine and sine are ``c`` and ``s``."""
    k = dims.index(dim)
    xm = x.movedim(nb + k, -1)
    want = tuple(d for d in dims if d != dim) + (pair or "_one",)
    c, s = _lay_out(c, cs_dims, want, nb), _lay_out(s, cs_dims, want, nb)
    a, b = _split_pairs(xm.to(c.dtype), layout)
    return _join_pairs(c * a - s * b, s * a + c * b, layout).movedim(-1, nb + k)


def spread_pairs(x: torch.Tensor, have: tuple[str, ...], want: tuple[str, ...], pair: str,
                 dim: str, layout: str, nb: int) -> torch.Tensor:
    """``rk.pairs``: x's entries along ``pair`` given to both dims of each pair along
    ``dim``; the result laid out ``want``."""
    xm = x.movedim(nb + have.index(pair), -1)
    y = xm.repeat_interleave(2, -1) if layout == "interleaved" else torch.cat([xm, xm], -1)
    order = tuple(d for d in have if d != pair) + (dim,)
    return y.permute(*range(nb), *[nb + order.index(d) for d in want])


def _to_canonical(x: torch.Tensor, declared: tuple[str, ...], canon: tuple[str, ...],
                  nb: int) -> torch.Tensor:
    if declared == canon:
        return x
    perm = list(range(nb)) + [nb + declared.index(d) for d in canon]
    return x.permute(perm)


def evaluate(bc: BoundCall, roots: list[Node], given: dict[int, torch.Tensor] | None = None,
             memo: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
    """Values of ``roots`` for all tokens at once: [B|1, T|1, H|1, *dims] in fp32.

    ``given`` supplies values for nodes (e.g. a state materialised per token); every other
    node must be state-free.
    """
    p = bc.program
    vals: dict[int, torch.Tensor] = {} if memo is None else memo
    vals.update(given or {})
    for n in toposort(roots, stop=set(vals)):
        if id(n) in vals:
            continue
        if n.op == "input":
            role = n.attr("role")
            if role == "head":
                v = torch.arange(bc.H, dtype=torch.float32, device=bc.device).reshape(1, 1, -1)
            elif role == "scalar":
                v = torch.tensor(bc.scalars[n.attr("name")], device=bc.device).reshape(1, 1, 1)
            elif role == "state":
                raise ValueError("evaluate: the state is not state-free")
            else:
                spec = p.inputs[n.attr("index")]
                x = bc.tensors[spec.name].float()
                if role == "param":
                    x = x.reshape(1, 1, *x.shape)
                v = _to_canonical(x, spec.dims, n.dims, 3)
        elif n.op == "const":
            v = torch.tensor(float(n.attr("value")), device=bc.device).reshape(1, 1, 1)
        else:
            v = apply_node(n, [vals[id(a)] for a in n.args], 3)
        vals[id(n)] = v
    return vals


def state_step(p: Program) -> tuple[list[Node], Callable]:
    """(free, step) for a stateful program: the state-free nodes that its state-dependent
    nodes read, and ``step(S, *values of free at one token) -> (S', output)`` evaluating the
    state-dependent nodes ([rows, H, *dims] values; output None when it is state-free)."""
    nodes = p.nodes()
    dep = depends_on_state(nodes)
    step_nodes = [n for n in nodes if dep[id(n)] and n.op != "input"]
    state_in = next(n for n in nodes if n.role == "state")
    free = list({id(a): a for n in step_nodes for a in n.args if not dep[id(a)]}.values())
    out_dep = dep[id(p.output)]

    def step(S: torch.Tensor, *vals: torch.Tensor):
        env = {id(state_in): S, **{id(a): v for a, v in zip(free, vals)}}
        for n in step_nodes:
            env[id(n)] = apply_node(n, [env[id(a)] for a in n.args], 2)
        return env[id(p.new_state)], (env[id(p.output)] if out_dep else None)
    return free, step


def run_reference(bc: BoundCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    p = bc.program
    nodes = p.nodes()
    dep = depends_on_state(nodes)

    # 1. everything that does not depend on the state, for all tokens at once:
    #    values are [B|1, T|1, H|1, *dims]
    hoisted = evaluate(bc, [n for n in nodes if not dep[id(n)]])

    out_node, state_node = p.output, p.new_state
    out_shape = (bc.B, bc.T, bc.H, *(bc.sizes[d] for d in out_node.dims))
    if not dep[id(out_node)]:
        o = hoisted[id(out_node)].expand(out_shape)
        if state_node is None or not bc.output_final_state:
            return o.to(bc.out_dtype), None

    # 2. the recurrence itself: one group of rows per sequence (all B rows at once if fixed
    #    length), values are [rows, H, *dims]
    free, step = state_step(p)
    state_shape = (bc.H, *(bc.sizes[d] for d in p.state.dims))
    if bc.cu_seqlens is None:
        groups = [(slice(0, bc.B), 0, bc.T)]
    else:
        groups = [(slice(0, 1), s, e) for s, e in zip(bc.cu_seqlens[:-1], bc.cu_seqlens[1:])]

    def at(n: Node, t: int) -> torch.Tensor:
        v = hoisted[id(n)]
        return v.select(1, t if v.shape[1] > 1 else 0)

    outs: list[torch.Tensor | None] = [None] * bc.T
    finals = []
    for g, (rows, start, end) in enumerate(groups):
        nrows = rows.stop - rows.start
        if bc.initial_state is not None:
            init = bc.initial_state.float()
            S = init[rows] if bc.cu_seqlens is None else init[g:g + 1]
        else:
            S = torch.zeros((nrows, *state_shape), dtype=torch.float32, device=bc.device)
        for t in range(start, end):
            S, o = step(S, *[at(a, t) for a in free])
            if o is not None:
                outs[t] = o.expand(nrows, *out_shape[2:])
        finals.append(S)

    if dep[id(out_node)]:  # varlen: every sequence is packed along T of the one batch row
        o = torch.stack(outs, dim=1)
    final = torch.cat(finals, 0) if bc.output_final_state else None
    return o.to(bc.out_dtype), final


def reference_op(program: Program) -> Callable:
    """The interpreter as an op with the compiled-op call signature."""
    def op(*args, **kwargs):
        return run_reference(bind_call(program, args, kwargs))
    op.__name__ = program.name
    return op
