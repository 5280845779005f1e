"""The chunk-form backward, host side: the prologue's values and the readout's cotangent in,
the kernel (torch: ``backends.torch.chunk_adjoint``; Triton: ``backends.triton.adjoint``) for
the cotangents of every prologue value and of the initial state, then autograd through the
prologue (the state-free, per-token part: gates, norms, scales) to the call's tensors.

The forward saves only the call's inputs (O(T (K + V)) per head): the chunk states are
recomputed by the backward's own state pass, which is one pass over the chunks' states
([K, V] per chunk, held in registers on the GPU) where the sequential adjoint recomputes
every token's."""
from __future__ import annotations

from typing import Callable

import torch

from ...ir.bind import BoundCall
from ...ir.interpret import evaluate
from ...lowering.chunk_adjoint import D_H
from ...lowering.tile import TileProgram
from .adjoint import sum_to


def chunk_backward(bc: BoundCall, tp: TileProgram, grad_o: torch.Tensor | None,
                   grad_S: torch.Tensor | None, kernel: Callable, leaves: dict
                   ) -> dict[str, torch.Tensor | None]:
    """Gradients by input name (and "initial_state") of the call ``bc`` (whose tensors
    ``leaves`` require grad) from the chunk-form backward ``tp`` run by
    ``kernel(tp, bc, feeds, d_final) -> (grads by prologue value, h, d_init)``."""
    rec = tp.meta["recurrence"]
    p = bc.program
    roles = {k: n for k, n in tp.prologue.items() if k != D_H}
    extra = [n for n in (rec.read_post, rec.out_const) if n is not None]
    with torch.enable_grad():
        vals = evaluate(bc, list(roles.values()) + extra)
    shape = (bc.B, bc.T, bc.H, *(bc.sizes[d] for d in p.output.dims))
    go = grad_o.float().expand(shape) if grad_o is not None else None
    post = vals[id(rec.read_post)] if rec.read_post is not None else None
    dz = torch.zeros(shape, device=bc.device) if go is None else \
        go if post is None else (go * post.detach()).expand(shape)
    feeds = {k: vals[id(n)].detach() for k, n in roles.items()}
    feeds[D_H] = dz
    d_roles, h, d_init = kernel(tp, bc, feeds, None if grad_S is None else grad_S.float())
    outs, cots = [], []
    for k, n in roles.items():
        v = vals[id(n)]
        if k in d_roles and v.requires_grad:
            outs.append(v)
            cots.append(sum_to(d_roles[k].float(), v.shape))
    if go is not None:
        if post is not None and post.requires_grad:
            outs.append(post)
            cots.append(sum_to(go * h.float(), post.shape))
        c = vals[id(rec.out_const)] if rec.out_const is not None else None
        if c is not None and c.requires_grad:
            outs.append(c)
            cots.append(sum_to(go, c.shape))
    want = [(n, t) for n, t in leaves.items() if n != "initial_state" and t.requires_grad]
    got = torch.autograd.grad(outs, [t for _, t in want], cots, allow_unused=True) \
        if outs and want else [None] * len(want)
    res = {n: (None if g is None else g.to(t.dtype).contiguous())
           for (n, t), g in zip(want, got)}
    if "initial_state" in leaves:
        res["initial_state"] = d_init.to(leaves["initial_state"].dtype).contiguous()
    return res
