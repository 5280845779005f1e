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


class SegmentPass:
    """Mixin of the chunk stage generator (``chunk._StageGen``) for a segmented state pass:
    ``self.seg`` = (segments, phase, M's ops, summed gates, M's variable); "local" runs every
    segment but the last from a zero state (the first from the initial state) and stores its
    final state (SL) and maps (GK, GV, MK); "joined" runs every segment from the state the
    join made (SL), writing the outputs and (the last) the final state. A reverse pass (the
    backward's) mirrors it: "first" and "last" in its own order, from the sequence's end;
    segment ``sg`` (in time order) keeps row ``sg - 1`` of SL, the state entering segment
    ``sg - 1`` once joined."""

    def segment_programs(self) -> list[str]:
        segs, phase = self.seg[:2]
        ns = segs - 1 if phase == "local" else segs
        back = " + 1" if phase == "local" and self.st.reverse else ""
        return [f"    nh = (pid // {ns}).to(tl.int64)", f"    sg = pid % {ns}{back}"]

    def segment_entry(self, carried: str, sd: tuple[str, ...], flags: dict) -> None:
        """After the initial state's load: the state entering a joined segment, a local
        kernel's maps started (M from I, gate sums from 0), and the loop over the segment's
        chunks (the sequence's split as evenly as they go)."""
        segs, phase, _, sums, _ = self.seg
        C, L = self.C, self.L
        mops, vm = None, None
        if phase == "joined":
            v0 = self.var[carried]
            if self.st.reverse:
                self.load(carried, "SL", f"nh * {segs - 1} + tl.minimum(sg, {segs - 2})", 1,
                          only=f"sg < {segs - 1}", times=segs - 1)
            else:
                self.load(carried, "SL", f"nh * {segs - 1} + tl.maximum(sg - 1, 0)", 1,
                          only="sg > 0", times=segs - 1)
            self.emit(carried, sd, f"{v0} + {self.var[carried]}", 1)
        else:
            mops = self.product_ops(carried) if flags.get("wy_product") else None
            if mops:
                self.emit(carried + SUFFIX, sd, f"tl.where({self.ar(sd[0], sd)} == "
                          f"{self.ar(sd[1], sd)}, 1.0, 0.0)", 1)
                vm = self.var[carried + SUFFIX]
            for g, ptr in (("log_gate_k", "GK"), ("log_gate_v", "GV")):   # gated forms
                if g in self.io.values and ptr[1] in flags.get("gate_sums", ""):
                    dims = tuple(self.io.values[g].dims)
                    sums.append((g, ptr, dims, f"gsum_{ptr}"))
                    L.append(f"    gsum_{ptr} = {self.full(dims)}")
        self.seg = (segs, phase, mops, sums, vm)
        L += [f"    per = ((eos - bos + {C - 1}) // {C} + {segs - 1}) // {segs}",
              f"    c_hi = tl.minimum(sg * per + per, (eos - bos + {C - 1}) // {C})"]
        L += ["    for cr in range(sg * per, c_hi):", "        c = sg * per + c_hi - 1 - cr"] \
            if self.st.reverse else ["    for c in range(sg * per, c_hi):"]

    def state_need(self, carried: str) -> set[str]:
        """The values the state's update reads, directly or not (the stage inputs loads
        read included)."""
        need = {carried}
        for op in reversed(self.st.ops):
            if op.out in need:
                need.update(op.args)
                if op.op == "load":
                    need.add(op.attr("value"))
        return need

    def state_only(self, carried: str, live: set[str], groups: dict):
        """(live, groups) of a local kernel: what the state's update needs."""
        need = self.state_need(carried)
        return live & need, {k: g for k, g in groups.items()
                             if any(op.out in need for op, _ in g)}

    def segment_step(self, carried: str, sd: tuple[str, ...], ind: int) -> None:
        """A local kernel's maps after a chunk: M's update, the chunk's summed log-gates."""
        _, _, mops, sums, vm = self.seg
        for op in mops or ():
            self.ensure([a for a in op.args if not a.endswith(SUFFIX)], ind)
            self.op(op, ind)
        if mops:
            self.L.append("    " * ind + f"{vm} = {self.to(carried + SUFFIX, sd)}")
            self.var[carried + SUFFIX] = vm
        for g, _, dims, acc in sums:
            self.ensure([g], ind)
            x = self.to(g, ("i", *dims))
            self.L.append("    " * ind + f"{acc} = {acc} + tl.reduce({x}, 0, _add)")

    def segment_exit(self, carried: str, sd: tuple[str, ...]) -> None:
        """A local kernel's stores: the segment's final state and its maps."""
        segs, _, mops, sums, _ = self.seg
        row = f"nh * {segs - 1} + sg{' - 1' if self.st.reverse else ''}"
        self.store(carried, "SL", row, 1, times=segs - 1)
        for _, ptr, dims, acc in sums:
            self.var[acc], self.axes[acc] = acc, dims
            self.store(acc, ptr, row, 1, times=segs - 1)
        if mops:
            self.axes[carried + SUFFIX] = sd
            self.store(carried + SUFFIX, "MK", row, 1, times=segs - 1)

    def product_ops(self, carried: str):
        """The ops carrying a WY form's M beside the state (``transition_ops``), or None
        where the local kernel cannot make it (K != V, or an op it does not read so)."""
        from ...lowering.analysis import analyze
        rec = analyze(self.tp.meta["program"])
        if rec.kdim is None or self.size(rec.kdim) != self.size(rec.vdim):
            return None
        axes = {**self.inputs, **{op.out: tuple(op.axes) for op in self.st.ops}}
        return transition_ops(self.st.ops, carried, self.state_need(carried), rec.vdim,
                              lambda a: axes.get(a, ()))
