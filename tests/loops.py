"""Per-step loops written by hand from the math in DESIGN.md and FLA's naive code.

These are independent of recurkit's IR: the tests compare the interpreter against them.
Inputs are [B, T, H, ...] float tensors; states are [B, H, K, V] (or [B, H, D]).
"""
import torch

# the dtype the loops compute in: float64 gives the ground truth for accuracy tests
DTYPE = torch.float32


def _mv(k, S):  # k^T S: [B,H,K] x [B,H,K,V] -> [B,H,V]
    return torch.einsum("bhk,bhkv->bhv", k, S)


def _outer(a, b):
    return a[..., :, None] * b[..., None, :]


def _l2(x):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def run_matrix(step, q, v_dim, S0, scale, T, *tok):
    B, _, H, K = q.shape
    S = torch.zeros(B, H, K, v_dim, dtype=DTYPE) if S0 is None else S0.to(DTYPE).clone()
    outs = []
    for t in range(T):
        S = step(S, *(x[:, t].to(DTYPE) for x in tok))
        outs.append(scale * _mv(q[:, t].to(DTYPE), S))
    return torch.stack(outs, 1), S


def linear_attn(q, k, v, scale, S0=None):
    return run_matrix(lambda S, k, v: S + _outer(k, v), q, v.shape[-1], S0, scale,
                      q.shape[1], k, v)


def retention(q, k, v, scale, S0=None):
    H = q.shape[2]
    gamma = 1 - 2.0 ** (-5.0 - torch.arange(H, dtype=DTYPE))
    return run_matrix(lambda S, k, v: gamma[None, :, None, None] * S + _outer(k, v), q,
                      v.shape[-1], S0, scale, q.shape[1], k, v)


def simple_gla(q, k, v, g, scale, S0=None):
    return run_matrix(lambda S, k, v, g: g.exp()[..., None, None] * S + _outer(k, v), q,
                      v.shape[-1], S0, scale, q.shape[1], k, v, g)


def simple_gla_gamma(q, k, v, g_gamma, scale, S0=None):
    d = g_gamma.to(DTYPE).exp()[None, :, None, None]
    return run_matrix(lambda S, k, v: d * S + _outer(k, v), q, v.shape[-1], S0, scale,
                      q.shape[1], k, v)


def gla(q, k, v, g, scale, S0=None):
    return run_matrix(lambda S, k, v, g: g.exp()[..., None] * S + _outer(k, v), q,
                      v.shape[-1], S0, scale, q.shape[1], k, v, g)


def delta_rule(q, k, v, beta, scale, S0=None):
    def step(S, k, v, b):
        return S + b[..., None, None] * _outer(k, v - _mv(k, S))
    return run_matrix(step, q, v.shape[-1], S0, scale, q.shape[1], k, v, beta)


def gated_delta_rule(q, k, v, g, beta, scale, S0=None):
    def step(S, k, v, g, b):
        S = S * g.exp()[..., None, None]
        return S + b[..., None, None] * _outer(k, v - _mv(k, S))
    return run_matrix(step, q, v.shape[-1], S0, scale, q.shape[1], k, v, g, beta)


def kda(q, k, v, g, beta, scale, S0=None):
    def step(S, k, v, g, b):
        S = S * g.exp()[..., None]
        return S + _outer(b[..., None] * k, v - _mv(k, S))
    return run_matrix(step, q, v.shape[-1], S0, scale, q.shape[1], k, v, g, beta)


def gdn2(q, k, v, g, b, w, scale, S0=None):
    def step(S, k, v, g, b, w):
        S = S * g.exp()[..., None]
        return S + _outer(k, w * v - _mv(b * k, S))
    return run_matrix(step, q, v.shape[-1], S0, scale, q.shape[1], k, v, g, b, w)


def kla(q, k, v, g, eta, scale, S0=None):
    def step(S, k, v, g, eta):
        beta = eta / ((k * k).sum(-1) + 1e-6)
        S = S * g.exp()[..., None, None]
        return S + beta[..., None, None] * _outer(k, v - _mv(k, S))
    return run_matrix(step, q, v.shape[-1], S0, scale, q.shape[1], k, v, g, eta)


def dplr_delta_rule(q, k, v, a, b, gk, scale, S0=None):
    def step(S, k, v, a, b, gk):
        return gk.exp()[..., None] * S + _outer(b, _mv(a, S)) + _outer(k, v)
    return run_matrix(step, q, v.shape[-1], S0, scale, q.shape[1], k, v, a, b, gk)


def run_vector(step, x, h0, *tok):
    B, T, H, D = x.shape
    h = torch.zeros(B, H, D, dtype=DTYPE) if h0 is None else h0.to(DTYPE).clone()
    outs = []
    for t in range(T):
        h = step(h, x[:, t].to(DTYPE), *(y[:, t].to(DTYPE) for y in tok))
        outs.append(h)
    return torch.stack(outs, 1), h


def hgrn(x, g, h0=None):
    return run_vector(lambda h, x, g: g.exp() * h + x, x, h0, g)


def min_gru(x, z, h0=None):
    return run_vector(lambda h, x, z: (1 - torch.sigmoid(z)) * h + torch.sigmoid(z) * x, x, h0, z)


def l2(x):
    return _l2(x.float())
