"""The host side of sub-steps (``lowering.substeps``): a call of the source declaration as a
call of its expanded one, ``n`` sub-steps per token, and back.

The coefficients are evaluated from the call's inputs with torch ops (so autograd reaches
the inputs through them), laid out ``[B, T, n, H, *dims]`` (a sub-step that repeats along a
dim R takes R consecutive places, one column each) and flattened to ``T * n`` tokens; the
readout's coefficients are set on each token's last sub-step only, and every other output
is dropped.
"""
from __future__ import annotations

import torch

from ...ir.bind import BoundCall, bind_call
from ...ir.interpret import evaluate
from .host import on_dims


def expand_call(bc: BoundCall, ex) -> tuple[BoundCall, int]:
    """(the expanded call, sub-steps per token); its inputs are fp32."""
    n = ex.count(bc.sizes)
    nodes = [v for s in ex.steps for r in (s.roles, s.first) for v in r.values()]
    vals = evaluate(bc, nodes + list(ex.readout.values()))
    lead = (bc.B, bc.T)
    tensors = {}
    for spec in ex.program.call_inputs:
        dims = spec.dims
        size = tuple(bc.sizes[d] for d in dims)

        def full(node, along=None):
            want = ((along,) if along else ()) + dims
            v = on_dims(vals[id(node)], node.dims, want)
            return v.expand(*lead, bc.H, *(bc.sizes[d] for d in want))

        def zeros(k):
            return torch.zeros(*lead, k, bc.H, *size, dtype=torch.float32, device=bc.device)

        if spec.name in ex.readout:   # the last sub-step's
            tensors[spec.name] = placed(full(ex.readout[spec.name]), n, last=True)
            continue
        blocks = []
        for s in ex.steps:
            k = bc.sizes[s.along] if s.along else 1
            node = s.roles.get(spec.name)
            if node is not None and s.along and s.along in node.dims:
                blocks.append(full(node, s.along).movedim(3, 2))   # [B, T, R, H, ...]
            elif node is not None:
                blocks.append(full(node).unsqueeze(2).expand(*lead, k, bc.H, *size))
            elif spec.name in s.first:
                blocks.append(placed(full(s.first[spec.name]), k, last=False))
            else:
                blocks.append(zeros(k))
        tensors[spec.name] = torch.cat(blocks, 2) if len(blocks) > 1 else blocks[0]
    tensors = {k: v.reshape(bc.B, bc.T * n, bc.H, *v.shape[4:]) for k, v in tensors.items()}
    cu = None
    if bc.cu_seqlens is not None:
        cu = torch.tensor([c * n for c in bc.cu_seqlens], dtype=torch.int64, device=bc.device)
    return bind_call(ex.program, (), {**tensors, "initial_state": bc.initial_state,
                                      "output_final_state": bc.output_final_state,
                                      "cu_seqlens": cu}), n


def placed(v: torch.Tensor, k: int, last: bool) -> torch.Tensor:
    """``v`` [B, T, H, ...] as the last (or first) of k places per token, zeros in the
    others: [B, T, k, H, ...]."""
    v = v.unsqueeze(2)
    if k == 1:
        return v
    z = v.new_zeros(*v.shape[:2], k - 1, *v.shape[3:])
    return torch.cat([z, v] if last else [v, z], 2)


def last_of(bc: BoundCall, o: torch.Tensor, n: int) -> torch.Tensor:
    """The expanded call's output [B, T * n, H, ...] at each token's last sub-step."""
    return o.reshape(bc.B, bc.T, n, *o.shape[2:])[:, :, -1].to(bc.out_dtype)


def expanded_runner(run, ex):
    """``run`` (a runner of the expanded declaration) as a runner of the source's calls."""
    def go(bc: BoundCall):
        bc2, n = expand_call(bc, ex)
        o, S = run(bc2)
        return last_of(bc, o, n), S
    return go


def expanded_adjoint(inner, ex):
    """The generated backward of the expanded declaration (``inner``, from
    ``backends.adjoint_runner``) as the source's: its gradients of the coefficients carried
    to the inputs by autograd through their evaluation."""
    def run(kw: dict, leaves: dict, grad_o, grad_S, checkpoints=None):
        src = bind_call(ex.source, (), {**kw, **leaves})
        with torch.enable_grad():
            bc2, n = expand_call(src, ex)
        go = None if grad_o is None else placed(grad_o, n, last=True).reshape(
            src.B, src.T * n, *grad_o.shape[2:])
        return carried_adjoint(inner, bc2, leaves, go, grad_S)
    return run


def carried_adjoint(inner, bc2: BoundCall, leaves: dict, grad_o, grad_S) -> dict | None:
    """The gradients of ``leaves`` from ``inner`` (a generated backward of the call ``bc2``,
    whose tensors and initial state were computed from ``leaves`` with grad): ``inner``'s
    gradients of ``bc2``'s inputs carried back by autograd (None where ``inner`` does not
    serve the call)."""
    feeds = dict(bc2.tensors)
    if bc2.initial_state is not None:
        feeds["initial_state"] = bc2.initial_state
    free = {k: v.detach().requires_grad_(v.requires_grad) for k, v in feeds.items()}
    kw2 = {**bc2.scalars, "output_final_state": True,
           "cu_seqlens": bc2.cu_seqlens_tensor if bc2.cu_seqlens is not None else None}
    got = inner(kw2, free, grad_o, grad_S, None)
    if got is None:
        return None
    want = [k for k, v in feeds.items() if v.requires_grad and got.get(k) is not None]
    names = [k for k, v in leaves.items() if v.requires_grad]
    res = {k: None for k in names}
    if want and names:
        gs = torch.autograd.grad([feeds[k] for k in want], [leaves[k] for k in names],
                                 [got[k] for k in want], allow_unused=True)
        res.update({k: _own(g, leaves[k].dtype) for k, g in zip(names, gs)})
    return res


def _own(g: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A gradient as a tensor of its own: contiguous, at the start of its storage (autograd
    through the interleaving hands back views of a larger buffer)."""
    if g is None:
        return None
    g = g.to(dtype).contiguous()
    return g.clone() if g.storage_offset() else g
