"""The chunk's states recomputed for the backward walk (a mixin of ``tvm.adjoint._AdjGen``).

Before walking a chunk of tokens back, the backward kernel runs the forward step over it from
the chunk's checkpoint, writing every state into a scratch. Two things make that pass cheap:

- *pipelined contractions* (``pre``): the forward step's contractions of the old state over
  all but the state's last dim (``k^T S``) are accumulated for token t + 1 in the same sweep
  that writes token t's new state, so each token reads the state once, not twice (the first
  token's are made before the chunk's loop);
- *kept values* (``kept``): values of the forward step smaller than the state that the
  backward step reads again (``v - k^T S``) are stored per token of the chunk, and the walk
  reads them instead of making them again (which would read the old state once more).
"""
from __future__ import annotations

from ...ir.node import Node, toposort
from .nests import _Item


class Recompute:
    """See the module docstring; ``_plan_recompute`` sets ``kept``, ``walk`` and ``pre``."""

    def _plan_recompute(self, every: dict[int, Node], feed_ids: set[int]) -> None:
        p, adj = self.p, self.adj
        bwd_ids = {id(n) for n in self.bwd}
        # stored values of the forward step smaller than the state that the backward step
        # reads too (k^T S, v - k^T S): kept per token of the chunk when it is recomputed
        kept = {id(n) for n in self.fwd if id(n) in self.mat and id(n) in bwd_ids and
                n is not p.new_state and not set(self.state.dims) <= set(n.dims)}
        walk = toposort(adj.roots(), stop=feed_ids | kept)   # the kept are leaves of the walk
        self.kept = {id(n): n for n in walk if id(n) in kept}
        self.walk = [n for n in walk if id(n) not in kept]
        # contractions of the old state the forward step makes over the state's dims with
        # one vector register per column (k^T S): the recompute accumulates token t+1's
        # while it writes token t's new state, one pass over the state per token, not two
        sd = self.state.dims
        self.pre = [n for n in self.fwd if n.op == "contract" and id(n) in self.mat and
                    sd and sd[-1] not in n.attr("over") and
                    p.canonical(set(n.dims) | set(n.attr("over"))) == sd and
                    all(self._pure(a) for a in n.args)]

    def _pure(self, n: Node) -> bool:
        """Made from the old state and feeds alone (no stored value in between)."""
        return n is self.state or not self.dep.get(id(n), True) or (
            id(n) not in self.mat and id(n) not in self.leaves and n.op != "contract" and
            all(self._pure(a) for a in n.args))

    def forward_first(self, ind: int, j: str, tt: str) -> list[str]:
        """Before a chunk's recompute: the pipelined contractions (``pre``) of its first
        token (tt), from the state in scratch slot j."""
        self.slot, self.slot_next, self.tvar = j, None, tt
        return self.emit(self.schedule(self.items(self.pre)), ind)

    def forward_step(self, ind: int, j: str, tt: str) -> list[str]:
        """SCR[slot j + 1] = the new state from SCR[slot j], for token tt; while it is
        written, the pipelined contractions of token tt + 1 accumulate (``pre``: those of
        token tt were made before)."""
        self.slot, self.slot_next, self.tvar = j, None, tt
        sd = self.state.dims
        out = _Item(None, False, sd, self.reads(self.p.new_state), value=self.p.new_state,
                    target=lambda e: f"SCR[n, h, {j} + 1, {self.lidx(sd, e)}]",
                    writes=id(self.p.new_state))
        nxt = []
        for n in self.pre:
            def render(e, n=n):
                saved, (self.tvar, self.slot) = (self.tvar, self.slot), ("tn", f"{j} + 1")
                try:
                    tgt = f"{self.names[id(n)]}_next[{self.idx(n.dims, e)}]"
                    return f"{tgt} = {tgt} + {self._product(n, e)}"
                finally:
                    self.tvar, self.slot = saved
            nxt.append(_Item(None, False, sd, {id(self.p.new_state)}, render=render))
        pre = {id(n) for n in self.pre}
        lines = [f"{'    ' * ind}tn: T.let = T.min({tt} + 1, TT - 1)"] if self.pre else []
        for n in self.pre:
            nm = self.names[id(n)]
            lines += self.loops(n.dims, [f"{nm}_next[{self.idx(n.dims, self.env(n.dims))}] = "
                                         "T.float32(0.0)"], ind)
        lines += self.emit(self.schedule(self.items([n for n in self.fwd if id(n) not in pre])
                                         + [out] + nxt), ind)
        for n in self.kept.values():   # kept for the walk back through this token
            e = self.env(n.dims)
            nm, ix = self.names[id(n)], self.idx(n.dims, e)
            lines += self.loops(n.dims, [f"{nm}_c[{j}, {ix}] = {nm}[{ix}]"], ind)
        for n in self.pre:   # token tt + 1's, once every use of token tt's is done
            e = self.env(n.dims)
            nm, ix = self.names[id(n)], self.idx(n.dims, e)
            lines += self.loops(n.dims, [f"{nm}[{ix}] = {nm}_next[{ix}]"], ind)
        return lines
