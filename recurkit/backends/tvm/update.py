"""The in-place update pass of the sequential TVM kernel (a mixin of ``tvm.sequential._Gen``).

The pass writes S' over S and accumulates, in the same sweep, the reads of the new state by a
state-free value (``q^T S'``) and the next token's reads of the old one (``pre``: ``k^T S``).
Where the reads are vectors over the state's last dim L alone, each column of the state is
updated and read independently of the others, and the pass runs in *column blocks*: one block
of L at a time over every row, its reads accumulating in registers, the row factors of its
products (``beta * k[i_K]``) computed once per token into a buffer over the rows.
"""
from __future__ import annotations

import re

from ...ir.node import Node
from .build import vector_lanes


def _f(v: float) -> str:
    return f"T.float32({float(v)!r})"


class UpdatePass:
    colblock: dict | None = None   # set while a column-blocked pass is generated
    hb_count = 0                   # row-factor buffers named so far

    def _fused(self) -> list[Node]:
        """Contractions of the new state with a state-free value (q^T S'): accumulated in the
        pass that writes S' (in place), instead of a second pass over it."""
        p, sd = self.p, self.p.state.dims
        if not self.in_place or not sd:
            return []
        return [n for n in self.step if n.op == "contract" and id(n) in self.mat and any(
                a is p.new_state for a in n.args) and not any(
                self.dep[id(a)] for a in n.args if a is not p.new_state) and
                sd[-1] not in n.attr("over")]

    def _blocks(self, fused: list[Node], pre: list[Node], reps: int = 1
                ) -> tuple[int, list[Node]] | None:
        """(width, accumulators) when the in-place update pass runs in column blocks: the
        state's last dim L cut into blocks of ``block`` columns, each block updated over
        every row while the pass's reads of it (q^T S', and k^T S for the next token)
        accumulate in registers. Every accumulator must be a vector over L alone (a state
        column is then updated and read independently of the others)."""
        sd, w = self.p.state.dims, self.knobs["block"]
        if self.tdim is not None or not self.in_place or len(sd) < 2 or not w:
            return None
        L = sd[-1]
        accs = fused + list(pre)
        # narrower blocks where L's size needs them, or where the accumulators would not
        # fit in 8 of the 16 vector registers (a group of tokens: in a quarter of the
        # registers, as each token's row of values takes as many again)
        budget = 64 if reps == 1 else 4 * vector_lanes()
        while w > 8 and (self.sizes[L] % w or w * len(accs) * reps > budget):
            w //= 2
        if self.sizes[L] <= w or self.sizes[L] % w or w > self.knobs["vectorize"] or \
                any(tuple(n.dims) != (L,) for n in accs):
            return None
        return w, accs

    def _acc(self, n: Node) -> str:
        return f"{self.names[id(n)]}_blk"

    def _update_pass(self, pre: list[Node], ind: int, lines: list[str],
                     reps: list[tuple[str, str]] | None = None) -> set[int]:
        """The pass writing S' over S, with the fused reads of S' and the next token's
        reads of S (``pre``) accumulated in it; returns the ids of the fused nodes. Buffers
        it needs go to ``self.late_allocs``. ``reps``: the tokens (``tokens.TokenFusion``)
        whose updates this one pass applies in turn to each entry of S, as (token, name
        suffix); the current token alone by default."""
        p, sd = self.p, self.p.state.dims
        e = self.env(sd)
        L = sd[-1] if sd else None
        reps = reps or [(self.tvar, "")]
        fused = self._fused()
        blocks = self._blocks(fused, pre, len(reps))
        if blocks:
            w, _ = blocks
            e[L] = f"(vb * {w} + i_{L})"
            self.colblock = {"L": L, "outer": sd[:-1], "seen": {}, "bufs": []}
        # the column-blocked layout: S is one block; row factors still hoisted per token
        hoist = not blocks and getattr(self, "cb", None) is not None and len(sd) >= 2
        if hoist:
            self.colblock = {"L": L, "outer": sd[:-1], "seen": {}, "bufs": []}
        body: list[str] = []
        targets = []   # (node, the buffer it accumulates in, the block's accumulator)
        for tv, sfx in reps:
            with self.rep(tv, sfx):
                new_s = self.expr_inline(p.new_state, e)
                self.names[id(p.new_state)] = "S"
                self.mat.add(id(p.new_state))
                body.append(f"S[{self.idx(sd, e)}] = {new_s}")

                def target(n: Node, buf: str) -> str:   # a block's accumulator, or the buffer
                    acc = f"{self._acc(n)}{blocks[0] if blocks else ''}"   # per width
                    targets.append((n, buf, acc))
                    return f"{acc}[i_{L}]" if blocks else \
                        f"{buf}[{self.idx(n.dims, e)}]"
                for n in fused:
                    free = next(a for a in n.args if a is not p.new_state)
                    tgt = target(n, self.names[id(n)])
                    body.append(f"{tgt} = {tgt} + {self.expr(free, e)} * S[{self.idx(sd, e)}]")
                if self.out_in_pass():   # this token's output from its S' entry
                    body.append(self.out_store(tv, e, inline=True))
                for n in pre:
                    tgt = target(n, f"{self.names[id(n)]}_next")
                    saved, self.tvar = self.tvar, "tn"
                    body.append(f"{tgt} = {tgt} + {self._product(n, e)}")
                    self.tvar = saved
        width = blocks[0] if blocks else self.sizes[L]
        if self.tdim is None and width <= self.knobs["vectorize"]:
            body = self._in_register(body, f"S[{self.idx(sd, e)}]", L, width)
        if not blocks:
            if hoist:
                hoisted, self.colblock = self.colblock["bufs"], None
                self._emit_hoisted(hoisted, ind, lines)
            for n, buf, _ in targets:
                lines += self.loops(n.dims, [f"{buf}[{self.idx(n.dims, self.env(n.dims))}]"
                                             f" = {_f(0.0)}"], ind)
            lines += self.loops(sd, body, ind)
            return {id(n) for n in fused}
        hoisted, self.colblock = self.colblock["bufs"], None
        self._emit_hoisted(hoisted, ind, lines)
        self.late_allocs += [f"{acc} = T.alloc_buffer(({w},), \"float32\"{self.scope})"
                             for _, _, acc in targets]   # the block's accumulators
        pad = "    " * (ind + 1)
        vec = f"T.vectorized({w})"
        body, tiles = self._column_tiles(body, L, sd[:-1], w)
        lines.append(f"{'    ' * ind}for vb in T.serial({self.sizes[L] // w}):")
        head = [f"{acc}[i_{L}] = {_f(0.0)}" for _, _, acc in targets] + tiles
        if head:   # the block's accumulators zeroed, its tiles loaded
            lines.append(f"{pad}for i_{L} in {vec}:")
            lines += [f"{pad}    {h}" for h in head]
        lines += self.loops(sd[:-1], [f"for i_{L} in {vec}:"] + ["    " + b for b in body],
                            ind + 1, vector_last=False)
        if targets:
            lines.append(f"{pad}for i_{L} in {vec}:")
            lines += [f"{pad}    {buf}[{e[L]}] = {acc}[i_{L}]" for _, buf, acc in targets]
        return {id(n) for n in fused}

    def _column_tiles(self, body: list[str], L: str, outer, w: int
                      ) -> tuple[list[str], list[str]]:
        """(body, loads): the call tensors' values that a block's pass reads at every row
        (``v`` at the block's columns, per token) loaded once per block into small buffers
        (``CT*``, registers) instead of once per row: LLVM cannot hoist them itself past
        the stores to S, which may alias them as far as it knows."""
        rows = [f"i_{d}" for d in outer]
        tiles: dict[str, str] = {}

        def tile(m) -> str:
            text = m.group(0)
            if any(re.search(rf"\b{r}\b", text) for r in rows) or f"i_{L}" not in text:
                return text
            if text not in tiles:
                tiles[text] = f"CT{self.hb_count + len(tiles)}"
            return f"{tiles[text]}[i_{L}]"
        pat = re.compile(r'T\.Cast\("float32", X\d+\[[^\[\]]*\]\)|X\d+\[[^\[\]]*\]')
        out = [pat.sub(tile, line) for line in body]
        self.hb_count += len(tiles)
        self.late_allocs += [f"{t} = T.alloc_buffer(({w},), \"float32\"{self.scope})"
                             for t in tiles.values()]
        return out, [f"{t}[i_{L}] = {text}" for text, t in tiles.items()]

    def _in_register(self, body: list[str], entry: str, L: str, width: int) -> list[str]:
        """``body`` on a copy of the state's entries in a small buffer of the vector's width
        (``SR``, on the stack: registers), loaded before and stored after: the kernel's
        buffers may alias as far as LLVM knows, so updates written to S directly are each
        stored, and the inputs reloaded after them; a group of tokens then stores once."""
        name = f"SR{width}"
        reg = f"{name}[i_{L}]"
        out = [line.replace(entry, reg) for line in body]
        if any("S[" in line.replace(reg, "") for line in out):
            return body   # the state read at other entries than this one: left in place
        self.late_allocs.append(f"{name} = T.alloc_buffer(({width},), \"float32\"{self.scope})")
        return [f"{reg} = {entry}"] + out + [f"{entry} = {reg}"]

    def _emit_hoisted(self, hoisted, ind: int, lines: list[str]) -> None:
        self.hb_count += len(hoisted)   # names unique over the kernel's passes
        for name, dims, val in hoisted:   # row factors, once per token
            self.late_allocs.append(f"{name} = T.alloc_buffer(({self.local_shape(dims)},), "
                                    f"\"float32\"{self.scope})")
            lines += self.loops(dims, [f"{name}[{self.idx(dims, self.env(dims))}] = {val}"], ind)

    def _chain(self, fs: list[Node], env: dict[str, str]) -> str:
        """The product of ``fs`` in order. In a column-blocked pass, a leading run of factors
        without the blocked dim that varies by row (beta * k[i_K]) is computed once per token
        into a buffer over the rows, instead of once per row and block."""
        k, h = 0, self.colblock
        if h is not None:
            while k < len(fs) and h["L"] not in fs[k].dims and fs[k] is not self.state:
                k += 1
            dims = {d for f in fs[:k] for d in f.dims}
            if k < 2 or not dims or not dims <= set(h["outer"]):
                k = 0
        if k:
            dd = tuple(d for d in h["outer"] if d in dims)
            self.colblock = None   # the hoisted value's own factors: inline
            val = self._chain(fs[:k], self.env(dd))
            self.colblock = h
            name = h["seen"].setdefault(val, f"HB{self.hb_count + len(h['seen'])}")
            if (name, dd, val) not in h["bufs"]:
                h["bufs"].append((name, dd, val))
            out, rest = f"{name}[{self.idx(dd, env)}]", fs[k:]
        else:
            out, rest = self.expr(fs[0], env), fs[1:]
        for f in rest:
            out = f"({out} * {self.expr(f, env)})"
        return out
