"""The tiled form: a stateless declaration over rows, and its backward derived from the IR.

A tiled declaration computes, for every sample n and every output element m (the output's dims
flattened), one expression of the inputs at (n, m): rows read directly carry the output's
dims; rows read through ``rk.gather`` have one dim that the index selects along; weights carry
the output's dims; scalars are numbers; an ``rk.sum`` reduces a subexpression of rows that
carry the output's dims plus the reduced ones (e.g. GroupSum). That makes the forward one
elementwise kernel with, per reduction, a loop over the reduced positions r.

The backward is reverse-mode differentiation of the same node DAG, done symbolically here so
every backend renders it like a forward: the cotangent of each node is a new IR expression of
the forward nodes and the output's cotangent ``dy``. It splits into three passes:

  rows     per (n, m): the gradient of each directly read row, and each gather's
           contribution ``G[n, s, m]`` to the row it reads;
  columns  per m: the weights' gradients, a sum over n of their cotangents (no atomics);
  inverse  per (n, i) of a gathered row: the sum of ``G[n, s, m]`` over the (s, m) whose index
           is i, through an inverse (CSR) index of the indices (no atomics).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..ir.node import BINARY, COMPARE, INDEX, UNARY, Node, expr_text, toposort
from ..ir.program import Program
from .forms import LoweringError
from .vjp import Vjp

ELEMENTWISE = set(UNARY) | set(BINARY) | set(COMPARE) | {"where"}


def reductions(roots: list[Node]) -> list[Node]:
    """The sum nodes behind ``roots``."""
    return [n for n in toposort(roots) if n.op == "sum"]


@dataclass(frozen=True)
class Scatter:
    """One gather's share of a row's gradient: ``cot`` [n, m] goes to ``row``[n, index[m]]."""

    gather: Node
    row: str
    index: str
    cot: Node


@dataclass(frozen=True, eq=False)
class TiledPlan:
    """The lowered tiled declaration: the forward and its derived backward expressions."""

    program: Program
    dy: Node                                   # the output's cotangent, an input [N, *out]
    row_grads: dict[str, Node] = field(default_factory=dict)      # rows read directly
    weight_grads: dict[str, Node] = field(default_factory=dict)   # summed over n
    scatters: tuple[Scatter, ...] = ()         # rows read through gathers

    @property
    def out_dims(self) -> tuple[str, ...]:
        return self.program.output.dims

    @property
    def grad_inputs(self) -> list[str]:
        """The float tensor inputs (rows, weights) in declaration order: the gradients'."""
        return [s.name for s in self.program.call_inputs if s.role in ("row", "weight")]

    def gathered_rows(self) -> dict[str, list[Scatter]]:
        out: dict[str, list[Scatter]] = {}
        for s in self.scatters:
            out.setdefault(s.row, []).append(s)
        return out

    def __str__(self) -> str:
        lines = [f"tiled form of {self.program.name}: out [N, {', '.join(self.out_dims)}]"]
        for kind, d in (("row", self.row_grads), ("weight", self.weight_grads)):
            for name, node in d.items():
                lines.append(f"  d{name} ({kind}) = {expr_text(node)}")
        for s in self.scatters:
            lines.append(f"  d{s.row}[n, {s.index}[m]] += {expr_text(s.cot)}")
        return "\n".join(lines)


def check_tiled(p: Program) -> None:
    """Refuse (LoweringError, naming the value) what the tiled form cannot compute."""
    out = p.output.dims
    where = f"{p.name}"

    def bad(n: Node, what: str, hint: str) -> LoweringError:
        at = f" (line {n.loc.line})" if n.loc else ""
        return LoweringError(f"{where}{at}: {what}; {hint}")

    wide_of: dict[int, tuple[str, ...]] = {}   # node -> the wide dims of the sum it feeds
    for n in reversed(p.nodes()):
        if n.op == "sum":
            wide = n.args[0].dims
            if n.dims != out:
                raise bad(n, f"rk.sum leaves dims {list(n.dims)}, the output has {list(out)}",
                          "a tiled op reduces to exactly the output's dims")
            if id(n) in wide_of:
                raise bad(n, "a reduction inside a reduction", "reduce once, over every dim")
            wide_of[id(n.args[0])] = wide
        elif id(n) in wide_of and n.op != "input":
            for a in n.args:
                if a.dims:
                    wide_of.setdefault(id(a), wide_of[id(n)])
    for n in p.nodes():
        wide = wide_of.get(id(n))
        if n.op == "input":
            role = n.attr("role")
            if role == "weight" and n.dims != out:
                raise bad(n, f"weight '{n.attr('name')}' has dims {list(n.dims)}, the output "
                          f"{list(out)}", "a tiled op's weights carry exactly the output's dims")
            if wide is not None and role != "row":
                raise bad(n, f"{role} '{n.attr('name')}' is read inside a reduction",
                          "reductions of a tiled op read rows carrying the reduced dims")
            continue
        if n.op == "const":
            continue
        if n.op == "max":
            raise bad(n, "rk.max in a tiled op", "tiled ops reduce with rk.sum")
        if n.op == "gather":
            src = n.args[0]
            if src.op != "input" or src.attr("role") != "row" or len(src.dims) != 1:
                raise bad(n, "rk.gather reads a computed value or a row with several dims",
                          "gather directly from an rk.Row input with one dim")
            if n.dims != out or wide is not None:
                raise bad(n, f"a gather gives dims {list(n.dims)}, the output {list(out)}",
                          "index with an rk.Index carrying the output's dims, outside "
                          "reductions")
            continue
        if n.op != "sum" and n.op not in ELEMENTWISE:
            raise bad(n, f"'{n.op}' is not elementwise",
                      "tiled ops are elementwise over the output (plus gathers and sums)")
        level = wide if wide is not None else out
        if n.op != "sum" and n.dims not in ((), level):
            raise bad(n, f"a value has dims {list(n.dims)}, the output {list(out)}",
                      "every value of a tiled op carries the output's dims (inside an "
                      "rk.sum: the output's dims and the reduced ones)")
        for a in ([] if n.op == "sum" else n.args):
            if a.op == "input" and a.attr("role") == "row" and a.dims != level:
                raise bad(n, f"row '{a.attr('name')}' with dims {list(a.dims)} is used "
                          "directly", "read rows with other dims through rk.gather or rk.sum")
            if a.dims and a.dims != level:
                raise bad(n, f"a value with dims {list(a.dims)} meets one with "
                          f"{list(level)}", "inside an rk.sum use only values that carry "
                          "the reduced dims (or none)")


def lower_tiled(p: Program) -> TiledPlan:
    """The tiled form of ``p``: checks, then derives the backward expressions."""
    if not p.is_tiled:
        raise LoweringError(f"{p.name} is a recurrence, not a tiled declaration")
    check_tiled(p)
    adj = Vjp(p, reduce=False)
    dy = Node("input", (), p.output.dims, "f32",
              (("role", "row"), ("index", len(p.inputs)), ("name", "dy")))
    cot: dict[int, Node] = {id(p.output): dy}
    nodes = toposort([p.output])
    for n in reversed(nodes):
        g = cot.get(id(n))
        if g is None or n.op in ("input", "const", "gather"):
            continue
        for a, ga in zip(n.args, adj.vjp(n, g)):
            if ga is None or a.op == "const" or a.dtype == INDEX:
                continue
            if a.op == "input" and a.attr("role") == "scalar":
                continue
            prev = cot.get(id(a))
            cot[id(a)] = ga if prev is None else adj.op("add", prev, ga)
    row_grads, weight_grads, scatters = {}, {}, []
    for n in nodes:
        if n.op == "input" and n.attr("role") in ("row", "weight") and id(n) in cot:
            (row_grads if n.attr("role") == "row" else weight_grads)[n.attr("name")] = cot[id(n)]
        elif n.op == "gather" and id(n) in cot:
            scatters.append(Scatter(n, n.args[0].attr("name"), n.args[1].attr("name"),
                                    cot[id(n)]))
    return TiledPlan(p, dy, row_grads, weight_grads, tuple(scatters))
