"""Sequence-mixing layers built on the exported ops: drop-in token mixers for [B, T, d_model].

Each layer follows its paper's block (as flash-linear-attention's layers do): projections,
a causal depthwise short convolution with SiLU where the paper has one, the gates, the
recurrence (an ``rk.export``-ed custom op, so autograd and ``torch.compile`` work), then an
RMSNorm of each head's output gated by SiLU of another projection, and the output projection.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..export import export


def _dt_bias(n: int) -> torch.Tensor:
    """softplus^-1 of time steps drawn log-uniformly in [0.001, 0.1] (Mamba-2's init), so the
    initial per-step decays exp(-A dt) stay close to 1."""
    dt = torch.exp(torch.rand(n) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
    return dt + torch.log(-torch.expm1(-dt))


def _op(name: str):
    return export(getattr(ops, name), f"recurkit::{name}")


class ShortConv(nn.Module):
    """Causal depthwise conv over time with kernel ``size``, then SiLU: [B, T, C] -> [B, T, C]."""

    def __init__(self, channels: int, size: int = 4):
        super().__init__()
        self.size = size
        self.conv = nn.Conv1d(channels, channels, size, groups=channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(F.pad(x.transpose(1, 2), (self.size - 1, 0)))
        return F.silu(y.transpose(1, 2))


class GatedRMSNorm(nn.Module):
    """RMSNorm over the last dim, times SiLU(gate)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + self.eps).to(x.dtype)
        return x * self.weight * F.silu(gate)


class _Mixer(nn.Module):
    """Shared parts: q/k/v projections with short convs, output norm, gate and projection."""

    op_name = ""

    def __init__(self, d_model: int, num_heads: int = 4, head_dim: int | None = None,
                 use_short_conv: bool = True, conv_size: int = 4, norm_eps: float = 1e-5,
                 num_v_heads: int | None = None):
        super().__init__()
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}; "
                                 "pass head_dim")
            head_dim = d_model // num_heads
        num_v_heads = num_v_heads or num_heads
        if num_v_heads % num_heads:
            raise ValueError(f"num_v_heads={num_v_heads} is not a multiple of num_heads="
                             f"{num_heads} (each q/k head serves num_v_heads / num_heads "
                             "value heads)")
        # grouped value heads (GVA): q, k have H heads; v, the gates and the output HV
        self.d_model, self.H, self.HV, self.D = d_model, num_heads, num_v_heads, head_dim
        inner, inner_v = num_heads * head_dim, num_v_heads * head_dim
        self.q_proj = nn.Linear(d_model, inner, bias=False)
        self.k_proj = nn.Linear(d_model, inner, bias=False)
        self.v_proj = nn.Linear(d_model, inner_v, bias=False)
        self.use_short_conv = use_short_conv
        if use_short_conv:
            self.q_conv, self.k_conv, self.v_conv = (ShortConv(c, conv_size)
                                                     for c in (inner, inner, inner_v))
        self.g_proj = nn.Linear(d_model, inner_v, bias=False)
        self.o_norm = GatedRMSNorm(head_dim, norm_eps)
        self.o_proj = nn.Linear(inner_v, d_model, bias=False)
        self.op = _op(self.op_name)

    def qkv(self, x):
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.use_short_conv:
            q, k, v = self.q_conv(q), self.k_conv(k), self.v_conv(v)
        return (t.reshape(B, T, -1, self.D) for t in (q, k, v))

    def finish(self, o, x):
        B, T, _ = x.shape
        gate = self.g_proj(x).reshape(B, T, self.HV, self.D)
        return self.o_proj(self.o_norm(o, gate).reshape(B, T, self.HV * self.D))


class GatedDeltaNet(_Mixer):
    """Gated DeltaNet (Yang et al. 2024): S = e^g (I - beta k k^T) S + beta k v^T with
    l2-normalised q, k; g = -exp(A) softplus(a(x) + dt_bias) per head (Mamba-2 style)."""

    op_name = "gated_delta_rule"

    def __init__(self, d_model: int, num_heads: int = 4, head_dim: int | None = None, **kw):
        super().__init__(d_model, num_heads, head_dim, **kw)
        HV = self.HV
        self.a_proj = nn.Linear(d_model, HV, bias=False)
        self.b_proj = nn.Linear(d_model, HV, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.empty(HV).uniform_(1, 16)))
        self.dt_bias = nn.Parameter(_dt_bias(HV))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        g = -self.A_log.exp() * F.softplus(self.a_proj(x) + self.dt_bias)
        beta = torch.sigmoid(self.b_proj(x))
        o, _ = self.op(q, k, v, g, beta)
        return self.finish(o, x)


class GLA(_Mixer):
    """Gated linear attention (Yang et al. 2023): S = Diag(e^gk) S + k v^T with a low-rank
    per-channel gate gk = logsigmoid(W2 W1 x) / 16; no short conv by default."""

    op_name = "gla"

    def __init__(self, d_model: int, num_heads: int = 4, head_dim: int | None = None,
                 gate_low_rank: int = 16, use_short_conv: bool = False, **kw):
        super().__init__(d_model, num_heads, head_dim, use_short_conv=use_short_conv, **kw)
        self.gk_proj = nn.Sequential(nn.Linear(d_model, gate_low_rank, bias=False),
                                     nn.Linear(gate_low_rank, self.HV * self.D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        gk = F.logsigmoid(self.gk_proj(x)).reshape(B, T, self.HV, self.D) / 16
        o, _ = self.op(q, k, v, gk)
        return self.finish(o, x)


class KDA(_Mixer):
    """Kimi Delta Attention: Gated DeltaNet with a per-channel gate,
    g = -exp(A) softplus(W2 W1 x + dt_bias) over the key channels."""

    op_name = "kda"

    def __init__(self, d_model: int, num_heads: int = 4, head_dim: int | None = None,
                 gate_low_rank: int | None = None, **kw):
        super().__init__(d_model, num_heads, head_dim, **kw)
        r = gate_low_rank or self.D
        HV = self.HV
        self.f_proj = nn.Sequential(nn.Linear(d_model, r, bias=False),
                                    nn.Linear(r, HV * self.D, bias=False))
        self.b_proj = nn.Linear(d_model, HV, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.empty(HV).uniform_(1, 16)))
        self.dt_bias = nn.Parameter(_dt_bias(HV * self.D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        f = F.softplus(self.f_proj(x) + self.dt_bias).reshape(B, T, self.HV, self.D)
        g = -self.A_log.exp()[:, None] * f
        beta = torch.sigmoid(self.b_proj(x))
        o, _ = self.op(q, k, v, g, beta)
        return self.finish(o, x)
