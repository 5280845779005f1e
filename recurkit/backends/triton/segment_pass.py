"""The local kernel of a segmented state pass (``segments``): besides the state, it makes each
segment's map, so that the join needs nothing from the host.

- Gated forms: the segment's summed log-gates (``log_gate_k``, ``log_gate_v``: the map is
  their exponentials on the state's two sides), stored as GK / GV.
- WY forms: ``M``, the product of the segment's [K, K] transitions, carried beside the state
  by the state's own ops (``transition_ops``) from the identity, stored as MK. A state
  pass's ops are linear in the state and the write terms; with the write terms dropped and
  the state replaced by ``I`` they make ``M``. M has the state's shape where K = V (its
  columns split over programs as the state's); elsewhere, or where an op on the state's
  path is not a contraction, sum or gate product, the join takes M from the transition
  declaration (``segments.Joiner``).
"""
from __future__ import annotations

from dataclasses import replace

from ...lowering.tile import TileOp

SUFFIX = "~M"


def transition_ops(ops: list[TileOp], carried: str, need: set[str], vdim: str,
                   axes_of) -> list[TileOp] | None:
    """The ops that make ``M`` from the state pass's ``ops`` (those in ``need``, the state's
    update): each op on the state's path again, over the M values (named ``<out>~M``), with
    a term that does not depend on the state (a write) dropped from sums; None where an op
    does not take that reading (a product with a value-side factor, a state subtracted from
    a write, anything but a rename, contraction, sum or product)."""
    dep, m, out = {carried}, {carried: carried + SUFFIX}, []
    for op in ops:
        if op.op in ("zeros", "load") or op.out not in need:
            continue
        on = [a for a in op.args if a in dep]
        if not on:
            continue   # not on the state's path
        name = carried + SUFFIX if op.out == carried else op.out + SUFFIX
        fn = op.attr("ir_op") if op.op == "ir" else op.op
        if fn == "rename" or (len(on) == 1 and (fn == "add" or (fn == "sub" and
                                                               op.args[0] in dep))):
            if tuple(axes_of(on[0])) != tuple(op.axes):
                return None   # a broadcast: not a plain drop of the write term
            new = TileOp(name, "rename", (m[on[0]],), op.axes)   # a write term dropped
        elif fn in ("add", "sub") and len(on) == 2:
            new = replace(op, out=name, args=tuple(m[a] for a in op.args))
        elif fn in ("contract", "mul") and len(on) == 1:
            other = [a for a in op.args if a not in dep]
            if fn == "mul" and any(vdim in axes_of(a) for a in other):
                return None   # a value-side factor: not part of M
            new = replace(op, out=name, args=tuple(m.get(a, a) if a in dep else a
                                                   for a in op.args))
        else:
            return None
        dep.add(op.out)
        m[op.out] = name
        out.append(new)
    return out if out and out[-1].out == carried + SUFFIX else None
