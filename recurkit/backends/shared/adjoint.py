"""The generated backward of a recurrence, host side.

``generated_backward`` turns the cotangents of an op's outputs into the gradients of its
inputs: a backward kernel walks the adjoint step (``lowering/adjoint.py``) back in time and
yields the cotangent of every feed per token and of the initial state; autograd then carries
the feeds' cotangents through the prologue (the state-free, per-token part: gates, norms) to
the tensor inputs. The kernels: ``backends.torch.backward.run_adjoint_torch`` (torch ops, any
device: the reference the compiled kernels are tested against) and the compiled ones a
backend offers (``Backend.adjoint_kernel``); ``backends.adjoint_runner`` chooses.
"""
from __future__ import annotations

from typing import Callable

import torch

from ...ir.bind import BoundCall
from ...ir.interpret import evaluate
from ...lowering.adjoint import AdjointStep


def sum_to(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``g`` summed down to ``shape`` (a broadcast value's gradient): over trailing dims it
    has beyond ``shape``, then over the axes where ``shape`` has size 1."""
    while g.dim() > len(shape):
        g = g.sum(-1)
    axes = tuple(i for i, (a, b) in enumerate(zip(g.shape, shape)) if b == 1 and a != 1)
    return g.sum(axes, keepdim=True) if axes else g


def generated_backward(bc: BoundCall, adj: AdjointStep, grad_o: torch.Tensor | None,
                       grad_S: torch.Tensor | None, kernel: Callable, leaves: dict,
                       checkpoints=None) -> dict[str, torch.Tensor | None]:
    """Gradients by input name (and "initial_state") of the call ``bc``, whose tensors
    ``leaves`` require grad. ``kernel(bc, adj, feeds, d_out, d_final)`` returns the feeds'
    cotangents [B, T, H, *dims] (None where none flows) and the initial state's [N, H, ...];
    the forward's ``checkpoints`` (``shared.checkpoints``), if any, go to it as a keyword."""
    p = bc.program
    with torch.enable_grad():
        vals = evaluate(bc, list(adj.feeds) + ([] if adj.d_out is not None else [p.output]))
    feeds = [vals[id(f)].detach().expand(bc.B, bc.T, bc.H, *(bc.sizes[d] for d in f.dims))
             .contiguous() for f in adj.feeds]
    d_out = None
    if grad_o is not None and adj.d_out is not None:
        d_out = grad_o.float().expand(bc.B, bc.T, bc.H, *(bc.sizes[d] for d in p.output.dims))
    d_feeds, d_init = kernel(bc, adj, feeds, d_out, None if grad_S is None else grad_S.float(),
                             **({} if checkpoints is None else {"checkpoints": checkpoints}))
    outs, cots = [], []
    for f, d in zip(adj.feeds, d_feeds):
        v = vals[id(f)]
        if d is not None and v.requires_grad:
            outs.append(v)
            cots.append(sum_to(d, v.shape))
    if adj.d_out is None and grad_o is not None:   # an output that never reads the state
        v = vals[id(p.output)]
        if v.requires_grad:
            outs.append(v)
            cots.append(sum_to(grad_o.float().expand(bc.B, bc.T, bc.H, *v.shape[3:]),
                                v.shape))
    want = [(n, t) for n, t in leaves.items() if n != "initial_state" and t.requires_grad]
    got = torch.autograd.grad(outs, [t for _, t in want], cots, allow_unused=True) \
        if outs and want else [None] * len(want)
    res = {n: (None if g is None else g.to(t.dtype)) for (n, t), g in zip(want, got)}
    if "initial_state" in leaves:
        res["initial_state"] = d_init.to(leaves["initial_state"].dtype)
    return res


BACKWARDS = ("auto", "chunk", "adjoint", "autograd")


def check_backward(mode: str) -> str:
    if mode not in BACKWARDS:
        raise ValueError(f"backward must be one of {', '.join(map(repr, BACKWARDS))}, got "
                         f"{mode!r}")
    return mode
