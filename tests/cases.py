"""Inputs for every built-in op, and the matching hand-written loop from loops.py."""
import torch
import torch.nn.functional as F

import loops
import recurkit as rk

# kind of each argument -> how to draw it ([B, T, H, ...] unless noted)
def draw(kind, B, T, H, K, V, gen, gate=None):
    def n(*s):
        return torch.randn(*s, generator=gen)

    def u(*s):
        return torch.rand(*s, generator=gen)
    lo, hi = gate if gate is not None else (-0.5, -0.01)
    if kind == "xk":
        return n(B, T, H, K)
    if kind == "xv":
        return n(B, T, H, V)
    if kind == "key":    # unit keys keep the delta rule contractive
        return F.normalize(n(B, T, H, K), dim=-1)
    if kind == "g":      # log decay per token and head
        return lo + (hi - lo) * u(B, T, H)
    if kind == "gk":     # log decay per key channel
        return lo + (hi - lo) * u(B, T, H, K)
    if kind == "beta":
        return u(B, T, H)
    if kind == "bk":
        return u(B, T, H, K)
    if kind == "wv":
        return u(B, T, H, V)
    if kind == "gamma":  # per-head log decay [H]
        return lo + (hi - lo) * u(H)
    if kind == "a_dplr":  # a = -k * beta style erase read key
        return -F.normalize(n(B, T, H, K), dim=-1) * u(B, T, H, 1)
    raise ValueError(kind)


# op name -> (argument kinds in call order, loop(inputs..., scale, S0), extra kwargs, has scale)
CASES = {
    "linear_attn": (("xk", "key", "xv"), loops.linear_attn, {"normalize": False}),
    "retention": (("xk", "key", "xv"), loops.retention, {}),
    "simple_gla": (("xk", "key", "xv", "g"), loops.simple_gla, {}),
    "gla": (("xk", "key", "xv", "gk"), loops.gla, {}),
    "delta_rule": (("xk", "key", "xv", "beta"), loops.delta_rule, {}),
    "gated_delta_rule": (("xk", "key", "xv", "g", "beta"), loops.gated_delta_rule, {}),
    "kda": (("xk", "key", "xv", "gk", "beta"), loops.kda, {}),
    "gdn2": (("xk", "key", "xv", "gk", "bk", "wv"), loops.gdn2, {}),
    "kla": (("xk", "xk", "xv", "g", "beta"), loops.kla, {}),
    "dplr_delta_rule": (("xk", "key", "xv", "a_dplr", "key", "gk"), loops.dplr_delta_rule, {}),
}
VECTOR_CASES = {
    "hgrn": (("xd", "gd"), loops.hgrn),
    "min_gru": (("xd", "xd"), loops.min_gru),
}
GATED = {"simple_gla", "gla", "gated_delta_rule", "kda", "gdn2", "kla", "dplr_delta_rule"}


def matrix_inputs(name, B, T, H, K, V, seed=0, dtype=torch.float32, gate=None):
    gen = torch.Generator().manual_seed(seed)
    kinds = CASES[name][0]
    xs = [draw(k, B, T, H, K, V, gen, gate) for k in kinds]
    if name == "dplr_delta_rule":   # a = -beta b: the transition I - beta b b^T stays stable
        xs[3] = -xs[4] * torch.rand(B, T, H, 1, generator=gen)
    return [x.to(dtype) for x in xs]


def vector_inputs(name, B, T, H, D, seed=0, dtype=torch.float32, gate=None):
    gen = torch.Generator().manual_seed(seed)
    lo, hi = gate if gate is not None else (-0.5, -0.01)
    out = []
    for kind in VECTOR_CASES[name][0]:
        if kind == "xd":
            out.append(torch.randn(B, T, H, D, generator=gen))
        else:
            out.append(lo + (hi - lo) * torch.rand(B, T, H, D, generator=gen))
    return [x.to(dtype) for x in out]


def call_op(name, inputs, **kw):
    kw = {**CASES.get(name, (None, None, {}))[2], **kw}
    return getattr(rk.ops, name)(*inputs, **kw)


def call_loop(name, inputs, S0=None):
    if name in VECTOR_CASES:
        return VECTOR_CASES[name][1](*inputs, S0)
    K = inputs[0].shape[-1]
    return CASES[name][1](*inputs, K ** -0.5, S0)
