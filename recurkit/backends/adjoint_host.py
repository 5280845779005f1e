"""The generated backward of a recurrence, host side, and its torch runner.

``generated_backward`` turns the cotangents of an op's outputs into the gradients of its
inputs: a backward kernel walks the adjoint step (``lowering/adjoint.py``) back in time and
yields the cotangent of every feed per token and of the initial state; autograd then carries
the feeds' cotangents through the prologue (the state-free, per-token part: gates, norms) to
the tensor inputs. ``run_adjoint_torch`` is that kernel in torch ops: one step at a time, from
chunk-boundary checkpoints (the reference the compiled kernels are tested against, and the
path for devices no compiled kernel serves).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..ir.bind import BoundCall, bind_call
from ..ir.interpret import apply_node, evaluate
from ..ir.node import Node, toposort
from ..lowering.adjoint import AdjointStep, derive_adjoint
from .torch_backend import _initial_state, _segments

CHECKPOINT = 64   # tokens between saved forward states (the torch runner)


def _sum_to(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``g`` summed over the axes where ``shape`` has size 1 (a broadcast value's gradient)."""
    axes = tuple(i for i, (a, b) in enumerate(zip(g.shape, shape)) if b == 1 and a != 1)
    return g.sum(axes, keepdim=True) if axes else g


def generated_backward(bc: BoundCall, adj: AdjointStep, grad_o: torch.Tensor | None,
                       grad_S: torch.Tensor | None, kernel: Callable, leaves: dict
                       ) -> dict[str, torch.Tensor | None]:
    """Gradients by input name (and "initial_state") of the call ``bc``, whose tensors
    ``leaves`` require grad. ``kernel(bc, adj, feeds, d_out, d_final)`` returns the feeds'
    cotangents [B, T, H, *dims] (None where none flows) and the initial state's [N, H, ...]."""
    p = bc.program
    with torch.enable_grad():
        vals = evaluate(bc, list(adj.feeds) + ([] if adj.d_out is not None else [p.output]))
    feeds = [vals[id(f)].detach().expand(bc.B, bc.T, bc.H, *(bc.sizes[d] for d in f.dims))
             .contiguous() for f in adj.feeds]
    d_out = None
    if grad_o is not None and adj.d_out is not None:
        d_out = grad_o.float().expand(bc.B, bc.T, bc.H, *(bc.sizes[d] for d in p.output.dims))
    d_feeds, d_init = kernel(bc, adj, feeds, d_out, None if grad_S is None else grad_S.float())
    outs, cots = [], []
    for f, d in zip(adj.feeds, d_feeds):
        v = vals[id(f)]
        if d is not None and v.requires_grad:
            outs.append(v)
            cots.append(_sum_to(d, v.shape))
    if adj.d_out is None and grad_o is not None:   # an output that never reads the state
        v = vals[id(p.output)]
        if v.requires_grad:
            outs.append(v)
            cots.append(_sum_to(grad_o.float().expand(bc.B, bc.T, bc.H, *v.shape[3:]),
                                v.shape))
    want = [(n, t) for n, t in leaves.items() if n != "initial_state" and t.requires_grad]
    got = torch.autograd.grad(outs, [t for _, t in want], cots, allow_unused=True) \
        if outs and want else [None] * len(want)
    res = {n: (None if g is None else g.to(t.dtype)) for (n, t), g in zip(want, got)}
    if "initial_state" in leaves:
        res["initial_state"] = d_init.to(leaves["initial_state"].dtype)
    return res


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
    segs = _segments(bc)
    s0 = _initial_state(bc, len(segs))
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


BACKWARDS = ("auto", "adjoint", "autograd")


def check_backward(mode: str) -> str:
    if mode not in BACKWARDS:
        raise ValueError(f"backward must be one of {', '.join(map(repr, BACKWARDS))}, got "
                         f"{mode!r}")
    return mode


def adjoint_runner(program, mode: str = "auto") -> Callable | None:
    """The custom op's generated backward for ``program`` (see ``custom_op.TorchOp``):
    the compiled TVM kernel for CPU tensors; elsewhere the torch step runner with
    ``mode="adjoint"``, or None (the op then recomputes through autograd) with "auto".
    None for ``mode="autograd"``."""
    if check_backward(mode) == "autograd":
        return None
    adj = derive_adjoint(program)

    def run(kw: dict, leaves: dict, grad_o, grad_S):
        bc = bind_call(program, (), {**kw, **leaves})
        if bc.device.type == "cpu":
            from .tvm_adjoint import run_adjoint_tvm
            kernel = run_adjoint_tvm
        elif mode == "adjoint":
            kernel = run_adjoint_torch
        else:
            return None
        return generated_backward(bc, adj, grad_o, grad_S, kernel, leaves)
    return run
