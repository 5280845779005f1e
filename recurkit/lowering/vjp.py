"""Reverse-mode derivative rules on the IR: the cotangents of a node's arguments, as new nodes.

One rule per op, used by both derived backwards (tiled ops, ``lowering/tiled.py``, and
recurrences, ``lowering/adjoint.py``). New nodes are typed by the same rules as traced ones.
Broadcasting is by dim name, so a cotangent may carry fewer dims than its value (it is then
constant along the missing ones) and one that carries more is summed down (``fit``); a product
summed down is emitted as a contraction where it can be.
"""
from __future__ import annotations

from ..ir.dsl import Tracer
from ..ir.node import COMPARE, Node
from ..ir.program import Program


class DerivativeError(ValueError):
    pass


class Vjp:
    """Builds cotangent expressions of one program's nodes."""

    def __init__(self, p: Program, suffix: str = "_grad", reduce: bool = True):
        """``reduce=False``: every value carries the same dims (the tiled form), so
        cotangents are used as they come, never summed down."""
        self.p, self.reduce = p, reduce
        self.t = Tracer(p.name + suffix, p.dims, p.loc)

    # --- building nodes -----------------------------------------------------------------
    def op(self, name: str, *args, over: tuple[str, ...] | None = None) -> Node:
        attrs = () if over is None else (("over", tuple(over)),)
        return self.t.make(name, tuple(self.lift(a) for a in args), attrs)

    def lift(self, x) -> Node:
        return x if isinstance(x, Node) else self.t.const(float(x))

    def where(self, c: Node, a, b) -> Node:
        return self.t.make("where", (c, self.lift(a), self.lift(b)))

    def canon(self, dims) -> tuple[str, ...]:
        return tuple(d for d in self.p.dims if d in set(dims))

    def add(self, a: Node | None, b: Node) -> Node:
        return b if a is None else self.op("add", a, b)

    def fit(self, g: Node, dims: tuple[str, ...]) -> Node:
        """``g`` summed over the dims it has beyond ``dims``."""
        extra = [d for d in g.dims if d not in dims]
        return self.op("sum", g, over=tuple(extra)) if extra else g

    def prod_sum(self, x: Node, y: Node, keep: tuple[str, ...]) -> Node:
        """``x * y`` summed over every dim not in ``keep``: a contraction where it can be."""
        to_sum = [d for d in self.canon(set(x.dims) | set(y.dims)) if d not in keep]
        shared = self.canon(set(x.dims) & set(y.dims))
        if shared and set(shared) <= set(to_sum):
            c = self.op("contract", x, y, over=shared)
            rest = tuple(d for d in to_sum if d not in shared)
        else:
            c, rest = self.op("mul", x, y), tuple(to_sum)
        return self.op("sum", c, over=rest) if rest else c

    # --- the rules -----------------------------------------------------------------------
    def vjp(self, n: Node, g: Node) -> list[Node | None]:
        """The cotangents of ``n``'s arguments given ``g``, the cotangent of ``n``: each
        carries at most its argument's dims (None: no gradient flows there)."""
        out = self._rule(n, g)
        if not self.reduce:
            return out
        return [None if c is None else self.fit(c, a.dims) for a, c in zip(n.args, out)]

    def _rule(self, n: Node, g: Node) -> list[Node | None]:
        o = self.op
        a = n.args[0] if n.args else None
        b = n.args[1] if len(n.args) > 1 else None
        k = n.op
        if k == "neg":
            return [o("neg", g)]
        if k == "exp":
            return [o("mul", g, n)]
        if k == "log":
            return [o("div", g, a)]
        if k == "sigmoid":
            return [o("mul", g, o("mul", n, o("sub", 1.0, n)))]
        if k == "tanh":
            return [o("mul", g, o("sub", 1.0, o("mul", n, n)))]
        if k == "sqrt":
            return [o("div", o("mul", g, 0.5), n)]
        if k == "rsqrt":
            return [o("mul", o("mul", g, -0.5), o("mul", n, o("mul", n, n)))]
        if k == "abs":
            return [self.where(o("lt", a, 0.0), o("neg", g), g)]
        if k == "relu":
            return [self.where(o("gt", a, 0.0), g, 0.0)]
        if k == "silu":
            s = o("sigmoid", a)
            return [o("mul", g, o("mul", s, o("add", 1.0, o("mul", a, o("sub", 1.0, s)))))]
        if k == "softplus":
            return [o("mul", g, o("sigmoid", a))]
        if k == "add":
            return [g, g]
        if k == "sub":
            return [g, o("neg", g)]
        if k == "mul" and not self.reduce:
            return [o("mul", g, b), o("mul", g, a)]
        if k == "mul":   # summed down to each factor's dims: a contraction where possible
            return [self.prod_sum(g, b, a.dims), self.prod_sum(g, a, b.dims)]
        if k == "div":
            return [o("div", g, b), o("neg", o("div", o("mul", g, n), b))]
        if k == "pow":
            return [o("mul", g, o("mul", b, o("pow", a, o("sub", b, 1.0)))),
                    o("mul", g, o("mul", n, o("log", a)))]
        if k in ("maximum", "minimum"):
            first = o("ge" if k == "maximum" else "le", a, b)
            return [self.where(first, g, 0.0), self.where(first, 0.0, g)]
        if k == "where":
            return [None, self.where(a, g, 0.0), self.where(a, 0.0, g)]
        if k in COMPARE:
            return [None, None]
        if k == "contract":
            return [self.prod_sum(g, b, a.dims), self.prod_sum(g, a, b.dims)]
        if k == "sum":   # the cotangent broadcasts over the reduced dims
            return [g]
        if k == "max":   # shared evenly between tied maxima, as torch.amax's backward
            hit = o("eq", a, n)
            count = o("sum", self.where(hit, 1.0, 0.0), over=n.attr("over"))
            return [self.where(hit, o("div", g, count), 0.0)]
        raise DerivativeError(f"no derivative rule for '{k}'")
