"""Every built-in's reference interpreter against a hand-written per-step loop."""
import pytest
import torch

import recurkit as rk
from cases import CASES, GATED, VECTOR_CASES, call_loop, call_op, matrix_inputs, vector_inputs

B, H, K, V, D = 2, 3, 6, 5, 7  # K != V so a transposition cannot pass


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def inputs(name, T, **kw):
    if name in VECTOR_CASES:
        return vector_inputs(name, B, T, H, D, **kw)
    return matrix_inputs(name, B, T, H, K, V, **kw)


def state(name, N, seed=7):
    shape = (N, H, D) if name in VECTOR_CASES else (N, H, K, V)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


ALL = [*CASES, *VECTOR_CASES]


@pytest.mark.parametrize("T", [1, 63, 100])
@pytest.mark.parametrize("name", ALL)
def test_matches_loop_with_initial_and_final_state(name, T):
    x = inputs(name, T)
    S0 = state(name, B)
    o, S = call_op(name, x, initial_state=S0, output_final_state=True)
    o_ref, S_ref = call_loop(name, x, S0)
    assert o.shape == o_ref.shape and S.shape == S_ref.shape
    assert rel(o, o_ref) < 1e-5
    assert rel(S, S_ref) < 1e-5
    assert S.dtype == torch.float32


@pytest.mark.parametrize("name", ALL)
def test_defaults_zero_state_and_no_final(name):
    x = inputs(name, 9)
    o, S = call_op(name, x)
    assert S is None
    o_ref, _ = call_loop(name, x)
    assert rel(o, o_ref) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("name", ALL)
def test_low_precision_inputs_accumulate_in_fp32(name, dtype, tol):
    x = inputs(name, 40, dtype=dtype)
    o, S = call_op(name, x, output_final_state=True)
    assert o.dtype == dtype and S.dtype == torch.float32
    o_ref, S_ref = call_loop(name, x)  # the loop upcasts the same rounded inputs
    assert rel(o, o_ref) < tol          # only the output's rounding differs
    assert rel(S, S_ref) < 1e-5


@pytest.mark.parametrize("name", ALL)
def test_varlen_equals_segments_one_by_one(name):
    lens = [1, 17, 0, 5, 40]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    T = sum(lens)
    packed = [t[:1] for t in inputs(name, T)]
    S0 = state(name, len(lens))
    o, S = call_op(name, packed, initial_state=S0, output_final_state=True, cu_seqlens=cu)
    assert o.shape[:2] == (1, T) and S.shape[0] == len(lens)
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if e == s:  # an empty sequence passes its initial state through
            assert torch.equal(S[n], S0[n])
            continue
        seg = [t[:, s:e] for t in packed]
        o_n, S_n = call_op(name, seg, initial_state=S0[n:n + 1], output_final_state=True)
        assert torch.allclose(o[:, s:e], o_n, rtol=1e-6, atol=1e-6)
        assert torch.allclose(S[n:n + 1], S_n, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gate", [(-69.0, -60.0), (-1e-6, -1e-7)], ids=["decay~1e-30", "decay~1"])
@pytest.mark.parametrize("name", sorted(GATED) + ["hgrn"])
def test_extreme_gates_stay_finite_and_exact(name, gate):
    x = inputs(name, 100, gate=gate)
    o, S = call_op(name, x, output_final_state=True)
    o_ref, S_ref = call_loop(name, x)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5


def test_final_state_round_trips_through_initial_state():
    x = inputs("gated_delta_rule", 50)
    o_full, S_full = call_op("gated_delta_rule", x, output_final_state=True)
    first = [t[:, :20] for t in x]
    rest = [t[:, 20:] for t in x]
    o1, S1 = call_op("gated_delta_rule", first, output_final_state=True)
    o2, S2 = call_op("gated_delta_rule", rest, initial_state=S1, output_final_state=True)
    assert torch.allclose(torch.cat([o1, o2], 1), o_full, atol=1e-6)
    assert torch.allclose(S2, S_full, atol=1e-6)


def test_autograd_matches_the_loop():
    x = [t.requires_grad_() for t in inputs("kda", 30)]
    S0 = state("kda", B).requires_grad_()
    o, S = call_op("kda", x, initial_state=S0, output_final_state=True)
    w_o, w_s = torch.randn_like(o), torch.randn_like(S)
    grads = torch.autograd.grad((o * w_o).sum() + (S * w_s).sum(), [*x, S0])
    o_r, S_r = call_loop("kda", x, S0)
    grads_ref = torch.autograd.grad((o_r * w_o).sum() + (S_r * w_s).sum(), [*x, S0])
    for g, r in zip(grads, grads_ref):
        assert rel(g, r) < 1e-5


def test_linear_attn_normalize_is_fla_default():
    q, k, v = inputs("linear_attn", 12)
    q, k = q.abs(), k.abs()  # positive feature maps keep the denominator away from 0
    o, (kv, z) = rk.ops.linear_attn(q, k, v, output_final_state=True)
    o_raw, kv_ref = call_loop("linear_attn", [q, k, v])
    den = (q * K ** -0.5 * k.cumsum(1)).sum(-1, keepdim=True)
    assert rel(o, o_raw / (den + 1e-10)) < 1e-5
    assert rel(kv, kv_ref) < 1e-5
    assert z.shape == (B, 1, H, K) and rel(z.squeeze(1), k.sum(1)) < 1e-5
    # the pair continues the computation
    o2, _ = rk.ops.linear_attn(q, k, v, initial_state=(kv, z))
    den2 = (q * K ** -0.5 * (k.cumsum(1) + z)).sum(-1, keepdim=True)
    o2_ref, _ = call_loop("linear_attn", [q, k, v], kv)
    assert rel(o2, o2_ref / (den2 + 1e-10)) < 1e-4


def test_simple_gla_per_head_param_gate():
    q, k, v, _ = inputs("simple_gla", 20)
    g_gamma = -torch.rand(H)
    o, S = rk.ops.simple_gla(q, k, v, g_gamma=g_gamma, output_final_state=True)
    g = g_gamma.expand(B, 20, H)
    o_ref, S_ref = call_loop("simple_gla", [q, k, v, g])
    assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5
    with pytest.raises(rk.CallError, match="not both"):
        rk.ops.simple_gla(q, k, v, g=g, g_gamma=g_gamma)


@pytest.mark.parametrize("name", ["delta_rule", "gated_delta_rule", "kda", "gdn2"])
def test_qk_l2norm_in_kernel(name):
    x = inputs(name, 25)
    x[0], x[1] = x[0] * 3, torch.randn_like(x[1])  # un-normalised q and k
    o = call_op(name, x, use_qk_l2norm_in_kernel=True)[0]
    from loops import l2
    o_ref, _ = call_loop(name, [l2(x[0]), l2(x[1]), *x[2:]])
    assert rel(o, o_ref) < 1e-5


@pytest.mark.parametrize("name", ["hgrn", "min_gru"])
def test_vector_ops_take_fla_headless_layout(name):
    x, y = inputs(name, 11)
    x3, y3 = x[:, :, 0], y[:, :, 0]
    h0 = torch.randn(B, D)
    o, h = getattr(rk.ops, name)(x3, y3, initial_state=h0, output_final_state=True)
    o_ref, h_ref = call_loop(name, [x[:, :, :1], y[:, :, :1]], h0[:, None])
    assert o.shape == (B, 11, D) and h.shape == (B, D)
    assert rel(o, o_ref[:, :, 0]) < 1e-5 and rel(h, h_ref[:, 0]) < 1e-5


def test_scale_is_honoured_and_defaults_to_k_rsqrt():
    x = inputs("gla", 10)
    o_default, _ = rk.ops.gla(*x)
    o_half, _ = rk.ops.gla(*x, scale=0.5)
    assert rel(o_half, o_default * 0.5 / K ** -0.5) < 1e-5


def test_compile_reference_and_decl_call_agree():
    x = inputs("gated_delta_rule", 16)
    decl = rk.ops.gated_delta_rule.decl
    a = rk.compile(decl, backend="reference")(*x, output_final_state=True)
    b = decl(*x, output_final_state=True)
    c = rk.compile(rk.ops.gated_delta_rule)(q=x[0], k=x[1], v=x[2], g=x[3], beta=x[4],
                                           output_final_state=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])   # both the interpreter
    assert rel(c[0], a[0]) < 1e-5 and rel(c[1], a[1]) < 1e-5      # auto: the torch backend
