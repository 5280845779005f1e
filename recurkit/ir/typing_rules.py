"""The semantic rules: what dims and dtype each op produces, and what it refuses.

One function, used by the tracer (to type new nodes and explain refusals) and by the verifier
(to re-check a program, e.g. one read back from JSON). Broadcasting is by dim name: the result
of an elementwise op carries the union of its operands' dims, in canonical order.
"""
from __future__ import annotations

from typing import Sequence

from .node import ARITY, BINARY, BOOL, COMPARE, F32, INDEX, LAYOUTS, REDUCE, UNARY


class TypeRule(Exception):
    """A refused op: ``what`` went wrong, ``hint`` says what to change."""

    def __init__(self, what: str, hint: str | None = None):
        super().__init__(what)
        self.what, self.hint = what, hint


def _canon(dims, order: Sequence[str]) -> tuple[str, ...]:
    return tuple(sorted(set(dims), key=list(order).index))


def infer(op: str, args: Sequence[tuple[tuple[str, ...], str]], attrs: dict,
          order: Sequence[str]) -> tuple[tuple[str, ...], str]:
    """Result (dims, dtype) of ``op`` applied to args given as (dims, dtype) pairs."""
    if op not in ARITY:
        raise TypeRule(f"unknown op '{op}'")
    if len(args) != ARITY[op]:
        raise TypeRule(f"op '{op}' takes {ARITY[op]} arguments, got {len(args)}")
    for d, _ in args:
        for name in d:
            if name not in order:
                raise TypeRule(f"undeclared dim '{name}'")
    if op == "gather":
        (dx, tx), (di, ti) = args
        dim = attrs.get("dim")
        if ti != INDEX:
            raise TypeRule("rk.gather: the second argument must be an rk.Index input",
                           "declare the indices as idx: rk.Index['O'] and write "
                           "rk.gather(x, idx)")
        if tx != F32:
            raise TypeRule(f"rk.gather: cannot gather from a {tx} value")
        if dim not in dx:
            raise TypeRule(f"rk.gather along dim '{dim}', but the value has dims {_show(dx)}")
        rest = [d for d in dx if d != dim]
        clash = [d for d in di if d in rest or d == dim]
        if clash:
            raise TypeRule(f"rk.gather: the indices' dim '{clash[0]}' is also a dim of the "
                           f"gathered value {_show(dx)}",
                           "the result takes the indices' dims in place of the gathered dim, "
                           "so they must be new dims")
        return _canon(set(rest) | set(di), order), F32
    if op in ("rotate", "pairs"):
        return _paired(op, args, attrs, order)
    if op in UNARY:
        (d, t), = args
        _need_float(op, t)
        return d, F32
    if op in BINARY or op in COMPARE:
        (da, ta), (db, tb) = args
        _need_float(op, ta)
        _need_float(op, tb)
        return _canon(set(da) | set(db), order), (BOOL if op in COMPARE else F32)
    if op == "where":
        (dc, tc), (da, ta), (db, tb) = args
        if tc != BOOL:
            raise TypeRule("rk.where: the condition must be a comparison (bool), got a "
                           f"{tc} value", "write rk.where(x > 0, a, b)")
        _need_float("where", ta)
        _need_float("where", tb)
        return _canon(set(dc) | set(da) | set(db), order), F32
    if op == "contract":
        (da, ta), (db, tb) = args
        _need_float("@", ta)
        _need_float("@", tb)
        over = tuple(attrs["over"])
        shared = set(da) & set(db)
        if not over:
            raise TypeRule(
                f"contraction over no dims: the operands have dims {_show(da)} and {_show(db)},"
                " which share none",
                "name the same dim on both sides (dims match by name), or use rk.outer(a, b) "
                "for an outer product")
        if set(over) != shared:
            raise TypeRule(f"contraction over {_show(over)} but the operands share "
                           f"{_show(_canon(shared, order))}")
        return _canon((set(da) | set(db)) - shared, order), F32
    if op in REDUCE:
        (d, t), = args
        _need_float(op, t)
        over = tuple(attrs["over"])
        missing = [x for x in over if x not in d]
        if missing:
            raise TypeRule(f"rk.{op} over dim '{missing[0]}', but the value has dims {_show(d)}",
                           f"reduce over one of {_show(d)}" if d else
                           "the value is already a scalar: drop the reduction")
        return tuple(x for x in d if x not in over), F32
    if op in ("input", "const"):
        raise TypeRule(f"'{op}' nodes are typed by the program, not by a rule")
    raise TypeRule(f"no typing rule for op '{op}'")  # pragma: no cover - table and rules agree


def _paired(op: str, args, attrs: dict, order) -> tuple[tuple[str, ...], str]:
    """rk.rotate(x, angle): x's dims, x carrying the rotated dim and the angle at most the
    pair dim besides x's; rk.pairs(x): x's dims with the pair dim replaced by the paired one."""
    dim, pair, layout = attrs.get("dim"), attrs.get("pair"), attrs.get("layout")
    if layout not in LAYOUTS:
        raise TypeRule(f"rk.{op}: layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    for a in args:
        _need_float(op, a[1])
    if dim not in order or (pair is not None and pair not in order):
        raise TypeRule(f"rk.{op}: undeclared dim '{dim if dim not in order else pair}'")
    if pair == dim:
        raise TypeRule(f"rk.{op}: the pair dim and the paired dim are both '{dim}'",
                       "declare the angles over a dim of their own, of size K / 2")
    dx = args[0][0]
    if op == "pairs":
        if pair not in dx or dim in dx:
            raise TypeRule(f"rk.pairs: the value has dims {_show(dx)}; it needs the pair dim "
                           f"'{pair}' and not the paired dim '{dim}'")
        return _canon((set(dx) - {pair}) | {dim}, order), F32
    da = args[1][0]
    if dim not in dx:
        raise TypeRule(f"rk.rotate along '{dim}', but the value has dims {_show(dx)}")
    if dim in da:
        raise TypeRule(f"rk.rotate: the angle has the rotated dim '{dim}'",
                       f"give one angle per pair: a dim of its own of size {dim} / 2")
    extra = [d for d in da if d not in dx and d != pair]
    if extra or (pair is not None and pair in dx):
        raise TypeRule(f"rk.rotate: the angle has dims {_show(da)}; besides the value's "
                       f"{_show(dx)} it may carry only the pair dim" +
                       (f" '{pair}'" if pair else ""))
    return dx, F32


def _need_float(op: str, dtype: str) -> None:
    if dtype == INDEX:
        raise TypeRule(f"'{op}' of an rk.Index input: indices only select, through rk.gather",
                       "write rk.gather(x, idx) to read x at the indices")
    if dtype != F32:
        raise TypeRule(f"'{op}' needs a numeric value, got a {dtype} comparison result",
                       "use rk.where(cond, a, b) to turn a comparison into numbers")


def _show(dims) -> str:
    return "[" + ", ".join(dims) + "]"
