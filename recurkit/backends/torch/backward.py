"""The generated backward's kernel in torch ops: the adjoint step walked back in time one
token at a time, from chunk-boundary checkpoints of the forward (any device; the reference
the compiled kernels are tested against). See ``backends.shared.adjoint``."""
from __future__ import annotations

import torch

from ...ir.bind import BoundCall
from ...ir.interpret import apply_node
from ...ir.node import Node, toposort
from ...lowering.adjoint import AdjointStep
from ..shared.host import initial_state, segments

CHECKPOINT = 64   # tokens between saved forward states


def run_adjoint_torch(bc: BoundCall, adj: AdjointStep, feeds: list[torch.Tensor],
                      d_out: torch.Tensor | None, d_final: torch.Tensor | None,
                      checkpoint: int = CHECKPOINT):
    """The backward kernel in torch ops (see ``generated_backward``)."""
    p = bc.program
    nodes = adj.nodes()
    state = next(n for n in p.nodes() if n.role == "state")
    fwd = toposort([p.new_state], stop={id(f) for f in adj.feeds})
    feed_at = {id(f): i for i, f in enumerate(adj.feeds)}
    sd = tuple(bc.sizes[d] for d in p.state.dims)
    d_feeds = [None if d is None else torch.zeros_like(f) for f, d in zip(feeds, adj.d_feeds)]
    segs = segments(bc)
    s0 = initial_state(bc, len(segs))
    d_init = torch.zeros_like(s0)

    def leaf(n: Node, env: dict, t: int) -> torch.Tensor:
        if n.op == "const":
            return torch.tensor(float(n.attr("value")), device=bc.device).reshape(1, 1)
        i = feed_at.get(id(n))
        if i is None:
            raise AssertionError(f"adjoint: unexpected leaf {n}")  # pragma: no cover
        return feeds[i][env["rows"], t]

    def run(order: list[Node], env: dict, t: int) -> None:
        for n in order:
            if id(n) in env:
                continue
            if n.op == "const" or id(n) in feed_at:
                env[id(n)] = leaf(n, env, t)
            else:
                env[id(n)] = apply_node(n, [env[id(a)] for a in n.args], 2)

    def step(S: torch.Tensor, rows, t: int) -> dict:
        env = {"rows": rows, id(state): S}
        run(fwd, env, t)
        return env

    for g, (b, start, end) in enumerate(segs):
        rows = slice(b, b + 1)
        S = s0[g:g + 1]
        marks = list(range(start, end, checkpoint))
        saved = []
        for m in marks:                       # the forward, keeping chunk-boundary states
            saved.append(S)
            for t in range(m, min(m + checkpoint, end)):
                S = step(S, rows, t)[id(p.new_state)]
        G = (torch.zeros_like(S) if d_final is None else d_final[g:g + 1]).clone()
        for m, S in reversed(list(zip(marks, saved))):
            states = []
            for t in range(m, min(m + checkpoint, end)):   # the chunk's states, recomputed
                states.append(S)
                S = step(S, rows, t)[id(p.new_state)]
            for t in reversed(range(m, min(m + checkpoint, end))):
                env = {"rows": rows, id(state): states[t - m], id(adj.d_new): G}
                if adj.d_out is not None:
                    env[id(adj.d_out)] = (d_out[rows, t] if d_out is not None else
                                          torch.zeros((1, bc.H, *(bc.sizes[d] for d in
                                                                  adj.d_out.dims)),
                                                      device=bc.device))
                run(nodes, env, t)
                for i, d in enumerate(adj.d_feeds):
                    if d is not None:
                        d_feeds[i][rows, t] = env[id(d)].expand(d_feeds[i][rows, t].shape)
                G = (env[id(adj.d_state)].expand(1, bc.H, *sd) if adj.d_state is not None
                     else torch.zeros_like(G))
        d_init[g:g + 1] = G
    return d_feeds, d_init
