"""``recurkit demo``: declare Gated DeltaNet, run it, check it against a plain torch loop."""
from __future__ import annotations

import time

import torch

import recurkit as rk


@rk.recurrence
def gated_delta_rule(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"],
                     v: rk.Token["V"], g: rk.Token[()], beta: rk.Token[()],
                     scale: rk.Scalar = rk.dim("K") ** -0.5):
    S = rk.exp(g) * S                          # decay (scalar gate, log space)
    S = S + beta * rk.outer(k, v - k @ S)      # delta-rule write
    return S, scale * (q @ S)                  # new state, output o_t = scale * S^T q


def plain_torch_loop(q, k, v, g, beta, scale):
    """The same math written by hand, one token at a time (independent of recurkit)."""
    B, T, H, K = q.shape
    S = torch.zeros(B, H, K, v.shape[-1])
    out = []
    for t in range(T):
        S = S * g[:, t].exp()[..., None, None]
        err = v[:, t] - torch.einsum("bhk,bhkv->bhv", k[:, t], S)
        S = S + beta[:, t][..., None, None] * k[:, t][..., :, None] * err[..., None, :]
        out.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(out, 1), S


def main() -> int:
    torch.manual_seed(0)
    B, T, H, K, V = 2, 256, 4, 32, 48
    q, k = torch.randn(B, T, H, K), torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1)
    v = torch.randn(B, T, H, V)
    g = -torch.rand(B, T, H) * 0.1
    beta = torch.rand(B, T, H)
    print("The declaration, as recurkit traced it:\n")
    print(gated_delta_rule)
    op = rk.compile(gated_delta_rule, backend="auto")
    print(f"\ncompiled: {op!r}")
    t0 = time.perf_counter()
    o, final = op(q, k, v, g, beta, output_final_state=True)
    dt = time.perf_counter() - t0
    o_ref, s_ref = plain_torch_loop(q, k, v, g, beta, K ** -0.5)
    err_o = ((o - o_ref).abs().max() / o_ref.abs().max()).item()
    err_s = ((final - s_ref).abs().max() / s_ref.abs().max()).item()
    print(f"shapes: B={B} T={T} H={H} K={K} V={V}, fp32, {dt * 1e3:.1f} ms")
    print(f"output      {tuple(o.shape)}  max relative error vs plain torch loop: {err_o:.2e}")
    print(f"final state {tuple(final.shape)}  max relative error vs plain torch loop: {err_s:.2e}")
    ok = err_o < 1e-5 and err_s < 1e-5
    print("MATCH" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
