"""The scan form's backward, host side: for ``h_t = a_t h_(t-1) + b_t`` (elementwise over the
state, ``a`` and ``b`` state-free per-token values of the analysis) and an output read from
``h_t``, the cotangent of the states runs the same recurrence backwards,

    L_t = dh_t + a_(t+1) L_(t+1),    L_T = dh_T + dS_T,    dS_0 = a_1 L_1,

``dh_t`` the readout's cotangent of ``h_t``; then ``db_t = L_t`` and ``da_t = L_t h_(t-1)``.
The kernel (``Backend.scan_adjoint_kernel``: Triton's on a GPU or in its interpreter, torch's
as the oracle) recomputes the forward states, asks for ``dh`` (the readout's backward, here:
autograd through the output's IR at the states), runs the reverse scan and returns ``da``,
``db`` and the initial state's cotangent; autograd then carries ``da``, ``db`` through the
prologue that computed ``a``, ``b`` (gates, activations) to the call's tensors. The forward
saves only the inputs (the states are one scan away)."""
from __future__ import annotations

from typing import Callable

import torch

from ...ir.bind import BoundCall
from ...ir.interpret import evaluate
from ...lowering.analysis import analyze
from .adjoint import sum_to
from .host import off_dims, on_dims


def scan_backward(bc: BoundCall, grad_o: torch.Tensor | None, grad_S: torch.Tensor | None,
                  kernel: Callable, leaves: dict) -> dict[str, torch.Tensor | None]:
    """Gradients by input name (and "initial_state") of the scan-form call ``bc`` (whose
    tensors ``leaves`` require grad), from ``kernel(bc, a, b, dh_of, d_final) -> (da, db,
    d_init)``: ``a``, ``b`` [B, T, H, *state] fp32, ``dh_of(hs)`` the readout's cotangent of
    the states ``hs`` [B, T, H, *state]."""
    p = bc.program
    rec = analyze(p)
    sd = tuple(p.state.dims)
    shape = (bc.B, bc.T, bc.H, *(bc.sizes[d] for d in sd))
    want = {n: t for n, t in leaves.items() if n != "initial_state" and t.requires_grad}
    direct: dict[str, torch.Tensor] = {}

    def dh_of(hs: torch.Tensor) -> torch.Tensor:
        """The readout's cotangent of the states, and (kept) its inputs' gradients."""
        if grad_o is None:
            return torch.zeros(shape, device=bc.device)
        with torch.enable_grad():
            h = hs.detach().float().requires_grad_()
            o = evaluate(bc, [p.output], {id(p.new_state): h})[id(p.output)]
            names = list(want)
            got = torch.autograd.grad([o], [h] + [want[n] for n in names],
                                      [sum_to(grad_o.float().expand(
                                          bc.B, bc.T, bc.H, *o.shape[3:]), o.shape)],
                                      allow_unused=True)
        direct.update({n: g for n, g in zip(names, got[1:]) if g is not None})
        return torch.zeros(shape, device=bc.device) if got[0] is None else \
            got[0].expand(shape).contiguous()

    with torch.enable_grad():
        vals = evaluate(bc, [rec.scan_a, rec.scan_b])
    a, b = (vals[id(n)] for n in (rec.scan_a, rec.scan_b))
    full = lambda v, n: on_dims(v.detach(), n.dims, sd).expand(shape).contiguous()  # noqa: E731
    da, db, d_init = kernel(bc, full(a, rec.scan_a), full(b, rec.scan_b), dh_of,
                            None if grad_S is None else grad_S.float())
    outs, cots = [], []
    for v, n, c in ((a, rec.scan_a, da), (b, rec.scan_b, db)):
        if v.requires_grad:   # summed over the state dims the value does not vary over
            outs.append(v)
            cots.append(sum_to(off_dims(c, sd, n.dims), v.shape))
    names = list(want)
    got = torch.autograd.grad(outs, [want[n] for n in names], cots, allow_unused=True) \
        if outs and names else [None] * len(names)
    res = {}
    for n, g in zip(names, got):
        if n in direct:
            g = direct[n] if g is None else g + direct[n]
        res[n] = None if g is None else g.detach().to(want[n].dtype).contiguous()
    if "initial_state" in leaves:
        res["initial_state"] = d_init.to(leaves["initial_state"].dtype).contiguous()
    return res
