"""Linear-form extraction: how a value depends on the state, as a sum of simple terms.

Every state-dependent value v of a step is rewritten as  v = sum(terms) + const  where const is
state-free and each term is

    post * sum_over( read * inner * S )

with ``inner`` (dims within the state's) an elementwise multiplier of the state, ``read`` a
state-free value contracted with it over the dims ``over`` (none: no contraction) and ``post``
a state-free multiplier of the result. State-free pieces are new IR nodes built with the same
typing rules as the tracer. A step that is not of this shape raises ``Nonlinear`` naming the
op and the user's line.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..ir import dsl
from ..ir.errors import Loc
from ..ir.node import Node
from ..ir.program import Program


class Nonlinear(Exception):
    """The state enters in a way no parallel form handles; ``str`` says how and where."""

    def __init__(self, what: str, loc: Loc | None):
        super().__init__(f"{what}" + (f" at {loc}" if loc else ""))
        self.what, self.loc = what, loc


class Builder:
    """Makes state-free nodes in a program's dims (typed and de-duplicated like tracing)."""

    def __init__(self, program: Program):
        self.program = program
        self._t = dsl.Tracer(program.name, program.dims, program.loc)

    def op(self, op: str, *args: Node, **attrs) -> Node:
        return self._t.make(op, tuple(args), tuple(attrs.items()))

    def const(self, value: float) -> Node:
        return self._t.const(float(value))

    def mul(self, a: Node | None, b: Node | None) -> Node | None:
        if a is None:
            return b
        if b is None:
            return a
        return self.op("mul", a, b)

    def add(self, a: Node | None, b: Node | None) -> Node | None:
        if a is None:
            return b
        if b is None:
            return a
        return self.op("add", a, b)

    def neg(self, a: Node | None) -> Node:
        return self.const(-1.0) if a is None else self.op("neg", a)

    def contract(self, a: Node, b: Node) -> Node:
        over = tuple(d for d in self.program.dims if d in a.dims and d in b.dims)
        return self.op("contract", a, b, over=over)


@dataclass(frozen=True)
class Term:
    inner: Node | None = None   # elementwise multiplier of the state (dims within the state's)
    read: Node | None = None    # contracted with inner * S over `over` (None: ones)
    over: tuple[str, ...] = ()
    post: Node | None = None    # multiplier of the result

    def dims(self, state_dims: tuple[str, ...], order: tuple[str, ...]) -> tuple[str, ...]:
        ds = set(state_dims) - set(self.over)
        if self.read is not None:
            ds |= set(self.read.dims) - set(self.over)
        if self.post is not None:
            ds |= set(self.post.dims)
        return tuple(d for d in order if d in ds)


@dataclass(frozen=True)
class Affine:
    """sum(terms) + const, as a function of one state value."""
    terms: tuple[Term, ...] = ()
    const: Node | None = None


class LinearForms:
    """Computes the affine form of nodes with respect to a base node (the state)."""

    def __init__(self, program: Program, base: Node, builder: Builder | None = None,
                 forbidden: set[int] | None = None):
        self.p, self.base = program, base
        self.b = builder or Builder(program)
        self.state_dims = base.dims
        self.forbidden = forbidden or set()   # state-dependent nodes that may not be used
        self._memo: dict[int, Affine] = {}
        self._free: dict[int, bool] = {}

    # which nodes are free of the base
    def is_free(self, n: Node) -> bool:
        if id(n) not in self._free:
            if n is self.base or id(n) in self.forbidden:
                self._free[id(n)] = False
            else:
                self._free[id(n)] = all(self.is_free(a) for a in n.args)
        return self._free[id(n)]

    def form(self, n: Node) -> Affine:
        if self.is_free(n):
            return Affine((), n)
        if id(n) not in self._memo:
            self._memo[id(n)] = self._form(n)
        return self._memo[id(n)]

    def _form(self, n: Node) -> Affine:
        if n is self.base:
            return Affine((Term(),))
        if id(n) in self.forbidden:
            raise Nonlinear("the output reads the state before its update (use the new "
                            "state)", n.loc)
        if any(id(a) in self.forbidden for a in n.args):   # name the line that reads it
            raise Nonlinear("the output reads the state before its update (use the new "
                            "state)", n.loc)
        op, args = n.op, n.args
        if op in ("add", "sub"):
            a, c = self.form(args[0]), self.form(args[1])
            if op == "sub":   # negated terms; the constant is subtracted as it was
                return Affine(a.terms + self.scale(Affine(c.terms), self.b.const(-1.0)).terms,
                              self._sub_const(a.const, c.const))
            return Affine(a.terms + c.terms, self.b.add(a.const, c.const))
        if op == "neg":
            return self.scale(self.form(args[0]), self.b.const(-1.0))
        if op == "mul":
            x, y = args
            if self.is_free(x):
                return self.scale(self.form(y), x)
            if self.is_free(y):
                return self.scale(self.form(x), y)
            raise Nonlinear("the state is multiplied by itself (mul of two state-dependent "
                            "values)", n.loc)
        if op == "div":
            x, y = args
            if self.is_free(y):
                return self.scale(self.form(x), self.b.op("div", self.b.const(1.0), y))
            raise Nonlinear("the state enters nonlinearly through a division by it", n.loc)
        if op == "contract":
            x, y = args
            if self.is_free(x) or self.is_free(y):
                free, lin = (x, y) if self.is_free(x) else (y, x)
                return self.contract(self.form(lin), free, n)
            raise Nonlinear("two state-dependent values are contracted (quadratic in the "
                            "state)", n.loc)
        if op == "sum":
            return self.reduce(self.form(args[0]), tuple(n.attr("over")), n)
        name = {"where": "rk.where", "max": "rk.max"}.get(op, op)
        raise Nonlinear(f"the state enters nonlinearly through {name}", n.loc)

    def _sub_const(self, a: Node | None, c: Node | None) -> Node | None:
        if c is None:
            return a
        return self.b.neg(c) if a is None else self.b.op("sub", a, c)

    def scale(self, f: Affine, x: Node) -> Affine:
        terms = []
        for t in f.terms:
            if not t.over and set(x.dims) <= set(self.state_dims):
                terms.append(replace(t, inner=self.b.mul(t.inner, x)))
            else:
                terms.append(replace(t, post=self.b.mul(t.post, x)))
        const = None if f.const is None else self.b.mul(f.const, x)
        return Affine(tuple(terms), const)

    def contract(self, f: Affine, x: Node, at: Node) -> Affine:
        terms = []
        for t in f.terms:
            tdims = t.dims(self.state_dims, self.p.dims)
            c = tuple(d for d in self.p.dims if d in tdims and d in x.dims)
            residual = set(self.state_dims) - set(t.over)
            post_dims = set(t.post.dims) if t.post is not None else set()
            read_dims = set(t.read.dims) - set(t.over) if t.read is not None else set()
            if set(c) <= residual and not set(c) & (post_dims | read_dims) \
                    and not set(x.dims) & set(t.over):
                terms.append(replace(t, read=self.b.mul(t.read, x), over=t.over + c))
            elif set(c) <= post_dims and not set(c) & (residual | read_dims):
                terms.append(replace(t, post=self.b.contract(t.post, x)))
            else:
                raise Nonlinear("a contraction mixes the state with itself in a way no "
                                "parallel form handles", at.loc)
        const = None if f.const is None else self.b.contract(f.const, x)
        return Affine(tuple(terms), const)

    def reduce(self, f: Affine, over: tuple[str, ...], at: Node) -> Affine:
        terms = []
        for t in f.terms:
            residual = set(self.state_dims) - set(t.over)
            others = (set(t.post.dims) if t.post is not None else set()) | (
                set(t.read.dims) - set(t.over) if t.read is not None else set())
            if set(over) <= residual and not set(over) & others:
                terms.append(replace(t, over=t.over + over))
            else:
                raise Nonlinear("rk.sum over a dim the state shares with other values", at.loc)
        const = None if f.const is None else self.b.op("sum", f.const, over=over)
        return Affine(tuple(terms), const)


def factors(n: Node) -> list[Node]:
    """The multiplicative factors of a node (flattening mul)."""
    if n.op == "mul":
        return factors(n.args[0]) + factors(n.args[1])
    return [n]


def summands(n: Node) -> list[tuple[float, Node]]:
    """The additive pieces of a node with their signs (flattening add, sub and neg)."""
    if n.op == "add":
        return summands(n.args[0]) + summands(n.args[1])
    if n.op == "sub":
        return summands(n.args[0]) + [(-s, x) for s, x in summands(n.args[1])]
    if n.op == "neg":
        return [(-s, x) for s, x in summands(n.args[0])]
    return [(1.0, n)]
