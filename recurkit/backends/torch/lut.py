"""The LUT form in torch: the host's share of every backend and the torch backend itself.

``scale_values`` evaluates the scale expression (weights and scalars only) once per call;
``dequantized`` builds the dense weight ``W[o, g, e] = sum_p w * c`` from it; the forward is
then one matmul, and the backward (every backend's: it runs on the device of the call) is two:
``dx = dy W`` and the scale's cotangent ``sum_n dy * (c . x)``, carried to the weights by
autograd through the scale expression.
"""
from __future__ import annotations

import torch

from ...ir.tiled import TiledCall, evaluate_tiled, unpack_signs
from ...lowering.lut import LutPlan


def _letters(plan: LutPlan) -> dict[str, str]:
    return {d: "abcdefghijklmnopqrstuvwxyz"[i] for i, d in enumerate(plan.program.dims)}


def _spec(plan: LutPlan, name: str):
    return next(s for s in plan.program.inputs if s.name == name)


def scale_values(plan: LutPlan, tc: TiledCall, grad: bool = False) -> torch.Tensor:
    """The scale ``w`` over ``plan.scale_dims`` (canonical order), fp32."""
    with torch.set_grad_enabled(grad):
        v = evaluate_tiled(tc, [plan.scale])[id(plan.scale)][0]
    return v


def scale_tensor(plan: LutPlan, tc: TiledCall) -> torch.Tensor:
    """The scale as a kernel reads it: contiguous over ``plan.scale_dims`` ([1] if none)."""
    shape = [tc.sizes[d] for d in plan.scale_dims]
    s = plan.scale
    spec = _spec(plan, s.attr("name")) if s.op == "input" else None
    if spec is not None and spec.role == "weight" and spec.dims == s.dims:
        # a weight input already in canonical order (e.g. the alphas): read as given
        return tc.tensors[s.attr("name")].float().contiguous().reshape(shape or [1])
    return scale_values(plan, tc).expand(shape).contiguous().reshape(shape or [1])


def dims_of(plan: LutPlan, name: str) -> tuple[str, ...]:
    return _spec(plan, name).dims


def dequantized(plan: LutPlan, tc: TiledCall, scale: torch.Tensor,
                signs: torch.Tensor | None = None) -> torch.Tensor:
    """The dense weight [out, *row dims] (the row's declared order) in fp32; ``signs``: the
    codes already unpacked, if the caller has them."""
    L = _letters(plan)
    cdims, rdims = dims_of(plan, plan.codes), dims_of(plan, plan.row)
    if signs is None:
        signs = unpack_signs(tc.tensors[plan.codes])
    sub = "".join(L[d] for d in plan.scale_dims)
    spec = f"{sub},{''.join(L[d] for d in cdims)}->{L[plan.out]}{''.join(L[d] for d in rdims)}"
    return torch.einsum(spec, scale, signs)


def run_lut_torch(plan: LutPlan, tc: TiledCall) -> torch.Tensor:
    with torch.no_grad():
        W = dequantized(plan, tc, scale_values(plan, tc))
        x = tc.tensors[plan.row].float().reshape(tc.N, -1)
        return (x @ W.reshape(W.shape[0], -1).T).to(tc.out_dtype)


def needs(plan: LutPlan, need: frozenset[str] | None) -> tuple[bool, bool]:
    """(the row's gradient, the weights') as ``need`` asks (None: all)."""
    weights = {s.name for s in plan.program.call_inputs if s.role == "weight"}
    if need is None:
        return True, bool(weights)
    return plan.row in need, bool(weights & need)


def lut_grads_torch(plan: LutPlan, tc: TiledCall, dy: torch.Tensor,
                    need: frozenset[str] | None = None) -> dict[str, torch.Tensor]:
    """Gradients of the row and of every weight input, in their layouts and dtypes: those
    named in ``need`` (None: all); the weights' all or none."""
    row, weights = needs(plan, need)
    L = _letters(plan)
    x = tc.tensors[plan.row]
    dyf = dy.float().reshape(tc.N, -1)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        signs = unpack_signs(tc.tensors[plan.codes])
        if row:
            W = dequantized(plan, tc, scale_values(plan, tc), signs)
            out[plan.row] = (dyf @ W.reshape(W.shape[0], -1)).reshape(x.shape).to(x.dtype)
        if not weights:
            return out
        # the scale's cotangent: sum_n dy[n, o] * sum_e c[.., e] * x[n, .., e]
        cdims, rdims = dims_of(plan, plan.codes), dims_of(plan, plan.row)
        spec = (f"n{L[plan.out]},{''.join(L[d] for d in cdims)},n{''.join(L[d] for d in rdims)}"
                f"->{''.join(L[d] for d in plan.scale_dims)}")
        dscale = torch.einsum(spec, dyf, signs, x.float())
    return weight_grads(plan, tc, dscale, out)


def weight_grads(plan: LutPlan, tc: TiledCall, dscale: torch.Tensor,
                 out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``out`` with the gradient of every weight input added: the scale's cotangent
    ``dscale`` (over ``plan.scale_dims``) carried through the scale expression by autograd."""
    weights = [s.name for s in plan.program.call_inputs if s.role == "weight"]
    leaves = {n: tc.tensors[n].detach().float().requires_grad_() for n in weights}
    if leaves:
        tg = TiledCall(tc.program, {**tc.tensors, **leaves}, tc.scalars, tc.sizes, tc.N,
                       tc.out_dtype, tc.device)
        with torch.enable_grad():
            s = scale_values(plan, tg, grad=True)
            got = torch.autograd.grad([s], list(leaves.values()), [dscale.expand(s.shape)],
                                      allow_unused=True) if s.requires_grad else \
                [None] * len(leaves)
        for n, g in zip(leaves, got):
            t = tc.tensors[n]
            out[n] = torch.zeros_like(t) if g is None else g.to(t.dtype)
    return out
