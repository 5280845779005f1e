"""The adjoint of a recurrence: its backward step, derived from the declaration's IR.

For ``S_t = f(S_(t-1), x_t)`` and ``y_t = g(S_(t-1) or S_t, x_t)``, reverse-mode
differentiation of one step gives, from the cotangent ``dS_t`` carried back in time and the
output's cotangent ``dy_t``,

    dS_(t-1) = (df/dS)^T (dS_t + dg/dS_t^T dy_t)        the adjoint recurrence (backwards)
    dx_t     = (df/dx)^T (...) + (dg/dx)^T dy_t          per-token gradients

For a linear recurrence the first line is again a linear recurrence (the transposed
transition), for a nonlinear one it is the chain rule through the step; either way it is a
step of IR nodes, built here once per declaration (``vjp.py`` holds the per-op rules).

The step's leaves are its *feeds*: the state-free values it reads (gates, normalised keys,
scales), computed for all tokens at once by the prologue. The backward step yields the
gradient of each feed per token; the prologue's own backward (elementwise, per token) is left
to autograd on the host. A state-free broadcasting product (an outer product ``k v^T``) is not
a feed but part of the step, so no K x V gradient is ever stored per token.

Backends run the adjoint backwards in time from chunk-boundary checkpoints of the forward
state, recomputing each chunk's states before walking it in reverse.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir.node import BINARY, F32, UNARY, Node, depends_on_state, expr_text, toposort
from ..ir.program import Program, _fmt_dims
from .vjp import Vjp


def step_feeds(p: Program) -> tuple[list[Node], set[int]]:
    """(feeds, inlined): the state-free values the step reads, and the ids of state-free
    broadcasting products (every argument with fewer dims) rebuilt inside the step from
    their factors instead of being read per token."""
    nodes = p.nodes()
    dep = depends_on_state(nodes)
    feeds: list[Node] = []
    inlined: set[int] = set()

    def feed(a: Node) -> None:
        if dep[id(a)] or a.op == "const" or any(a is f for f in feeds):
            return
        if (a.op in BINARY or a.op in UNARY) and a.dims and all(
                len(x.dims) < len(a.dims) for x in a.args):
            inlined.add(id(a))
            for x in a.args:
                feed(x)
            return
        feeds.append(a)
    for n in nodes:
        if dep[id(n)] and n.op != "input":
            for a in n.args:
                feed(a)
    return feeds, inlined


@dataclass(frozen=True, eq=False)
class AdjointStep:
    """The backward step of ``program``.

    Leaves: the old state (the program's state input), the feeds, ``d_new`` (the cotangent of
    the new state) and ``d_out`` (of the output; None when the output does not depend on the
    state: its gradient then flows through the prologue alone). Results: ``d_state`` (the
    cotangent of the old state, None if it gets none) and ``d_feeds`` (one per feed, None
    where none flows, e.g. a per-head index).
    """

    program: Program
    feeds: tuple[Node, ...]
    inlined: frozenset[int]
    d_new: Node
    d_out: Node | None
    d_state: Node | None
    d_feeds: tuple[Node | None, ...]

    def roots(self) -> list[Node]:
        return [n for n in (self.d_state, *self.d_feeds) if n is not None]

    def nodes(self) -> list[Node]:
        """Every node the backward step evaluates (forward ones included), feeds as leaves."""
        return toposort(self.roots(), stop={id(f) for f in self.feeds})

    def __str__(self) -> str:
        p = self.program
        names = {id(f): f"f{i}" for i, f in enumerate(self.feeds)}
        state = next(n for n in p.nodes() if n.role == "state")
        names[id(state)] = p.state.name
        names[id(self.d_new)] = f"d{p.state.name}'"
        if self.d_out is not None:
            names[id(self.d_out)] = "dout"
        lines = [f"adjoint of {p.name}"]
        for i, f in enumerate(self.feeds):
            lines.append(f"  feed    f{i}: {_fmt_dims(f.dims)} = {expr_text(f, 4)}")
        body = [n for n in self.nodes() if id(n) not in names and n.op not in ("input",
                                                                               "const")]
        for i, n in enumerate(body):
            names[id(n)] = f"%{i}"
            extra = f"[{', '.join(n.attr('over'))}]" if n.op in ("contract", "sum",
                                                                 "max") else ""
            ty = _fmt_dims(n.dims) + ("" if n.dtype == F32 else f" {n.dtype}")
            lines.append(f"  %{i}: {ty} = {n.op}{extra}("
                         f"{', '.join(_label(a, names) for a in n.args)})")
        if self.d_state is not None:
            lines.append(f"  d{p.state.name} = {_label(self.d_state, names)}")
        for i, d in enumerate(self.d_feeds):
            if d is not None:
                lines.append(f"  df{i} = {_label(d, names)}")
        return "\n".join(lines)


def _label(n: Node, names: dict[int, str]) -> str:
    if id(n) in names:
        return names[id(n)]
    if n.op == "const":
        return repr(n.attr("value"))
    return n.attr("name") if n.op == "input" else "?"


_NO_GRAD_ROLES = ("head", "scalar")


def derive_adjoint(p: Program) -> AdjointStep:
    """The backward step of a recurrence (any declaration with a state, linear or not)."""
    if p.new_state is None or p.is_tiled:
        raise ValueError(f"{p.name}: the adjoint is derived for recurrences (with a state)")
    feeds, inlined = step_feeds(p)
    nodes = toposort(p.roots(), stop={id(f) for f in feeds})
    dep = depends_on_state(p.nodes())
    state = next(n for n in p.nodes() if n.role == "state")
    vj = Vjp(p, "_adjoint")
    d_new = Node("input", (), p.new_state.dims, F32,
                 (("role", "d_state"), ("index", -1), ("name", f"d{p.state.name}")))
    d_out = None
    cot: dict[int, Node] = {}
    if dep[id(p.output)]:
        d_out = Node("input", (), p.output.dims, F32,
                     (("role", "d_out"), ("index", -1), ("name", "d_out")))
        cot[id(p.output)] = d_out
    cot[id(p.new_state)] = vj.add(cot.get(id(p.new_state)), d_new)
    feed_ids = {id(f) for f in feeds}
    for n in reversed(nodes):
        g = cot.get(id(n))
        if g is None or n.op in ("input", "const") or id(n) in feed_ids:
            continue
        for a, ga in zip(n.args, vj.vjp(n, g)):
            if ga is None or a.op == "const" or a.dtype != F32 or a.role in _NO_GRAD_ROLES:
                continue
            cot[id(a)] = vj.add(cot.get(id(a)), ga)
    d_feeds = [None if f.role in _NO_GRAD_ROLES else cot.get(id(f)) for f in feeds]
    roots = _Factored(p, feed_ids).rebuild([cot.get(id(state))] + d_feeds)
    return AdjointStep(p, tuple(feeds), frozenset(inlined), d_new, d_out, roots[0],
                       tuple(roots[1:]))


class _Factored:
    """The backward step's reductions factored, and equal values made one node.

    Reverse mode writes a feed's gradient as one reduction over the whole state of a product
    (``dbeta = sum_KV dS' * (k (v - k^T S))``) and repeats the same reduction under
    different scalars (``dk`` holds ``beta * sum_V dS' (v - k^T S)``). Here, per reduction of
    a product over dims ``O``: the factors without any dim of ``O`` move out of it; a dim of
    ``O`` that only some factors have is reduced first over those (``sum_KV a_K b_KV c_V =
    sum_K a_K (sum_V b_KV c_V)``); and nodes equal in op, arguments (up to order, for
    commutative ops), dims and attributes are one node, so the inner reduction above and the
    one inside ``dk`` are computed once. The forward's nodes are kept as they are (backends
    recognise the state and the new state by identity), and so are the feeds: a factor that
    is a feed is read whole, never split into the prologue values it is made of."""

    COMMUTATIVE = ("add", "mul", "maximum", "minimum", "contract")

    def __init__(self, p: Program, leaves: set[int]):
        self.p, self.leaves = p, leaves   # leaves: the feeds, read whole (never split)
        self.memo: dict[tuple, Node] = {}
        self.seq: dict[int, int] = {}     # node id -> a stable number (for argument order)
        self.done: dict[int, Node] = {}
        for n in p.nodes():               # the forward's nodes stand for themselves
            self.done[id(n)] = self._intern(n)

    def _key(self, n: Node) -> tuple:
        args = [self.seq[id(a)] for a in n.args]
        if n.op in self.COMMUTATIVE:
            args = sorted(args)
        return (n.op, tuple(args), n.dims, n.dtype, n.attrs)

    def _intern(self, n: Node) -> Node:
        if n.op == "input" or any(id(a) not in self.seq for a in n.args):
            self.seq.setdefault(id(n), len(self.seq))
            return n
        hit = self.memo.setdefault(self._key(n), n)
        self.seq.setdefault(id(hit), len(self.seq))
        return hit

    def make(self, op: str, args: tuple[Node, ...], dims, attrs=()) -> Node:
        return self._intern(Node(op, args, self.p.canonical(dims), F32, attrs))

    def product(self, fs: list[Node]) -> Node:
        out = fs[0]
        for f in fs[1:]:
            out = self.make("mul", (out, f), set(out.dims) | set(f.dims))
        return out

    def factors(self, n: Node) -> list[Node]:
        if n.op == "mul" and n.dtype == F32 and id(n) not in self.leaves:
            return self.factors(n.args[0]) + self.factors(n.args[1])
        return [n]

    def reduce(self, fs: list[Node], over: set[str]) -> Node:
        """sum over ``over`` of the product of ``fs``, staged and with constants taken out."""
        outer = [f for f in fs if not set(f.dims) & over]
        inner = [f for f in fs if set(f.dims) & over]
        over = set(over)
        while inner and over:
            d = next((d for d in reversed(self.p.canonical(over))
                      if any(d not in f.dims for f in inner)), None)
            if d is None or len(over) == 1:   # every factor has every dim left: one reduction
                d, stage = None, over
            else:
                stage = {d}
            have = [f for f in inner if set(f.dims) & stage]
            rest = [f for f in inner if not set(f.dims) & stage]
            dims = set().union(*(f.dims for f in have)) - stage
            r = self.make("sum", (self.product(have),), dims,
                          (("over", self.p.canonical(stage)),)) if len(have) == 1 else \
                self.make("contract", (have[0], self.product(have[1:])), dims,
                          (("over", self.p.canonical(stage)),))
            inner, over = rest + [r], over - stage
            if d is None:
                break
        return self.product(outer + inner)

    def node(self, n: Node) -> Node:
        hit = self.done.get(id(n))
        if hit is not None:
            return hit
        args = tuple(self.node(a) for a in n.args)
        if n.op in ("contract", "sum") and n.dtype == F32:
            fs = [f for a in args for f in self.factors(a)]
            out = self.reduce(fs, set(n.attr("over")))
        elif all(a is b for a, b in zip(args, n.args)):
            out = self._intern(n)
        else:
            out = self._intern(Node(n.op, args, n.dims, n.dtype, n.attrs, n.loc))
        self.done[id(n)] = out
        return out

    def rebuild(self, roots: list[Node | None]) -> list[Node | None]:
        for r in roots:   # deep steps: children first, without recursion limits
            if r is not None:
                for n in toposort([r]):
                    self.node(n)
        return [None if r is None else self.node(r) for r in roots]
