"""Delta-rule recurrences: a rank-1 erase before the write, S' = (I - a b^T) D S + k w^T."""
from __future__ import annotations

from . import _lang as rk
from ..ir.rewrite import with_prologue
from ._builtin import builtin, flag, run
from .gated import SCALE


def _qk_l2(decl):
    """The same step with q and k l2-normalised first (FLA's use_qk_l2norm_in_kernel)."""
    return with_prologue(decl, name=decl.name + "_l2", q=rk.l2norm, k=rk.l2norm)


@rk.recurrence(name="delta_rule")
def delta_rule_decl(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"],
                    v: rk.Token["V"], beta: rk.Token[()], scale: rk.Scalar = SCALE):
    """DeltaNet: S' = (I - b k k^T) S + b k v^T."""
    S = S + beta * rk.outer(k, v - k @ S)
    return S, scale * (q @ S)


delta_rule_l2_decl = _qk_l2(delta_rule_decl)


@builtin(delta_rule_decl, l2norm=delta_rule_l2_decl)
def delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
               use_qk_l2norm_in_kernel=False, cu_seqlens=None, *, backend="auto"):
    """FLA's ``chunk_delta_rule``: ``beta`` [B,T,H]."""
    decl = delta_rule_l2_decl if flag("use_qk_l2norm_in_kernel", use_qk_l2norm_in_kernel) \
        else delta_rule_decl
    return run(decl, backend, q, k, v, beta, scale, initial_state, output_final_state,
               cu_seqlens)


@rk.recurrence(name="gated_delta_rule")
def gated_delta_rule_decl(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"],
                          v: rk.Token["V"], g: rk.Token[()], beta: rk.Token[()],
                          scale: rk.Scalar = SCALE):
    """Gated DeltaNet: S' = (I - b k k^T) e^g S + b k v^T."""
    S = rk.exp(g) * S
    S = S + beta * rk.outer(k, v - k @ S)
    return S, scale * (q @ S)


gated_delta_rule_l2_decl = _qk_l2(gated_delta_rule_decl)


@builtin(gated_delta_rule_decl, l2norm=gated_delta_rule_l2_decl)
def gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                     use_qk_l2norm_in_kernel=False, cu_seqlens=None, *, backend="auto"):
    """FLA's ``chunk_gated_delta_rule``: ``g`` [B,T,H] log-decay, ``beta`` [B,T,H]."""
    decl = gated_delta_rule_l2_decl if flag("use_qk_l2norm_in_kernel",
                                            use_qk_l2norm_in_kernel) else gated_delta_rule_decl
    return run(decl, backend, q, k, v, g, beta, scale, initial_state, output_final_state,
               cu_seqlens)


@rk.recurrence(name="kda")
def kda_decl(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"], v: rk.Token["V"],
             g: rk.Token["K"], beta: rk.Token[()], scale: rk.Scalar = SCALE):
    """Kimi Delta Attention: S' = (I - b k k^T) Diag(e^g) S + b k v^T."""
    S = rk.exp(g) * S
    S = S + beta * rk.outer(k, v - k @ S)
    return S, scale * (q @ S)


kda_l2_decl = _qk_l2(kda_decl)


@builtin(kda_decl, l2norm=kda_l2_decl)
def kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
        use_qk_l2norm_in_kernel=False, cu_seqlens=None, *, backend="auto"):
    """FLA's ``chunk_kda``: ``g`` [B,T,H,K] log-decay per key channel, ``beta`` [B,T,H]."""
    decl = kda_l2_decl if flag("use_qk_l2norm_in_kernel", use_qk_l2norm_in_kernel) \
        else kda_decl
    return run(decl, backend, q, k, v, g, beta, scale, initial_state, output_final_state,
               cu_seqlens)


@rk.recurrence(name="gdn2")
def gdn2_decl(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"], v: rk.Token["V"],
              g: rk.Token["K"], b: rk.Token["K"], w: rk.Token["V"], scale: rk.Scalar = SCALE):
    """GDN-2: S' = (I - k (b*k)^T) Diag(e^g) S + k (w*v)^T."""
    S = rk.exp(g) * S
    S = S + rk.outer(k, w * v - (b * k) @ S)
    return S, scale * (q @ S)


gdn2_l2_decl = _qk_l2(gdn2_decl)


@builtin(gdn2_decl, l2norm=gdn2_l2_decl)
def gdn2(q, k, v, g, b, w, scale=None, initial_state=None, output_final_state=False,
         use_qk_l2norm_in_kernel=False, cu_seqlens=None, *, backend="auto"):
    """FLA's ``chunk_gdn2``: ``g``, ``b`` [B,T,H,K] (log-decay, erase gate), ``w`` [B,T,H,V]."""
    decl = gdn2_l2_decl if flag("use_qk_l2norm_in_kernel", use_qk_l2norm_in_kernel) \
        else gdn2_decl
    return run(decl, backend, q, k, v, g, b, w, scale, initial_state, output_final_state,
               cu_seqlens)


@rk.recurrence(name="kla")
def kla_decl(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"], v: rk.Token["V"],
             g: rk.Token[()], eta: rk.Token[()], scale: rk.Scalar = SCALE):
    """Kaczmarz linear attention: Gated DeltaNet with beta = eta / (k.k + 1e-6)."""
    beta = eta / (k @ k + 1e-6)
    S = rk.exp(g) * S
    S = S + beta * rk.outer(k, v - k @ S)
    return S, scale * (q @ S)


@builtin(kla_decl)
def kla(q, k, v, g, eta, scale=None, initial_state=None, output_final_state=False,
        cu_seqlens=None, *, backend="auto"):
    """Kaczmarz linear attention (not in FLA; GDN's signature with ``eta`` for ``beta``):
    the write strength is normalised by the key's squared norm, beta = eta / (|k|^2 + 1e-6)."""
    return run(kla_decl, backend, q, k, v, g, eta, scale, initial_state, output_final_state,
               cu_seqlens)


@rk.recurrence(name="dplr_delta_rule")
def dplr_delta_rule_decl(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"],
                         v: rk.Token["V"], a: rk.Token["K"], b: rk.Token["K"],
                         gk: rk.Token["K"], scale: rk.Scalar = SCALE):
    """DPLR (RWKV-7): S' = (Diag(e^gk) + b a^T) S + k v^T (the a/b term reads the old S)."""
    S = rk.exp(gk) * S + rk.outer(b, a @ S) + rk.outer(k, v)
    return S, scale * (q @ S)


@builtin(dplr_delta_rule_decl)
def dplr_delta_rule(q, k, v, a, b, gk, scale=None, initial_state=None,
                    output_final_state=False, cu_seqlens=None, *, backend="auto"):
    """FLA's ``chunk_dplr_delta_rule``: ``a``, ``b``, ``gk`` [B,T,H,K]."""
    return run(dplr_delta_rule_decl, backend, q, k, v, a, b, gk, scale, initial_state,
               output_final_state, cu_seqlens)
