"""The one IR node type and the table of operations it may carry.

A node is immutable: an op name, argument nodes, the named dims of its value (always in the
program's canonical dim order), a dtype and a small tuple of attributes. Source locations ride
along for error messages but never take part in equality or hashing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

from .errors import Loc

# dtypes of values inside a step. Token/param inputs of any float storage dtype are read as f32.
F32, BOOL, INDEX = "f32", "bool", "index"
DTYPES = (F32, BOOL, INDEX)

# Inputs of a step. "head" is the per-head index h (0..H-1), a per-head scalar with no argument.
ROLES = ("state", "token", "param", "scalar", "head")
# Inputs of a tiled (stateless, time-free) declaration: "row" is laid out [N, *dims] (one row
# per sample), "weight" [*dims], "index" [*dims] integers into a dim of a row (see "gather").
# "bits" sign codes packed 8 per byte along their last dim. A declaration with any of the
# tensor roles is tiled.
TILED_TENSOR_ROLES = ("row", "weight", "index", "bits")
TILED_ROLES = (*TILED_TENSOR_ROLES, "scalar")

UNARY = ("neg", "exp", "log", "sigmoid", "softplus", "silu", "tanh", "sqrt", "rsqrt", "abs",
         "relu")
BINARY = ("add", "sub", "mul", "div", "pow", "maximum", "minimum")
COMPARE = ("lt", "le", "gt", "ge", "eq", "ne")
REDUCE = ("sum", "max")
# rotations of pairs along a dim (``rk.rotate``) and a value given to both dims of each pair
# (``rk.pairs``); LAYOUTS: which entries pair up, (2i, 2i + 1) or (i, i + K/2)
PAIRED = ("rotate", "pairs")
LAYOUTS = ("interleaved", "halves")

# op -> number of arguments (None: see the op's own rule)
ARITY: dict[str, int] = {
    "input": 0, "const": 0, "where": 3, "contract": 2, "gather": 2, "rotate": 2, "pairs": 1,
    **{o: 1 for o in UNARY},
    **{o: 2 for o in BINARY}, **{o: 2 for o in COMPARE}, **{o: 1 for o in REDUCE},
}


@dataclass(frozen=True, eq=False)
class Node:
    """One value of a step: ``op(*args)`` with named ``dims`` and ``dtype``.

    attrs by op:
      input:    role, index (position among the declaration's inputs), name
      const:    value
      contract: over (the contracted dims)
      sum/max:  over (the reduced dims)
      gather:   dim (the dim of args[0] that args[1], an index value, selects along)
      rotate:   dim (rotated in pairs), pair (the angle's dim over the pairs, or None: one
                angle for every pair), layout; args (value, angle)
      pairs:    dim, pair, layout: args[0] along ``pair`` given to both dims of each pair
    Equality is identity; structural identity is the program's content hash.
    """

    op: str
    args: tuple["Node", ...] = ()
    dims: tuple[str, ...] = ()
    dtype: str = F32
    attrs: tuple[tuple[str, Any], ...] = ()
    loc: Loc | None = field(default=None, compare=False)

    def attr(self, key: str, default: Any = None) -> Any:
        for k, v in self.attrs:
            if k == key:
                return v
        return default

    @property
    def role(self) -> str | None:
        return self.attr("role") if self.op == "input" else None

    def __repr__(self) -> str:  # short, for debugging
        return f"Node({self.op}, dims={list(self.dims)})"


def toposort(roots: list[Node], stop: set[int] | frozenset = frozenset()) -> list[Node]:
    """All nodes reachable from ``roots``, each after its arguments (deterministic order).
    Nodes whose id is in ``stop`` are listed but not descended into."""
    seen: set[int] = set()
    order: list[Node] = []
    stack: list[tuple[Node, bool]] = [(r, False) for r in reversed(roots)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        if id(node) not in stop:
            stack.extend((a, False) for a in reversed(node.args) if id(a) not in seen)
    return order


def walk(node: Node) -> Iterator[Node]:
    yield from toposort([node])


def depends_on_state(nodes: list[Node]) -> dict[int, bool]:
    """For each node id (in a topological list), whether its value depends on the state."""
    dep: dict[int, bool] = {}
    for n in nodes:
        dep[id(n)] = n.role == "state" or any(dep[id(a)] for a in n.args)
    return dep


def expr_text(n: Node, max_depth: int = 6, depth: int = 0) -> str:
    """``n`` as one nested expression of input names and constants (for printing plans);
    reductions show the dims they reduce, gathers the dim they select along, and anything
    deeper than ``max_depth`` prints as "..."."""
    if n.op == "input":
        return n.attr("name")
    if n.op == "const":
        return repr(n.attr("value"))
    if depth > max_depth:
        return "..."
    extra = (f"[{', '.join(n.attr('over'))}]" if n.op in ("contract", "sum", "max") else
             f"[{n.attr('dim')}]" if n.op in ("gather", "rotate", "pairs") else "")
    args = ", ".join(expr_text(a, max_depth, depth + 1) for a in n.args)
    return f"{n.op}{extra}({args})"
