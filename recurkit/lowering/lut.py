"""The LUT form: a tiled declaration that contracts sign codes with a row, as table look-ups.

A declaration with an ``rk.Bits`` input whose output is

    y[n, o] = sum_{p, g} w[p, o, g] * sum_e c[p, o, g, e] * x[n, g, e]      (c in {-1, +1})

(ShiftAddLLM's binary-coding matmul: p the bit-planes, g the groups of the input dim, e the
positions in a group; each of the p, g dims may be absent) is lowered here to the LUT form:
for every 8 consecutive positions e of a row, the 256 signed sums ``sum_j +-x[8s + j]`` are
built once per (sample, group); each code byte of ``c`` then answers 8 products with one
look-up, the look-ups are summed per (p, o, g), scaled by ``w`` and summed. ``w`` is any
expression of weights and scalars (e.g. alphas times a scale): it is evaluated once per call
on the host, like a recurrence's prologue, and the kernel reads its values.

The names are found by matching the IR, not fixed: ``LutPlan`` records which declared dim
plays each part. What does not match is refused with a LoweringError naming the line.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir.node import Node, expr_text, toposort
from ..ir.program import Program
from .forms import LoweringError


@dataclass(frozen=True, eq=False)
class LutPlan:
    """The lowered LUT declaration. Dims are the program's names: ``out`` the output dim (o),
    ``plane`` the summed dim of the codes that the row lacks (p, or None), ``group`` the
    row's dim besides the packed one (g, or None), ``packed`` the codes' last dim (e).
    ``scale`` is the weight expression ``w`` (dims within out, plane, group)."""

    program: Program
    row: str
    codes: str
    packed: str
    out: str
    plane: str | None
    group: str | None
    scale: Node

    @property
    def scale_dims(self) -> tuple[str, ...]:
        return self.scale.dims

    def extents(self, sizes: dict[str, int]) -> tuple[int, int, int, int]:
        """(groups, outputs, planes, packed positions) at ``sizes``; an absent dim counts 1."""
        return (sizes[self.group] if self.group else 1, sizes[self.out],
                sizes[self.plane] if self.plane else 1, sizes[self.packed])

    @property
    def grad_inputs(self) -> list[str]:
        """The float inputs that get gradients: the row and every weight."""
        return [s.name for s in self.program.call_inputs if s.role in ("row", "weight")]

    def __str__(self) -> str:
        summed = [d for d in (self.plane, self.group) if d]
        over = f"sum over {', '.join(summed)} of " if summed else ""
        scale = f"w[{', '.join(self.scale_dims)}]" if self.scale_dims else "w"
        return (f"lut form of {self.program.name}: y[n, {self.out}] = {over}{scale} * "
                f"sum over {self.packed} of {self.codes} * {self.row}\n"
                f"  tables: 256 signed sums per 8 {self.packed} of {self.row}, per sample"
                f"{' and ' + self.group if self.group else ''}\n"
                f"  look-ups: one per byte of {self.codes}\n"
                f"  w = {expr_text(self.scale)}")


def _err(p: Program, n: Node | None, what: str, hint: str) -> LoweringError:
    at = f" (line {n.loc.line})" if n is not None and n.loc else ""
    return LoweringError(f"{p.name}{at}: {what}; {hint}")


def _input(n: Node, role: str) -> bool:
    return n.op == "input" and n.attr("role") == role


def _split_product(n: Node, pred) -> tuple[Node, Node] | None:
    """(a, b) for ``n = a * b`` (either order) with ``pred(a)``."""
    if n.op != "mul":
        return None
    a, b = n.args
    if pred(a):
        return a, b
    if pred(b):
        return b, a
    return None


def has_bits(p: Program) -> bool:
    return any(s.role == "bits" for s in p.inputs)


def lower_lut(p: Program) -> LutPlan:
    """Match ``p`` against the LUT form (see the module's docstring)."""
    hint = ("write y = rk.sum(w * rk.sum(codes * x, 'E'), (plane and group dims)) with codes "
            "an rk.Bits input packed along E, x an rk.Row carrying E, and w weights/scalars")
    y = p.output

    def is_inner(n: Node) -> bool:   # sum(codes * ...)
        return n.op == "sum" and n.args[0].op == "mul" and any(
            _input(a, "bits") for a in n.args[0].args)
    inner = scale = None
    over, body = set(), y
    if y.op == "sum" and not is_inner(y):
        over, body = set(y.attr("over")), y.args[0]
    split = _split_product(body, is_inner)
    if is_inner(body):
        inner = body
    elif split is not None:
        inner, scale = split
    if inner is None:
        raise _err(p, y, "a declaration with rk.Bits codes must contract them with a row",
                   hint)
    pair = _split_product(inner.args[0], lambda a: _input(a, "bits"))
    if pair is None or not _input(pair[1], "row"):
        raise _err(p, inner, "the inner rk.sum is not (codes * row)", hint)
    codes, row = pair
    cspec, rspec = p.inputs[codes.attr("index")], p.inputs[row.attr("index")]
    packed = cspec.dims[-1] if cspec.dims else None
    if tuple(inner.attr("over")) != (packed,):
        raise _err(p, inner, f"the inner rk.sum reduces {list(inner.attr('over'))}, the codes "
                   f"are packed along {packed!r}", f"sum over exactly {packed!r}")
    if packed not in rspec.dims:
        raise _err(p, inner, f"row '{rspec.name}' lacks the packed dim {packed!r}", hint)
    groups = [d for d in rspec.dims if d != packed]
    if len(groups) > 1 or any(d not in cspec.dims for d in groups):
        raise _err(p, row, f"row '{rspec.name}' has dims {list(rspec.dims)}: the LUT form "
                   "takes the packed dim and at most one group dim that the codes share", hint)
    rest = [d for d in cspec.dims if d not in rspec.dims]
    outs = [d for d in rest if d not in over]
    planes = [d for d in rest if d in over]
    if len(outs) != 1 or len(planes) > 1:
        raise _err(p, y, f"the codes' dims {list(cspec.dims)} leave output dims {outs} and "
                   f"plane dims {planes}", "the LUT form has one output dim and at most one "
                   "summed plane dim")
    if y.dims != (outs[0],) or over != set(planes) | set(groups):
        raise _err(p, y, f"the output has dims {list(y.dims)} after summing {sorted(over)}",
                   f"sum over the plane and group dims {planes + groups}, keeping "
                   f"{outs[0]!r}")
    if scale is None:
        scale = Node("const", (), (), "f32", (("value", 1.0),))   # no scale: 1
    for n in toposort([scale]):
        if n.op == "input" and n.attr("role") not in ("weight", "scalar"):
            raise _err(p, n, f"the scale reads {n.attr('role')} '{n.attr('name')}'",
                       "scale the look-ups by weights and scalars only")
        if n.op in ("gather", "sum", "max", "contract"):
            raise _err(p, n, f"'{n.op}' in the scale", "the scale is elementwise")
    return LutPlan(p, rspec.name, cspec.name, packed, outs[0],
                   planes[0] if planes else None, groups[0] if groups else None, scale)
