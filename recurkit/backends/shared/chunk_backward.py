"""The chunk-form backward, host side: the readout's cotangent in, the kernel (torch:
``backends.torch.chunk_adjoint``; Triton: ``backends.triton.chunk_adjoint``) for the
cotangents of the prologue's values and of the initial state, then the prologue's backward
to the call's tensors.

The prologue's backward (the state-free, per-token part: gates, norms, scales) is the IR of
``lowering.prologue_vjp`` (``meta["input_vjp"]``): rendered inside the kernel where the
kernel can (Triton: it returns the inputs' gradients itself), else evaluated here on the
kernel's cotangents; autograd through the prologue only where that IR does not exist (a
derivative rule missing).

The forward saves only the call's inputs (O(T (K + V)) per head): the chunk states are
recomputed by the backward's own state pass, which is one pass over the chunks' states
([K, V] per chunk, held in registers on the GPU) where the sequential adjoint recomputes
every token's."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

import torch

from ...ir.bind import BoundCall, fold_groups, full_shape
from ...ir.interpret import evaluate
from ...ir.node import toposort
from ...lowering.chunk_adjoint import D_H
from ...lowering.prologue_vjp import D_O
from ...lowering.tile import TileProgram
from .adjoint import sum_to
from .host import on_dims


class _Feeds(Mapping):
    """The kernel's inputs by prologue value, evaluated (once, all together) on first use:
    a kernel that computes the prologue itself (Triton) reads only ``d_h`` and ``d_o``."""

    def __init__(self, bc: BoundCall, roles: dict, given: dict, grad: bool):
        self.bc, self.roles, self.given, self.grad = bc, roles, dict(given), grad
        self.vals: dict[int, torch.Tensor] | None = None

    def evaluated(self) -> dict[int, torch.Tensor]:
        if self.vals is None:
            with torch.set_grad_enabled(self.grad):
                self.vals = evaluate(self.bc, list(self.roles.values()))
        return self.vals

    def __getitem__(self, k: str) -> torch.Tensor:
        if k in self.given:
            return self.given[k]
        return self.evaluated()[id(self.roles[k])].detach()

    def __iter__(self):
        return iter([*self.roles, *self.given])

    def __len__(self) -> int:
        return len(self.roles) + len(self.given)


def chunk_backward(bc: BoundCall, tp: TileProgram, grad_o: torch.Tensor | None,
                   grad_S: torch.Tensor | None, kernel: Callable, leaves: dict
                   ) -> dict[str, torch.Tensor | None]:
    """Gradients by input name (and "initial_state") of the call ``bc`` (whose tensors
    ``leaves`` require grad) from the chunk-form backward ``tp`` run by ``kernel(tp, bc,
    feeds, d_final) -> (cotangents by prologue value, h, d_init, input gradients)``, the last
    None unless the kernel ran the prologue's backward itself (then by input name: a token
    input's gradient in its layout, a parameter's per-token shares [B, T, H, *dims])."""
    p = bc.program
    ivjp = tp.meta.get("input_vjp")
    roles = {k: n for k, n in tp.prologue.items() if k != D_H}
    shape = (bc.B, bc.T, bc.H, *(bc.sizes[d] for d in p.output.dims))
    post_n = tp.prologue.get("read_post")
    go = grad_o.expand(shape) if grad_o is not None else None
    if post_n is not None and go is not None:
        with torch.no_grad():
            post = evaluate(bc, [post_n])[id(post_n)]
        dz = (go.float() * post).expand(shape).contiguous()
    else:
        dz = go if go is not None else torch.zeros(shape, device=bc.device)
    d_o = go if go is not None else torch.zeros(shape, device=bc.device)
    feeds = _Feeds(bc, roles, {D_H: dz, D_O: d_o}, grad=ivjp is None)
    d_roles, h, d_init, d_inputs = kernel(tp, bc, feeds, None if grad_S is None
                                          else grad_S.float())
    want = {n: t for n, t in leaves.items() if n != "initial_state" and t.requires_grad}
    if d_inputs is not None:
        got = {n: _fit_input(bc, n, g) for n, g in d_inputs.items()}
    elif ivjp is not None:
        got = _input_grads_on_host(bc, tp, ivjp, d_roles, h, d_o)
    else:
        got = _autograd(bc, tp, feeds, d_roles, h, go, want)
    got = {n: fold_groups(bc, n, g) for n, g in got.items()}   # grouped heads: summed
    res = {n: (None if got.get(n) is None else got[n].detach().to(t.dtype).contiguous())
           for n, t in want.items()}
    if "initial_state" in leaves:
        res["initial_state"] = d_init.to(leaves["initial_state"].dtype).contiguous()
    return res


def _fit_input(bc: BoundCall, name: str, g: torch.Tensor) -> torch.Tensor:
    """A kernel's gradient of input ``name``: a parameter's per-token shares summed."""
    shape = full_shape(bc, name)   # at H heads (a grouped input is not repeated for it)
    if g.shape == shape:
        return g
    return sum_to(g.float(), (1, 1, *shape)).reshape(shape)


def _input_grads_on_host(bc: BoundCall, tp: TileProgram, ivjp: dict, d_roles: dict,
                         h: torch.Tensor | None, d_o: torch.Tensor) -> dict[str, torch.Tensor]:
    """The prologue's backward IR evaluated for all tokens at once on the kernel's
    cotangents (canonical dims, like the prologue's values)."""
    p = bc.program
    by_value = {v: d_roles[r] for r, v in tp.meta["grads"].items() if r in d_roles}
    if tp.meta["h"] is not None and h is not None:
        by_value[tp.meta["h"]] = h
    given = {}
    for n in toposort(list(ivjp.values())):
        if n.op == "input" and n.role == "cotangent":
            given[id(n)] = by_value[n.attr("name")].float()
        elif n.op == "input" and n.role == "d_out":
            given[id(n)] = d_o.float()
    with torch.no_grad():
        vals = evaluate(bc, list(ivjp.values()), given=given)
    out = {}
    for name, n in ivjp.items():
        spec = next(s for s in p.inputs if s.name == name)
        g = on_dims(vals[id(n)], n.dims, spec.dims)
        t = bc.tensors[name]
        full = (1, 1, *t.shape) if spec.role == "param" else t.shape
        g = sum_to(g, full) if any(a > b for a, b in zip(g.shape, full)) else g
        out[name] = g.expand(full).reshape(t.shape)
    return out


def _autograd(bc, tp, feeds: _Feeds, d_roles: dict, h, go, want: dict) -> dict:
    """Autograd through the prologue, re-evaluated with grad (no backward IR exists)."""
    rec = tp.meta["recurrence"]
    vals = feeds.evaluated()
    extra = [n for n in (rec.read_post, rec.out_const) if n is not None and id(n) not in vals]
    if extra:
        with torch.enable_grad():
            vals = evaluate(bc, extra, memo=vals)
    outs, cots = [], []
    for k, n in feeds.roles.items():
        v = vals[id(n)]
        if k in d_roles and v.requires_grad:
            outs.append(v)
            cots.append(sum_to(d_roles[k].float(), v.shape))
    if go is not None:
        post = vals[id(rec.read_post)] if rec.read_post is not None else None
        if post is not None and post.requires_grad:
            outs.append(post)
            cots.append(sum_to(go.float() * h.float(), post.shape))
        c = vals[id(rec.out_const)] if rec.out_const is not None else None
        if c is not None and c.requires_grad:
            outs.append(c)
            cots.append(sum_to(go.float(), c.shape))
    names = list(want)
    got = torch.autograd.grad(outs, [want[n] for n in names], cots, allow_unused=True) \
        if outs and names else [None] * len(names)
    return dict(zip(names, got))
