"""The two tile ops of the Triton chunk stages that are not one expression: ``shift`` along
the chunk (an exact 0/1 product) and ``invert_unit_lower`` (forward substitution)."""
from __future__ import annotations

from ...lowering.tile import TileOp


class ShiftInvert:
    """Mixin of the chunk stage generator (``chunk._StageGen``): uses its ``defs``,
    ``axes``/``var``, ``emit``, ``to``, ``op``, ``size``, ``block``, ``note_dot``, ``L``,
    ``n`` and ``C``."""

    def shift(self, op: TileOp, ind: int) -> None:
        """y[i] = x[i-1] (0 at i = 0), exactly: a 0/1 matrix product (one nonzero term per
        entry) for blocks, a masked reduction for a vector. The shift of a decay ratio
        exp(a_i - b_j) [i >= j] is the ratio of the shifted a, exp(a_(i-1) - b_j) [i > j]: the
        same numbers, without a [C, C*K] product when the ratio is per channel."""
        x, axis = op.args[0], op.attr("axis")
        src = self.defs.get(x)
        if axis == "i" and src is not None and src.op == "decay_ratio" and \
                src.attr("mask") == "i>=j":
            a = src.args[0]
            self.shift(TileOp(a + "_prev", "shift", (a,), self.axes[a], (("axis", "i"),)), ind)
            self.op(TileOp(op.out, "decay_ratio", (a + "_prev", src.args[1]), op.axes,
                           (("mask", "i>j"),)), ind)
            return
        have = self.axes[x]
        C = self.size(axis)
        rest = tuple(d for d in have if d != axis)
        if not rest:
            sel = (f"tl.where(tl.arange(0, {C})[:, None] - 1 == tl.arange(0, {C})[None, :], "
                   f"{self.var[x]}[None, :], 0.0)")
            self.emit(op.out, have, f"tl.reduce({sel}, 1, _add)", ind)
            return
        sh = (f"tl.where(tl.arange(0, {C})[:, None] - 1 == tl.arange(0, {C})[None, :], "
              "1.0, 0.0)")
        xv = self.to(x, (axis, *rest))
        if len(rest) == 1 and self.block(rest[0]) < 16:   # too narrow for tl.dot
            self.emit(op.out, (axis, *rest), f"tl.reduce({sh}[:, :, None] * {xv}[None, :, :], "
                      "1, _add)", ind)
        elif len(rest) == 1 and self.after_state_loop:
            self.shift_rows(op.out, x, axis, rest, ind)
        elif len(rest) == 1:
            self.emit(op.out, (axis, *rest), f"tl.dot({sh}, {xv}, input_precision=\"ieee\")",
                      ind)
            self.note_dot(C, self.block(rest[0]), C, ind)
        else:
            widths = [self.block(d) for d in rest]
            flat = 1
            for w in widths:
                flat *= w
            self.emit(op.out, (axis, *rest), f"tl.reshape(tl.dot({sh}, tl.reshape({xv}, "
                      f"({C}, {flat})), input_precision=\"ieee\"), ({C}, "
                      f"{', '.join(map(str, widths))}))", ind)
            self.note_dot(C, flat, C, ind)
        if tuple(op.axes) != (axis, *rest):
            self.emit(op.out, tuple(op.axes), self.to(op.out, tuple(op.axes)), ind)

    def shift_rows(self, out: str, x: str, axis: str, rest: tuple[str, ...], ind: int) -> None:
        """The shift of a [C, K] block one row at a time: row r of x (a masked sum, exact)
        into row r + 1 of the result. Used after a gradient stage's loop over blocks of V
        (``after_state_loop``), where the stage holds the most values: the 0/1 product's FMA
        operands (a [C, C] and a [C, K] block per thread's rows and columns, ~100 registers a
        thread at C = 16, K = 128, 8 warps) are what overflowed the registers there. Same
        numbers."""
        C, pad = self.size(axis), "    " * ind
        rows = f"tl.arange(0, {self.block(axis)})[:, None]"
        self.emit(out, (axis, *rest), self.full((axis, *rest)), ind)
        v = self.var[out]
        self.L += [f"{pad}for sr in range(0, {C - 1}):",
                   f"{pad}    srow = tl.reduce(tl.where({rows} == sr, "
                   f"{self.to(x, (axis, *rest))}, 0.0), 0, _add)",
                   f"{pad}    {v} = tl.where({rows} == sr + 1, srow[None, :], {v})"]

    def invert(self, op: TileOp, ind: int) -> None:
        """(I - L)^-1 by forward substitution, one row per iteration: row r is e_r plus
        L[r, :] times the rows above it (rows not yet solved are still 0)."""
        C, pad = self.C, "    " * ind
        Lm = self.to(op.args[0], ("i", "j"))
        self.n += 1
        v, lv = f"inv_{self.n}", f"lmat_{self.n}"
        rows = f"tl.arange(0, {C})[:, None]"
        self.L += [f"{pad}{lv} = {Lm}",
                   f"{pad}{v} = tl.full([{C}, {C}], 0.0, tl.float32)",
                   f"{pad}for r in range({C}):",
                   f"{pad}    lrow = tl.reduce(tl.where({rows} == r, {lv}, 0.0), 0, _add)",
                   f"{pad}    row = tl.reduce(lrow[:, None] * {v}, 0, _add) + "
                   f"tl.where(tl.arange(0, {C}) == r, 1.0, 0.0)",
                   f"{pad}    {v} = tl.where({rows} == r, row[None, :], {v})"]
        self.var[op.out], self.axes[op.out] = v, ("i", "j")
        if tuple(op.axes) != ("i", "j"):
            self.emit(op.out, tuple(op.axes), self.to(op.out, tuple(op.axes)), ind)

