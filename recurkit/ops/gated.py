"""Gated linear recurrences: S' = decay * S + k v^T, o = scale * S'^T q."""
from __future__ import annotations

import torch

from . import _lang as rk
from ..ir import CallError
from ._builtin import builtin, flag, run

SCALE = rk.dim("K") ** -0.5


@rk.recurrence(name="linear_attn")
def linear_attn_decl(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"],
                     v: rk.Token["V"], scale: rk.Scalar = SCALE):
    """Linear attention: S' = S + k v^T."""
    S = S + rk.outer(k, v)
    return S, scale * (q @ S)


@rk.recurrence(name="key_sum")
def key_sum_decl(z: rk.State["K"], q: rk.Token["K"], k: rk.Token["K"],
                 scale: rk.Scalar = SCALE):
    """The normaliser of linear attention: z' = z + k, o = scale * q . z'."""
    z = z + k
    return z, scale * (q @ z)


@builtin(linear_attn_decl, normalizer=key_sum_decl)
def linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False,
                normalize=True, cu_seqlens=None, *, backend="auto"):
    """FLA's ``chunk_linear_attn``. With ``normalize`` (FLA's default) the output is divided
    by ``scale * q . cumsum(k) + 1e-10`` and the state is the pair ``(kv [N,H,K,V], z [N,1,H,K])``."""
    if not flag("normalize", normalize):
        return run(linear_attn_decl, backend, q, k, v, scale, initial_state,
                   output_final_state, cu_seqlens)
    kv0 = z0 = None
    if isinstance(initial_state, (tuple, list)):
        if len(initial_state) != 2:
            raise CallError("argument 'initial_state': with normalize=True expected a tensor or "
                            f"a pair (kv, z), got a sequence of {len(initial_state)}")
        kv0, z0 = initial_state
        if z0 is not None:
            if not isinstance(z0, torch.Tensor) or z0.dim() != 4 or z0.shape[1] != 1:
                raise CallError("argument 'initial_state': z must be laid out [N, 1, H, K], got "
                                f"{getattr(z0, 'shape', type(z0).__name__)}")
            z0 = z0.squeeze(1)
    else:
        kv0 = initial_state
    o, kv = run(linear_attn_decl, backend, q, k, v, scale, kv0, output_final_state, cu_seqlens)
    den, z = run(key_sum_decl, backend, q, k, scale, z0, output_final_state, cu_seqlens)
    o = (o.float() / (den.float().unsqueeze(-1) + 1e-10)).to(o.dtype)
    final = (kv, z.unsqueeze(1).to(k.dtype)) if output_final_state else None
    return o, final


@rk.recurrence(name="retention")
def retention_decl(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"],
                   v: rk.Token["V"], scale: rk.Scalar = SCALE):
    """RetNet: S' = gamma_h S + k v^T with gamma_h = 1 - 2^(-5-h)."""
    gamma = 1 - 2.0 ** (-5.0 - rk.head())
    S = gamma * S + rk.outer(k, v)
    return S, scale * (q @ S)


@builtin(retention_decl)
def retention(q, k, v, scale=None, initial_state=None, output_final_state=False,
              cu_seqlens=None, *, backend="auto"):
    """FLA's ``chunk_retention``: fixed per-head decay gamma_h = 1 - 2^(-5-h)."""
    return run(retention_decl, backend, q, k, v, scale, initial_state, output_final_state,
               cu_seqlens)


@rk.recurrence(name="simple_gla")
def simple_gla_decl(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"],
                    v: rk.Token["V"], g: rk.Token[()], scale: rk.Scalar = SCALE):
    """Simple GLA / Mamba-2: S' = e^g S + k v^T, a scalar log-gate per token and head."""
    S = rk.exp(g) * S + rk.outer(k, v)
    return S, scale * (q @ S)


@rk.recurrence(name="simple_gla_gamma")
def simple_gla_gamma_decl(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"],
                          v: rk.Token["V"], g_gamma: rk.Param[()],
                          scale: rk.Scalar = SCALE):
    """Simple GLA with a learned per-head log-decay: S' = e^{g_gamma[h]} S + k v^T."""
    S = rk.exp(g_gamma) * S + rk.outer(k, v)
    return S, scale * (q @ S)


@builtin(simple_gla_decl, g_gamma=simple_gla_gamma_decl)
def simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
               output_final_state=False, cu_seqlens=None, *, backend="auto"):
    """FLA's ``chunk_simple_gla``: pass ``g`` [B,T,H] (per token) or ``g_gamma`` [H] (per
    head), both log-space decays."""
    if g is not None and g_gamma is not None:
        raise CallError("simple_gla: pass either 'g' [B, T, H] or 'g_gamma' [H], not both")
    if g is not None:
        return run(simple_gla_decl, backend, q, k, v, g, scale, initial_state,
                   output_final_state, cu_seqlens)
    if g_gamma is not None:
        return run(simple_gla_gamma_decl, backend, q, k, v, g_gamma, scale, initial_state,
                   output_final_state, cu_seqlens)
    return run(linear_attn_decl, backend, q, k, v, scale, initial_state, output_final_state,
               cu_seqlens)


@rk.recurrence(name="gla")
def gla_decl(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"], v: rk.Token["V"],
             g: rk.Token["K"], scale: rk.Scalar = SCALE):
    """GLA: S' = Diag(e^g) S + k v^T, a log-gate per key channel."""
    S = rk.exp(g) * S + rk.outer(k, v)
    return S, scale * (q @ S)


@builtin(gla_decl)
def gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
        *, backend="auto"):
    """FLA's ``chunk_gla``: ``g`` [B,T,H,K] is a log-space decay per key channel."""
    return run(gla_decl, backend, q, k, v, g, scale, initial_state, output_final_state,
               cu_seqlens)
