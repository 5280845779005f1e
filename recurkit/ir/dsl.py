"""The declaration language: traced values and the op vocabulary (the input annotations are
in ``annotations``, re-exported here).

Inside a step function every value is a ``Sym``: a symbolic named-dim tensor that records the
op applied to it as an IR node. Python control flow on a Sym, indexing, and foreign functions
(torch, numpy, math) are refused with the user's line and the rk function to use instead.
"""
from __future__ import annotations

import math
import os
import sys
from typing import Any

from .errors import DeclarationError, Loc
from .node import BOOL, F32, Node
from .typing_rules import TypeRule, infer
from .annotations import (Bits, Index, Param, Row, Scalar, Spec, State, Token,  # noqa: F401
                          Weight, _Annotation)

_IR_DIR = os.path.dirname(os.path.abspath(__file__))


# --- tracing context --------------------------------------------------------------------
class Tracer:
    """Builds nodes for one declaration; de-duplicates identical subexpressions."""

    def __init__(self, name: str, dims: tuple[str, ...], fallback: Loc):
        self.name, self.dims, self.fallback = name, dims, fallback
        self._memo: dict[tuple, Node] = {}

    def error(self, what: str, hint: str | None = None, loc: Loc | None = None):
        return DeclarationError(what, loc or user_loc(self.fallback), hint, self.name)

    def make(self, op: str, args: tuple[Node, ...], attrs: tuple = ()) -> Node:
        try:
            dims, dtype = infer(op, [(a.dims, a.dtype) for a in args], dict(attrs), self.dims)
        except TypeRule as e:
            raise self.error(e.what, e.hint) from None
        key = (op, tuple(id(a) for a in args), attrs)
        if key not in self._memo:
            self._memo[key] = Node(op, args, dims, dtype, attrs, user_loc(self.fallback))
        return self._memo[key]

    def const(self, value: float) -> Node:
        key = ("const", (), (("value", value),))
        if key not in self._memo:
            self._memo[key] = Node("const", (), (), F32, (("value", value),))
        return self._memo[key]

    def lift(self, x: Any, what: str) -> Node:
        if isinstance(x, Sym):
            if x._tracer is not self:
                raise self.error(f"{what}: a value from another declaration was used")
            return x._node
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            hint = ("rk.dim(...) is only for the default of an rk.Scalar argument"
                    if type(x).__name__ == "DimExpr" else
                    "use the rk vocabulary (rk.exp, rk.outer, ...) on traced values and plain "
                    "Python numbers as constants")
            raise self.error(f"{what}: cannot use a {type(x).__name__} in a recurrence step",
                             hint)
        if not math.isfinite(x):
            raise self.error(f"{what}: constant {x!r} is not finite")
        return self.const(float(x))


_current: list[Tracer] = []


def current_tracer(what: str) -> Tracer:
    if not _current:
        raise RuntimeError(f"{what} can only be used inside a step traced by @rk.recurrence")
    return _current[-1]


def user_loc(fallback: Loc) -> Loc:
    """The innermost stack frame outside recurkit/ir: the user's line."""
    f = sys._getframe(1)
    while f is not None:
        path = os.path.abspath(f.f_code.co_filename)
        if os.path.dirname(path) != _IR_DIR:
            return Loc(f.f_code.co_filename, f.f_lineno)
        f = f.f_back
    return fallback


# --- traced values ----------------------------------------------------------------------
class Sym:
    """A symbolic named-dim tensor inside a step. Dims match by name, never by position."""

    __slots__ = ("_node", "_tracer")
    __array_priority__ = 1000  # numpy defers to our reflected operators

    def __init__(self, node: Node, tracer: Tracer):
        self._node, self._tracer = node, tracer

    @property
    def dims(self) -> tuple[str, ...]:
        return self._node.dims

    def __repr__(self) -> str:
        return f"<traced {self._node.op} {list(self.dims)}>"

    def _op(self, op: str, *others: Any, attrs: tuple = (), swap: bool = False) -> "Sym":
        t = self._tracer
        args = [t.lift(o, op) for o in others]
        nodes = (*args, self._node) if swap else (self._node, *args)
        return Sym(t.make(op, tuple(nodes), attrs), t)

    # arithmetic, broadcasting by dim name
    def __add__(self, o): return self._op("add", o)
    def __radd__(self, o): return self._op("add", o, swap=True)
    def __sub__(self, o): return self._op("sub", o)
    def __rsub__(self, o): return self._op("sub", o, swap=True)
    def __mul__(self, o): return self._op("mul", o)
    def __rmul__(self, o): return self._op("mul", o, swap=True)
    def __truediv__(self, o): return self._op("div", o)
    def __rtruediv__(self, o): return self._op("div", o, swap=True)
    def __pow__(self, o): return self._op("pow", o)
    def __rpow__(self, o): return self._op("pow", o, swap=True)
    def __neg__(self): return self._op("neg")
    def __pos__(self): return self
    def __abs__(self): return self._op("abs")

    # comparisons give bool values, for rk.where
    def __lt__(self, o): return self._op("lt", o)
    def __le__(self, o): return self._op("le", o)
    def __gt__(self, o): return self._op("gt", o)
    def __ge__(self, o): return self._op("ge", o)
    def __eq__(self, o): return self._op("eq", o)  # type: ignore[override]
    def __ne__(self, o): return self._op("ne", o)  # type: ignore[override]
    __hash__ = object.__hash__

    # contraction over the shared dims
    def __matmul__(self, o): return contract(self, o)
    def __rmatmul__(self, o): return contract(o, self)

    # everything that would need a concrete value is refused
    def _refuse(self, what: str, hint: str):
        raise self._tracer.error(what, hint)

    def __bool__(self):
        self._refuse("Python control flow (if / while / and / or / not) on a traced value",
                     "the step is traced once for all tokens: use rk.where(cond, a, b)")

    def __iter__(self):
        self._refuse("iterating over a traced value", "dims are named: use rk.sum or @")

    def __len__(self):
        self._refuse("len() of a traced value", "use rk.dim('K') in an rk.Scalar default")

    def __getitem__(self, item):
        self._refuse("indexing a traced value", "dims are named, not positional: use @, "
                     "rk.sum(x, 'K') or broadcasting by name")

    def __float__(self):
        self._refuse("converting a traced value to a Python number (math.* or float())",
                     "use the rk functions: rk.exp, rk.log, rk.sigmoid, ...")

    __int__ = __index__ = __complex__ = __float__

    def __array__(self, *a, **k):
        self._refuse("numpy on a traced value", "use the rk functions (rk.exp, rk.outer, ...)")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        self._refuse(f"numpy.{ufunc.__name__} on a traced value",
                     f"use rk.{ufunc.__name__} if it exists, else compose rk functions")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        sym = next(a for a in list(args) + list((kwargs or {}).values()) if isinstance(a, Sym))
        name = getattr(func, "__name__", str(func))
        sym._refuse(f"torch.{name} on a traced value",
                    f"use the rk vocabulary (rk.{name} if it exists); torch functions cannot "
                    "be traced")

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        self._refuse(f"'.{name}' on a traced value is not supported",
                     "traced values have no methods: use the rk functions (rk.sum, rk.exp, ...)")


# --- vocabulary ---------------------------------------------------------------------------
def _sym_arg(fn: str, x: Any) -> Sym | None:
    if isinstance(x, Sym):
        return x
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return None
    tr = current_tracer(f"rk.{fn}")
    raise tr.error(f"rk.{fn}: cannot use a {type(x).__name__} in a recurrence step",
                   "pass traced values or plain numbers")


def _unary(op: str, py):
    def fn(x):
        s = _sym_arg(op, x)
        return py(float(x)) if s is None else s._op(op)
    fn.__name__ = op
    fn.__doc__ = f"Elementwise {op}."
    return fn


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _sigmoid(x: float) -> float:
    return 0.5 * (1.0 + math.tanh(0.5 * x))


exp = _unary("exp", math.exp)
log = _unary("log", math.log)
sigmoid = _unary("sigmoid", _sigmoid)
softplus = _unary("softplus", _softplus)
silu = _unary("silu", lambda x: x * _sigmoid(x))
tanh = _unary("tanh", math.tanh)
sqrt = _unary("sqrt", math.sqrt)
rsqrt = _unary("rsqrt", lambda x: 1.0 / math.sqrt(x))
relu = _unary("relu", lambda x: max(x, 0.0))


def _need_sym(fn: str, *xs: Any) -> Sym:
    for x in xs:
        if isinstance(x, Sym):
            for y in xs:
                _sym_arg(fn, y)
            return x
    raise current_tracer(f"rk.{fn}").error(f"rk.{fn} needs at least one traced value")


def _binary_fn(op: str, a, b) -> Sym:
    t = _need_sym(op, a, b)._tracer
    return Sym(t.make(op, (t.lift(a, op), t.lift(b, op))), t)


def maximum(a, b):
    """Elementwise maximum, broadcasting by dim name."""
    return _binary_fn("maximum", a, b)


def minimum(a, b):
    """Elementwise minimum, broadcasting by dim name."""
    return _binary_fn("minimum", a, b)


def where(cond, a, b):
    """``a`` where ``cond`` holds, else ``b`` (elementwise, broadcasting by dim name)."""
    c = _need_sym("where", cond, a, b)
    t = c._tracer
    return Sym(t.make("where", tuple(t.lift(x, "where") for x in (cond, a, b))), t)


def contract(a, b):
    """``a @ b``: multiply and sum over every dim the two share (``k @ S`` -> [V])."""
    s = _need_sym("dot", a, b)
    if not (isinstance(a, Sym) and isinstance(b, Sym)):
        raise s._tracer.error("@ / rk.dot needs two traced values",
                              "to scale by a number use *")
    over = tuple(d for d in s._tracer.dims if d in a.dims and d in b.dims)
    return Sym(s._tracer.make("contract", (a._node, b._node), (("over", over),)), s._tracer)


dot = contract


def gather(x, idx, dim: str | None = None):
    """``x`` read at the integer indices ``idx`` along ``dim``: for x [I] and idx: rk.Index["O"]
    the result is [O] with ``out[o] = x[idx[o]]``. ``dim`` may be left out when x has one dim.
    """
    s = _need_sym("gather", x, idx)
    if not (isinstance(x, Sym) and isinstance(idx, Sym)):
        raise s._tracer.error("rk.gather needs a traced value and an rk.Index input")
    if dim is None:
        if len(x.dims) != 1:
            raise s._tracer.error(f"rk.gather from a value with dims {list(x.dims)} needs dim=",
                                  "say which dim the indices select along")
        dim = x.dims[0]
    return Sym(s._tracer.make("gather", (x._node, idx._node), (("dim", dim),)), s._tracer)


def outer(a, b):
    """Outer product of values with disjoint dims: ``rk.outer(k, v)`` is [K, V]."""
    s = _need_sym("outer", a, b)
    if not (isinstance(a, Sym) and isinstance(b, Sym)):
        raise s._tracer.error("rk.outer needs two traced values", "to scale by a number use *")
    shared = [d for d in a.dims if d in b.dims]
    if shared:
        raise s._tracer.error(
            f"rk.outer of values that share dim '{shared[0]}' ({list(a.dims)} and "
            f"{list(b.dims)})", "an outer product needs disjoint dims: use @ to contract a "
            "shared dim, or * to multiply elementwise")
    return a * b


def _reduce(op: str, x, dim) -> Sym:
    s = _need_sym(op, x)
    if dim is None:
        over = s.dims
    else:
        over = (dim,) if isinstance(dim, str) else tuple(dim)
        for d in over:
            if d not in s._tracer.dims:
                raise s._tracer.error(f"rk.{op} over undeclared dim '{d}'",
                                      f"declared dims are {list(s._tracer.dims)}")
    if not over:
        return s
    over = tuple(d for d in s._tracer.dims if d in over)
    return Sym(s._tracer.make(op, (s._node,), (("over", over),)), s._tracer)


def sum(x, dim=None):  # noqa: A001 - rk.sum is the vocabulary's name
    """Sum over ``dim`` (a name or tuple of names; all dims if None)."""
    return _reduce("sum", x, dim)


def max(x, dim=None):  # noqa: A001
    """Maximum over ``dim`` (a name or tuple of names; all dims if None)."""
    return _reduce("max", x, dim)


def l2norm(x, dim=None, eps: float = 1e-6):
    """``x / sqrt(sum(x^2) + eps)`` along ``dim`` (the value's only dim if None)."""
    s = _need_sym("l2norm", x)
    if dim is None:
        if len(s.dims) != 1:
            raise s._tracer.error(f"rk.l2norm of a value with dims {list(s.dims)} needs dim=",
                                  "say which dim to normalise, e.g. rk.l2norm(x, 'K')")
        dim = s.dims[0]
    return s * rsqrt(sum(s * s, dim) + eps)


def rotate(x, angle, dim: str | None = None, layout: str = "interleaved"):
    """``x`` with each pair of entries along ``dim`` rotated by ``angle`` (radians), as
    complex numbers ``x[a] + i x[b]`` multiplied by ``exp(i angle)``:
    ``(x[a], x[b]) -> (cos * x[a] - sin * x[b], sin * x[a] + cos * x[b])``.

    Pairs are ``(2i, 2i + 1)`` with ``layout="interleaved"`` (``torch.view_as_complex``),
    ``(i, i + K/2)`` with ``"halves"`` (the rotate-half RoPE). ``angle`` is one angle for every
    pair (a number, or a value without ``dim``) or one per pair: a value over a dim of its own
    of size ``K / 2`` (say ``theta: rk.Token["P"]``). ``dim`` may be left out when x has one
    dim. On the state, a rotation makes a complex-diagonal transition (Mamba-3, GateLoop); the
    chunk forms then run in the rotating frame (see docs/lowering.md).
    """
    s = _need_sym("rotate", x, angle)
    t = s._tracer
    if not isinstance(x, Sym):
        raise t.error("rk.rotate: the rotated value must be a traced value")
    if dim is None:
        if len(x.dims) != 1:
            raise t.error(f"rk.rotate of a value with dims {list(x.dims)} needs dim=",
                          "say which dim is rotated in pairs, e.g. rk.rotate(S, theta, 'K')")
        dim = x.dims[0]
    a = t.lift(angle, "rk.rotate")
    extra = [d for d in a.dims if d not in x.dims]
    if len(extra) > 1:
        raise t.error(f"rk.rotate: the angle has dims {list(a.dims)}, of which "
                      f"{extra} are not the value's; at most one (the pairs' dim) may be",
                      f"give one angle per pair along {dim}, over one dim of size {dim} / 2")
    attrs = (("dim", dim), ("pair", extra[0] if extra else None), ("layout", layout))
    return Sym(t.make("rotate", (x._node, a), attrs), t)


def pairs(x, pair: str, dim: str, layout: str = "interleaved"):
    """``x`` over the pairs' dim ``pair`` (size K/2) as a value over ``dim`` (size K), each
    entry given to both dims of its pair (``layout`` as in ``rk.rotate``): a per-pair decay,
    which commutes with a rotation of the pairs (GateLoop's complex gates are
    ``rk.exp(rk.pairs(log_r, "P", "K")) * rk.rotate(S, theta, "K")``)."""
    s = _need_sym("pairs", x)
    t = s._tracer
    return Sym(t.make("pairs", (s._node,), (("dim", dim), ("pair", pair), ("layout", layout))),
               t)


def head() -> Sym:
    """The head index h = 0..H-1 as a per-head scalar (e.g. RetNet's gamma_h)."""
    t = current_tracer("rk.head()")
    key = ("head",)
    if key not in t._memo:
        t._memo[key] = Node("input", (), (), F32, (("role", "head"), ("index", -1),
                                                   ("name", "head")))
    return Sym(t._memo[key], t)


__all__ = ["State", "Token", "Param", "Scalar", "Row", "Weight", "Index", "Bits", "Sym", "gather", "exp", "log", "sigmoid", "softplus",
           "silu", "tanh", "sqrt", "rsqrt", "relu", "maximum", "minimum", "where", "contract",
           "dot", "outer", "sum", "max", "l2norm", "head", "rotate", "pairs", "BOOL"]
