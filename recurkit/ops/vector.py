"""Elementwise vector-state recurrences: h' = a * h + b, o = h'."""
from __future__ import annotations

from . import _lang as rk
from ..ir import CallError
from ._builtin import builtin, run


@rk.recurrence(name="hgrn")
def hgrn_decl(h: rk.State["D"], x: rk.Token["D"], g: rk.Token["D"]):
    """HGRN: h' = e^g * h + x, o = h'."""
    h = rk.exp(g) * h + x
    return h, h


@rk.recurrence(name="min_gru")
def min_gru_decl(h: rk.State["D"], x: rk.Token["D"], z: rk.Token["D"]):
    """minGRU: h' = (1 - sigmoid(z)) * h + sigmoid(z) * x, o = h'."""
    h = rk.sigmoid(-z) * h + rk.sigmoid(z) * x
    return h, h


def _vector_call(decl, backend, x, other, initial_state, output_final_state, cu_seqlens):
    """Accept FLA's head-less [B, T, D] layout (as H = 1) as well as [B, T, H, D]."""
    import torch
    if isinstance(x, torch.Tensor) and x.dim() == 3:
        if isinstance(initial_state, torch.Tensor):
            if initial_state.dim() != 2:
                raise CallError("argument 'initial_state': with x laid out [B, T, D] expected "
                                f"[N, D], got shape {tuple(initial_state.shape)}")
            initial_state = initial_state.unsqueeze(1)
        other = other.unsqueeze(2) if isinstance(other, torch.Tensor) else other
        o, final = run(decl, backend, x.unsqueeze(2), other, initial_state, output_final_state,
                       cu_seqlens)
        return o.squeeze(2), None if final is None else final.squeeze(1)
    return run(decl, backend, x, other, initial_state, output_final_state, cu_seqlens)


@builtin(hgrn_decl)
def hgrn(x, g, initial_state=None, output_final_state=False, cu_seqlens=None, *,
         backend="auto"):
    """FLA's ``fused_recurrent_hgrn``: ``x``, ``g`` [B,T,D] (FLA) or [B,T,H,D]; ``g`` is a
    log-space forget gate. The final state is fp32."""
    return _vector_call(hgrn_decl, backend, x, g, initial_state, output_final_state, cu_seqlens)


@builtin(min_gru_decl)
def min_gru(x, z, initial_state=None, output_final_state=False, cu_seqlens=None, *,
            backend="auto"):
    """minGRU (no FLA op): ``x`` is the candidate state h~, ``z`` the gate's pre-activation,
    both [B,T,D] or [B,T,H,D]."""
    return _vector_call(min_gru_decl, backend, x, z, initial_state, output_final_state,
                        cu_seqlens)
