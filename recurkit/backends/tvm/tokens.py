"""Several tokens per pass over the state (a mixin of ``tvm.sequential._Gen``).

A step whose new state is elementwise in the old one (a decay and a rank-1 write: linear
attention, RetNet, GLA) and whose reads of the state are all of the new state, accumulated in
the update pass (q^T S'), can apply U tokens' updates to each entry of S in turn while it is in
registers: the state is loaded and stored once per U tokens instead of once per token, the
traffic that bounds these kernels (a 64 KB state per head at K = V = 128). The token loop
then runs over groups of U tokens, and the tokens left over (length mod U) one at a time.
The delta rules read the old state (k^T S) before their update and stay at one token.
"""
from __future__ import annotations

from contextlib import contextmanager

from ...ir.node import Node


class TokenFusion:
    @contextmanager
    def rep(self, tvar: str, sfx: str):
        """Code for token ``tvar``: the per-token values' buffers named with ``sfx``."""
        saved_tvar, self.tvar = self.tvar, tvar
        saved = {}
        if sfx:
            for i in self._per_token_ids():
                saved[i] = self.names[i]
                self.names[i] += sfx
        try:
            yield
        finally:
            self.names.update(saved)
            self.tvar = saved_tvar

    def _per_token_ids(self) -> list[int]:
        p = self.p
        return [id(a) for a in self.pro_mat] + [
            id(n) for n in self.step if id(n) in self.mat and n is not p.new_state]

    def fused_tokens(self, after: set[int], pre: list) -> int:
        """U, the tokens per pass over the state (1: one at a time)."""
        p, U = self.p, self.knobs["tokens"]
        if U < 2 or self.tdim is not None or not self.in_place or pre or \
                not self.p.state.dims:
            return 1
        fused = {id(n) for n in self._fused()}
        in_pass = self.out_in_pass()
        for n in self.step:
            if n is p.new_state or id(n) not in self.mat or (n is p.output and in_pass):
                continue
            if id(n) not in after:   # computed from the old state before the update
                return 1
            if id(n) not in fused and self._reads_s(n, True):
                return 1              # would read the state of the group's last token
        if id(p.output) not in fused and self._reads_s(p.output, True) and not in_pass:
            return 1   # (the output as a fused read, q^T S', is each token's own)
        if self.ck_chunk and self.ck_chunk % U:
            return 1
        return U

    def out_in_pass(self) -> bool:
        """Whether the output is pointwise in the new state (the state's dims; elementwise
        ops of S' and state-free values: HGRN's h', minGRU's): the update pass then writes
        each token's output beside its update, while the entry of S' is in a register."""
        p, sd = self.p, self.p.state.dims
        if self.tdim is not None or not self.in_place or not sd or \
                tuple(p.output.dims) != tuple(sd) or not self.dep[id(p.output)]:
            return False

        def pointwise(n: Node) -> bool:
            if n is p.new_state or not self.dep[id(n)]:
                return set(n.dims) <= set(sd)
            if n is self.state or (id(n) in self.mat and n is not p.output):
                return False
            return (n.op in self.UNARY or n.op in self.BINARY or n.op == "where") and \
                all(pointwise(a) for a in n.args)
        return pointwise(p.output)

    def _reads_s(self, n, top: bool = False) -> bool:
        """Whether evaluating n (with its inlined args) loads S, old or new."""
        if n is self.state or n is self.p.new_state:
            return True
        if (not top and id(n) in self.mat) or not self.dep[id(n)]:
            return False
        return any(self._reads_s(a) for a in n.args)

    def per_token_allocs(self, U: int, pad: str) -> list[str]:
        """The per-token buffers of tokens 1 .. U-1 of a group (token 0's are the usual)."""
        out = []
        nodes = {id(n): n for n in self.pro_mat + self.step}
        for u in range(1, U):
            for i in self._per_token_ids():
                n = nodes[i]
                out.append(f"{pad}{self.names[i]}_u{u} = T.alloc_buffer(("
                           f"{self.local_shape(n.dims)},), \"float32\"{self.scope})")
        return out

    def out_store(self, tv: str, e: dict[str, str], inline: bool = False) -> str:
        """The statement writing token ``tv``'s output at the indices ``e`` (``inline``: its
        value computed there, not read from its buffer)."""
        od = self.p.output.dims
        inline = inline and self.p.output is not self.p.new_state   # S' itself: read S
        val = (self.expr_inline if inline else self.expr)(self.p.output, e)
        if self.out_dtype != "float32":
            val = f'T.Cast("{self.out_dtype}", {val})'
        return f"O[row, {tv}, h{', ' if od else ''}{self.gidx(od, e)}] = {val}"

    def _checkpoint(self, t: str, ind: int, lines: list[str]) -> None:
        """The state entering each chunk, for the backward (token ``t`` of the sequence)."""
        if not self.ck_chunk:
            return
        sd = self.p.state.dims
        e = self.env(sd)
        lines.append(f"{'    ' * ind}if ({t}) % {self.ck_chunk} == 0:")
        lines += self.loops(sd, [f"CK[n, h, ({t}) // {self.ck_chunk}, {self.gidx(sd, e)}] = "
                                 f"S[{self.idx(sd, e)}]"], ind + 1)

    def _token_body(self, reps: list[tuple[str, str]], ind2: int, lines: list[str],
                    after: set[int], pre: list[Node]) -> None:
        """One token's code, or a group's (``reps``: (token, name suffix) each) sharing one
        pass over the state."""
        p, sd, od = self.p, self.p.state.dims, self.p.output.dims
        pad2 = "    " * ind2
        if pre:   # the next token's prologue: its reads of the state are made in this pass
            lines.append(f"{pad2}tn: T.let = T.min(tt + 1, TT - 1)")
            lines += self.pro_code("tn", "_nx", ind2)
        else:
            for tv, sfx in reps:
                with self.rep(tv, sfx):
                    lines += self.pro_code(tv, "", ind2)
        for n in self.step:
            if id(n) in self.mat and id(n) not in after and n is not p.new_state and \
                    n not in pre:
                lines += self.node_code(n, ind2)
        fused: set[int] = set()
        out_done = False
        if self.in_place:   # S' written over S: later nodes read the new state as S
            fused = self._update_pass(pre, ind2, lines, reps)
            out_done = self.out_in_pass()
        else:
            self.mat.add(id(p.new_state))
            lines += self.node_code(p.new_state, ind2)
        for tv, sfx in reps:
            with self.rep(tv, sfx):
                for n in self.step:
                    if id(n) in self.mat and id(n) in after and n is not p.new_state and \
                            id(n) not in fused and not (out_done and n is p.output):
                        lines += self.node_code(n, ind2)
                if not out_done:
                    lines += self.loops(od, [self.out_store(tv, self.env(od))], ind2)
        if not self.in_place:
            e = self.env(sd)
            lines += self.loops(sd, [f"S[{self.idx(sd, e)}] = {self.expr(p.new_state, e)}"],
                                ind2)
        for n in pre:   # once every use of this token's value is done
            en = self.env(n.dims)
            lines += self.loops(n.dims, [f"{self.names[id(n)]}[{self.idx(n.dims, en)}] = "
                                         f"{self.names[id(n)]}_next[{self.idx(n.dims, en)}]"],
                                ind2)
        for a in self.pro_mat if pre else ():
            en = self.env(a.dims)
            lines += self.loops(a.dims, [f"{self.names[id(a)]}[{self.idx(a.dims, en)}] = "
                                         f"{self.names[id(a)]}_nx[{self.idx(a.dims, en)}]"],
                                ind2)
