"""Groups of tokens with a decay, from the state they enter (a mixin of ``tvm.sequential._Gen``).

For a decayed rank-1 recurrence (``lowering.analysis``: S' = Diag(d) S + a b^T, o = post *
(q^T S') + c, with d over the rows K: GLA, RetNet, simple GLA) a group of U tokens need not
build the U states in turn. With the group's entering state S, the cumulative decays
G_u = d_0 ... d_u and the products P_bu = d_{b+1} ... d_u (both over K, products only):

    q_u^T S_u = (q_u G_u)^T S + sum_{b <= u} (sum_i q_u[i] a_b[i] P_bu[i]) b_b
    S_{U-1}   = G_{U-1} S + sum_b (a_b P_b,U-1) b_b^T

so each entry of S takes U readout FMAs, one multiply and U write FMAs per group: 2U + 1
vector operations where the token-by-token pass takes 3U (a decay multiply, a write and a
readout per token), the bound of these kernels. The U (U + 1) / 2 pair coefficients are dots
over K per group. The tokens after the last whole group take the usual pass one by one.
"""
from __future__ import annotations

from ...ir.node import Node
from .build import vector_lanes
from .fastmath import fast_steps

_UNSUPPORTED = ("contract", "sum", "max", "rotate", "pairs")


class _Unsupported(Exception):
    pass


class GatedGroups:
    _group: dict | None = None

    def group_plan(self) -> dict | None:
        """The analysis' terms when the groups apply (see the module docstring), else None."""
        if self._group is not None:
            return self._group or None
        self._group = {}
        sd = self.p.state.dims
        if self.tdim is not None or self.knobs["tokens"] < 2 or not self.in_place or \
                len(sd) != 2 or self.cb is not None:
            return None
        from ...lowering.analysis import analyze
        try:
            rec = analyze(self.p)
        except Exception:  # noqa: BLE001 - not analysable: the token-by-token pass
            return None
        K, V = sd
        if rec.kind != "diagonal" or rec.expansion is not None or rec.read_across or \
                rec.kdim != K or rec.vdim != V or len(rec.writes) != 1 or \
                rec.log_gate_v is not None or rec.decay_v is not None or \
                tuple(self.p.output.dims) != (V,):
            return None
        decay = rec.decay_k if not rec.gate_positive else None
        log = rec.log_gate_k if rec.gate_positive else None
        if decay is None and log is None:
            return None   # no decay: the token-by-token pass is as short (2U)
        a, b = rec.writes[0]
        w = vector_lanes()
        if self.sizes[V] % w:
            return None
        terms = {"a": a, "b": b, "q": rec.read_q, "post": rec.read_post,
                 "c": rec.out_const, "log": log, "decay": decay}
        dims = {"a": {K}, "q": {K}, "log": {K}, "decay": {K}, "b": {V}, "post": {V}, "c": {V}}
        try:
            for name, n in terms.items():
                if n is not None:
                    if not set(n.dims) <= dims[name]:
                        return None
                    self.free_expr(n, {d: f"i_{d}" for d in n.dims}, "tt")
        except _Unsupported:
            return None
        self._group = {"K": K, "V": V, "w": w, **terms}
        return self._group

    def free_expr(self, n: Node, env: dict[str, str], tv: str) -> str:
        """A state-free value of the analysis at token ``tv``, from the call's tensors."""
        if n.op == "const":
            return self.expr(n, env)
        if n.op == "input":
            if id(n) not in self.leaf_of:
                raise _Unsupported(n.attr("name"))
            saved, self.tvar = self.tvar, tv
            try:
                return self.leaf_expr(n, env)
            finally:
                self.tvar = saved
        if n.op in _UNSUPPORTED or self.dep.get(id(n), False):
            raise _Unsupported(n.op)
        if n.op not in self.UNARY and n.op not in self.BINARY and n.op != "where":
            raise _Unsupported(n.op)
        return self.apply_op(n, [self.free_expr(a, env, tv) for a in n.args])

    def _group_body(self, U: int, ind: int, lines: list[str]) -> None:
        """A group of U tokens (named tt, tt_u1, ...) from the state it enters."""
        g = self._group
        K, V, w = g["K"], g["V"], g["w"]
        nK, nV = self.sizes[K], self.sizes[V]
        pad = "    " * ind
        tv = ["tt" if u == 0 else f"tt_u{u}" for u in range(U)]
        eK, iK, iV = {K: f"i_{K}"}, f"i_{K}", f"i_{V}"
        alloc = self.late_allocs.append

        def buf(name: str, size: int) -> str:
            alloc(f"{name} = T.alloc_buffer(({size},), \"float32\"{self.scope})")
            return name

        def over_k(stmts: list[str]) -> None:
            lines.append(f"{pad}for {iK} in T.vectorized({nK}):")
            lines.extend(f"{pad}    {s}" for s in stmts)

        d = [buf(f"GD{u}", nK) for u in range(U)]   # each token's decay over K
        for u in range(U):
            if g["log"] is not None:
                scratch, steps = fast_steps("exp", self.free_expr(g["log"], eK, tv[u]), d[u], iK)
                lines += self.scratch_steps(scratch, steps, (K,), ind)
            else:
                over_k([f"{d[u]}[{iK}] = {self.free_expr(g['decay'], eK, tv[u])}"])
        q = [buf(f"GQ{u}", nK) for u in range(U)]
        a = [buf(f"GA{u}", nK) for u in range(U)]
        qg = [buf(f"GQG{u}", nK) for u in range(U)]
        ka = [buf(f"GKA{u}", nK) for u in range(U)]
        stm = []
        for u in range(U):
            stm += [f"{q[u]}[{iK}] = {self.free_expr(g['q'], eK, tv[u])}",
                    f"{a[u]}[{iK}] = {self.free_expr(g['a'], eK, tv[u])}"]
        for u in range(U):   # readout coefficients: q_u G_u
            cum = " * ".join(f"{d[c]}[{iK}]" for c in range(u + 1))
            stm.append(f"{qg[u]}[{iK}] = {q[u]}[{iK}] * {cum}")
        for u in range(U):   # write coefficients: a_u d_{u+1} ... d_{U-1}
            tail = [f"{d[c]}[{iK}]" for c in range(u + 1, U)]
            stm.append(f"{ka[u]}[{iK}] = {' * '.join([f'{a[u]}[{iK}]'] + tail)}")
        gt = buf("GGT", nK)
        stm.append(f"{gt}[{iK}] = {cum}")
        over_k(stm)
        # pair coefficients sum_i q_u a_b P_bu: lane partial sums, then the lanes
        pairs = [(u, b) for u in range(U) for b in range(u + 1)]
        ap = buf("GAP", len(pairs))
        lanes = vector_lanes()
        part = buf("GPS", lanes * len(pairs))
        lines.append(f"{pad}for l in T.vectorized({lanes * len(pairs)}):")
        lines.append(f"{pad}    {part}[l] = T.float32(0.0)")
        if nK % lanes == 0:
            lines.append(f"{pad}for k0 in T.serial({nK // lanes}):")
            lines.append(f"{pad}    for l in T.vectorized({lanes}):")
            for j, (u, b) in enumerate(pairs):
                k = f"k0 * {lanes} + l"
                f = [f"{q[u]}[{k}]", f"{a[b]}[{k}]"] + [f"{d[c]}[{k}]" for c in range(b + 1, u + 1)]
                lines.append(f"{pad}        {part}[{j * lanes} + l] = {part}[{j * lanes} + l]"
                             f" + {' * '.join(f)}")
        else:
            lines.append(f"{pad}for k0 in T.serial({nK}):")
            for j, (u, b) in enumerate(pairs):
                f = [f"{q[u]}[k0]", f"{a[b]}[k0]"] + [f"{d[c]}[k0]" for c in range(b + 1, u + 1)]
                lines.append(f"{pad}    {part}[{j * lanes}] = {part}[{j * lanes}] + {' * '.join(f)}")
        lines.append(f"{pad}for j in T.serial({len(pairs)}):")
        lines.append(f"{pad}    {ap}[j] = T.float32(0.0)")
        lines.append(f"{pad}    for l in T.serial({lanes}):")
        lines.append(f"{pad}        {ap}[j] = {ap}[j] + {part}[j * {lanes} + l]")
        # the pass over S: U readouts of the entering state, then the group's update
        acc = [buf(f"GACC{u}", w) for u in range(U)]
        ct = [buf(f"GCT{u}", w) for u in range(U)]
        nb = [buf(f"GN{u}", nV) for u in range(U)]
        sr = buf(f"GSR{w}", w)
        col = f"(vb * {w} + {iV})"
        eV = {V: col}
        p2, p3 = pad + "    ", pad + "        "
        lines.append(f"{pad}for vb in T.serial({nV // w}):")
        lines.append(f"{p2}for {iV} in T.vectorized({w}):")
        for u in range(U):
            lines.append(f"{p3}{acc[u]}[{iV}] = T.float32(0.0)")
            lines.append(f"{p3}{ct[u]}[{iV}] = {self.free_expr(g['b'], eV, tv[u])}")
        lines.append(f"{p2}for {iK} in T.serial({nK}):")
        lines.append(f"{p3}for {iV} in T.vectorized({w}):")
        p4 = p3 + "    "
        entry = f"S[{iK}, {col}]"
        lines.append(f"{p4}{sr}[{iV}] = {entry}")
        for u in range(U):
            lines.append(f"{p4}{acc[u]}[{iV}] = {acc[u]}[{iV}] + {qg[u]}[{iK}] * {sr}[{iV}]")
        writes = " + ".join(f"{ka[u]}[{iK}] * {ct[u]}[{iV}]" for u in range(U))
        lines.append(f"{p4}{entry} = {gt}[{iK}] * {sr}[{iV}] + {writes}")
        lines.append(f"{p2}for {iV} in T.vectorized({w}):")
        for u in range(U):
            lines.append(f"{p3}{nb[u]}[{col}] = {acc[u]}[{iV}]")
        # the outputs: post * (readout + the group's own writes) + c
        eO = {V: iV}
        for u in range(U):
            val = f"{nb[u]}[{iV}]"
            for j, (uu, b) in enumerate(pairs):
                if uu == u:
                    val += f" + {ap}[{j}] * {self.free_expr(g['b'], eO, tv[b])}"
            val = f"({val})"
            if g["post"] is not None:
                val = f"{self.free_expr(g['post'], eO, tv[u])} * {val}"
            if g["c"] is not None:
                val = f"{val} + {self.free_expr(g['c'], eO, tv[u])}"
            if self.out_dtype != "float32":
                val = f'T.Cast("{self.out_dtype}", {val})'
            lines.append(f"{pad}for {iV} in T.vectorized({nV}):")
            lines.append(f"{p2}O[row, {tv[u]}, h, {iV}] = {val}")
