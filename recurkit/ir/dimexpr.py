"""Expressions over dim sizes, for the defaults of call-time scalars (``scale = rk.dim("K") ** -0.5``)."""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Mapping

_BIN = {"add": operator.add, "sub": operator.sub, "mul": operator.mul,
        "div": operator.truediv, "pow": operator.pow}


@dataclass(frozen=True)
class DimExpr:
    """``rk.dim("K")`` and arithmetic on it with numbers; evaluated when dims are bound.

    Stored as a small tree: ("dim", name) | ("num", value) | (op, lhs, rhs).
    """

    tree: tuple

    def dims(self) -> set[str]:
        def go(t):
            if t[0] == "dim":
                return {t[1]}
            if t[0] == "num":
                return set()
            return go(t[1]) | go(t[2])
        return go(self.tree)

    def evaluate(self, sizes: Mapping[str, int]) -> float:
        def go(t):
            if t[0] == "dim":
                return sizes[t[1]]
            if t[0] == "num":
                return t[1]
            return _BIN[t[0]](go(t[1]), go(t[2]))
        return float(go(self.tree))

    def _bin(self, op: str, other: Any, swap: bool = False) -> "DimExpr":
        if isinstance(other, DimExpr):
            o = other.tree
        elif isinstance(other, (int, float)) and math.isfinite(other):
            o = ("num", other)
        else:
            return NotImplemented
        return DimExpr((op, o, self.tree) if swap else (op, self.tree, o))

    def __add__(self, o): return self._bin("add", o)
    def __radd__(self, o): return self._bin("add", o, True)
    def __sub__(self, o): return self._bin("sub", o)
    def __rsub__(self, o): return self._bin("sub", o, True)
    def __mul__(self, o): return self._bin("mul", o)
    def __rmul__(self, o): return self._bin("mul", o, True)
    def __truediv__(self, o): return self._bin("div", o)
    def __rtruediv__(self, o): return self._bin("div", o, True)
    def __pow__(self, o): return self._bin("pow", o)
    def __rpow__(self, o): return self._bin("pow", o, True)

    def __str__(self) -> str:
        sym = {"add": "+", "sub": "-", "mul": "*", "div": "/", "pow": "**"}

        def go(t):
            if t[0] == "dim":
                return t[1]
            if t[0] == "num":
                return repr(t[1])
            return f"({go(t[1])} {sym[t[0]]} {go(t[2])})"
        s = go(self.tree)
        return s[1:-1] if s.startswith("(") else s

    def to_json(self) -> Any:
        def go(t):
            return [t[0], t[1]] if t[0] in ("dim", "num") else [t[0], go(t[1]), go(t[2])]
        return go(self.tree)

    @staticmethod
    def from_json(obj: Any) -> "DimExpr":
        def go(t):
            return (t[0], t[1]) if t[0] in ("dim", "num") else (t[0], go(t[1]), go(t[2]))
        return DimExpr(go(obj))

    def renamed(self, mapping: Mapping[str, str]) -> "DimExpr":
        def go(t):
            if t[0] == "dim":
                return ("dim", mapping.get(t[1], t[1]))
            if t[0] == "num":
                return t
            return (t[0], go(t[1]), go(t[2]))
        return DimExpr(go(self.tree))


def dim(name: str) -> DimExpr:
    """The size of dim ``name``, for the default of an ``rk.Scalar`` argument."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"rk.dim expects a dim name such as 'K', got {name!r}")
    return DimExpr(("dim", name))
