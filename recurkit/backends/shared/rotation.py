"""The host side of the rotating frame (``lowering.rotation``): a call of a declaration that
rotates its state, as a call of its rotation-free declaration, and back.

Per segment (a batch row, or a ``cu_seqlens`` sequence) the step's angles are summed in
float64 into ``Theta_t`` (inclusive) and its last ``Theta_T``; a value the frame turns is
rotated by minus its level, ``Theta_{t-1} - Theta_T`` plus the angles between the step's start
and it; the initial state by ``Theta_T``; the output (where it carries the rotated dim) back
by its level. The final state needs no turn. The angles and turns are torch ops, so autograd
reaches the inputs through them; the angles are summed in float64 and reduced to [-pi, pi)
before their fp32 cosines, so the turns keep fp32 accuracy whatever the length.
"""
from __future__ import annotations

import math

import torch

from ...ir.bind import BoundCall, bind_call
from ...ir.interpret import evaluate, rotate_pairs, turn_pairs
from ...lowering.rotation import frame, has_rotation
from .host import on_dims
from .substeps import carried_adjoint

def frame_of(program):
    """The rotating frame of ``program`` (None: it rotates nothing, or its rotations run
    sequentially, where ``analyze`` says why)."""
    if program.new_state is None or not has_rotation(program):
        return None
    fr = frame(program)
    return None if isinstance(fr, str) else fr


def summed_angle(bc: BoundCall, fr, vals: dict, terms) -> torch.Tensor:
    """``sum(c * angle)`` over ``terms`` per token, float64 [B, T, H, P|1] (``vals``: the
    angles evaluated)."""
    P = bc.sizes[fr.pair] if fr.pair else 1
    pd = (fr.pair,) if fr.pair else ()
    out = torch.zeros(bc.B, bc.T, bc.H, P, dtype=torch.float64, device=bc.device)
    for a, c in terms:
        v = on_dims(vals[id(a)], a.dims, pd).double()
        out = out + c * (v if fr.pair else v.unsqueeze(-1))
    return out


def cos_sin_of(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cosine and sine of a float64 angle, reduced to [-pi, pi) first (so an angle of
    any size keeps fp32 accuracy)."""
    t = (torch.remainder(t + math.pi, 2 * math.pi) - math.pi).float()
    return torch.cos(t), torch.sin(t)


def framed_call(bc: BoundCall, fr) -> tuple[BoundCall, tuple | None]:
    """(the rotation-free declaration's call, the cosine and sine [B, T, H, P|1] of the
    output's turn, or None)."""
    nodes = [n for n, _ in fr.hoisted.values()]
    angle_nodes = [a for a, _ in fr.total]
    for _, lev in fr.hoisted.values():
        angle_nodes += [a for a, _ in lev.terms]
    if fr.out_level is not None:
        angle_nodes += [a for a, _ in fr.out_level.terms]
    vals = evaluate(bc, nodes + angle_nodes)
    P = bc.sizes[fr.pair] if fr.pair else 1
    lead = (bc.B, bc.T, bc.H)
    pd = (fr.pair,) if fr.pair else ()

    def angle(terms) -> torch.Tensor:
        return summed_angle(bc, fr, vals, terms)

    base = end = None
    if fr.rotates_state:
        step = angle(fr.total)
        csum = torch.cat([step.new_zeros(bc.B, 1, bc.H, P), step.cumsum(1)], 1)  # [B, T+1]
        if bc.cu_seqlens is None:
            end = csum[:, -1]                                  # [B, H, P]
            base = csum[:, :-1] - end.unsqueeze(1)             # Theta_{t-1} - Theta_T
        else:
            cu = bc.cu_seqlens
            starts = torch.tensor(cu[:-1], device=bc.device)
            ends = torch.tensor(cu[1:], device=bc.device)
            end = (csum[0, ends] - csum[0, starts])            # [N, H, P]
            seg = torch.repeat_interleave(torch.arange(len(cu) - 1, device=bc.device),
                                          ends - starts)
            base = (csum[:, :-1] - csum[:, starts[seg]] - end[seg].unsqueeze(0))

    def level(lev) -> torch.Tensor:
        a = angle(lev.terms)
        return a + base if lev.anchored and base is not None else a

    trig: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(lev, sign: float) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of ``sign`` times the level, in fp32 from the float64 angle reduced
        to [-pi, pi) (so a cumulative angle of any size keeps fp32 accuracy)."""
        key = (lev.anchored, tuple((id(a), c) for a, c in lev.terms), sign)
        if key not in trig:
            trig[key] = cos_sin_of(sign * level(lev))
        return trig[key]

    tensors = dict(getattr(bc.tensors, "given", bc.tensors))   # grouped: as given
    cs_dims = pd or ("_one",)
    for name, (n, lev) in fr.hoisted.items():
        v = vals[id(n)].expand(*lead, *(bc.sizes[d] for d in n.dims))
        if fr.dim in n.dims and not lev.zero:
            v = turn_pairs(v, n.dims, *cos_sin(lev, -1.0), cs_dims, fr.dim, fr.pair,
                           fr.layout, 3)
        tensors[name] = v.float()
    init = bc.initial_state
    if init is not None and end is not None and fr.dim in fr.source.state.dims:
        init = rotate_pairs(init, fr.source.state.dims, end, cs_dims, fr.dim, fr.pair,
                            fr.layout, 2).float()
    turn = cos_sin(fr.out_level, 1.0) if fr.out_level is not None else None
    kw = {**tensors, **bc.scalars, "initial_state": init,
          "output_final_state": bc.output_final_state, "cu_seqlens": bc.cu_seqlens_tensor
          if bc.cu_seqlens is not None else None}
    return bind_call(fr.program, (), kw), turn


def turned_output(bc: BoundCall, fr, o: torch.Tensor, turn: torch.Tensor | None):
    if turn is None:
        return o
    dims = fr.source.output.dims
    pd = (fr.pair,) if fr.pair else ("_one",)
    return turn_pairs(o, dims, *turn, pd, fr.dim, fr.pair, fr.layout, 3).to(o.dtype)


def framed_runner(run, fr):
    """``run`` (a runner of the rotation-free declaration) as a runner of the source's calls."""
    def go(bc: BoundCall):
        bc2, turn = framed_call(bc, fr)
        o, S = run(bc2)
        return turned_output(bc, fr, o, turn).to(bc.out_dtype), S
    return go


def framed_adjoint(inner, fr):
    """The generated backward of the rotation-free declaration (``inner``) as the source's:
    its gradients carried to the inputs by autograd through the turns. Only for a frame whose
    output is not turned (the turn's angle gradient needs the forward's output)."""
    def run(kw: dict, leaves: dict, grad_o, grad_S, checkpoints=None):
        src = bind_call(fr.source, (), {**kw, **leaves})
        with torch.enable_grad():
            bc2, _ = framed_call(src, fr)
        return carried_adjoint(inner, bc2, leaves, grad_o, grad_S)
    return run
