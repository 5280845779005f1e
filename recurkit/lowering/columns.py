"""Column separability: may a step (or its adjoint) run on a block of the state's last dim?

A recurrence such as Gated DeltaNet's ``S' = (I - b k k^T) e^g S + b k v^T`` acts on the key
side of its ``[K, V]`` state only: each column ``S[:, j]`` evolves on its own, given the
tokens. Its forward and backward steps can then run on a block of columns at a time, with the
state block (and every scratch state of the walk) small enough to stay in the first-level
cache, and the values summed over the columns (``dk = b dS u``, ``dq = S do``, ``dg``)
accumulated block by block.

``column_kinds`` decides this from the IR, for any step: each node is

  ``"col"``   it has the dim ``L``: one block computes the block's entries;
  ``"inv"``   it has not, and reads no ``"col"`` value: every block computes the same value;
  ``"part"``  a sum over ``L`` of ``"col"`` values, or linear in such sums with ``"inv"``
              coefficients: each block computes its share, and the shares add up to it.

The step separates when every node gets a kind: no column value reads a partial sum (a
column would need the whole sum) and partial sums flow only through linear ops (a product
of two sums, a ``max`` over ``L`` or a nonlinearity of a sum does not add up blockwise).
"""
from __future__ import annotations

from ..ir.node import Node, toposort

COL, INV, PART = "col", "inv", "part"
_LINEAR_UNARY = ("neg",)


def column_kinds(roots: list[Node], L: str, leaves: dict[int, str] | None = None,
                 stop: set[int] | None = None) -> dict[int, str] | None:
    """The kind of every node ``roots`` depend on, with respect to the dim ``L``, or None
    when the step does not separate along ``L``. ``leaves``: kinds fixed by the caller (by
    node id); ``stop``: ids of nodes taken as leaves (the feeds): ``"col"`` if they have
    ``L``, else ``"inv"``."""
    kinds: dict[int, str] = dict(leaves or {})
    stop = stop or set()
    for n in toposort(roots, stop=stop):
        if id(n) in kinds:
            continue
        if id(n) in stop or n.op in ("input", "const") or not n.args:
            kinds[id(n)] = COL if L in n.dims else INV
            continue
        k = _kind(n, [kinds[id(a)] for a in n.args], L)
        if k is None:
            return None
        kinds[id(n)] = k
    return kinds


def _kind(n: Node, args: list[str], L: str) -> str | None:
    has = L in n.dims
    if PART in args:
        if has:
            return None   # a column reading a partial sum needs the whole sum
        nparts = args.count(PART)
        if n.op in ("add", "sub") and nparts == len(args):
            return PART
        if n.op in _LINEAR_UNARY:
            return PART
        if n.op in ("mul", "contract") and nparts == 1 and COL not in args:
            return PART
        if n.op == "div" and args[0] == PART and args[1] == INV:
            return PART
        if n.op == "sum":
            return PART
        return None
    if has:
        return COL
    if COL not in args:
        return INV
    # no L left, a column value read: a reduction over L
    if n.op in ("contract", "sum") and L in (n.attr("over") or ()):
        return PART
    return None
