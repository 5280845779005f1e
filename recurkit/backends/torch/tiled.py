"""The tiled form in torch: the forward by the reference evaluator, the backward by evaluating
the derived cotangent expressions (the oracle for the compiled kernels, and the fallback)."""
from __future__ import annotations

import torch

from ...ir.interpret import align
from ...ir.tiled import TiledCall, evaluate_tiled
from ...lowering.tiled import TiledPlan
from ..shared.tiled import declared_grads, flat_index


def run_tiled_torch(plan: TiledPlan, tc: TiledCall) -> torch.Tensor:
    out = plan.program.output
    with torch.no_grad():
        v = evaluate_tiled(tc, [out])[id(out)]
    return v.expand(tc.out_shape).to(tc.out_dtype).contiguous()


def tiled_grads_torch(plan: TiledPlan, tc: TiledCall, dy: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of every row and weight input (zeros where the output does not depend on
    it), each in its input's dtype and shape."""
    roots = [*plan.row_grads.values(), *plan.weight_grads.values(),
             *(s.cot for s in plan.scatters)]
    N, shape = tc.N, tc.out_shape
    with torch.no_grad():
        vals = evaluate_tiled(tc, roots, {id(plan.dy): dy.float().reshape(shape)})
        grads: dict[str, torch.Tensor] = {}
        specs = {s.name: s for s in plan.program.inputs}
        for name, node in plan.row_grads.items():
            dims = plan.program.canonical(specs[name].dims)   # the output's, or wider
            v = align(vals[id(node)], node.dims, dims, 1)
            grads[name] = v.expand(N, *(tc.sizes[d] for d in dims)).clone()
        for name, node in plan.weight_grads.items():
            grads[name] = vals[id(node)].expand(shape).sum(0)
        for s in plan.scatters:
            x = tc.tensors[s.row]
            g = grads.setdefault(s.row, torch.zeros(x.shape, dtype=torch.float32,
                                                    device=x.device))
            idx = flat_index(plan, tc, s.index)
            g.index_add_(1, idx, vals[id(s.cot)].expand(shape).reshape(N, -1))
    return declared_grads(plan, tc, grads)
