"""Grouped value heads (FLA's GVA): q, k with H heads, v, gates and betas with G * H, each
q/k head serving G consecutive value heads; the built-ins against FLA's naive references and
the hand-written loops, every backend, forward and gradients, sub-steps, the rk.nn layers."""
import pytest
import torch
import torch.nn.functional as F

import recurkit as rk
from cases import CASES, call_op, matrix_inputs
from recurkit.backends.triton.chunk_module import chunk_source
from recurkit.backends.triton.runtime import check_config
from recurkit.ir import CallError

B, T, H, G, K, V = 2, 37, 2, 3, 8, 6
HV = G * H


def grouped(name, T=T, seed=0):
    """The case's inputs with q and k over H heads (their first of each group of G)."""
    xs = matrix_inputs(name, B, T, HV, K, V, seed=seed)
    for i in (0, 1):
        xs[i] = xs[i][:, :, ::G].contiguous()
    if name == "dplr_delta_rule":   # its erase vectors a, b are key-side too
        xs[3], xs[4] = xs[3][:, :, ::G].contiguous(), xs[4][:, :, ::G].contiguous()
    return xs


def repeated(name, xs):
    out = list(xs)
    for i in ((0, 1, 3, 4) if name == "dplr_delta_rule" else (0, 1)):
        out[i] = xs[i].repeat_interleave(G, 2)
    return out


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_builtin_takes_grouped_heads(name):
    xs = grouped(name)
    S0 = 0.5 * torch.randn(B, HV, K, V)
    want = call_op(name, repeated(name, xs), initial_state=S0, output_final_state=True,
                   backend="reference")
    for backend in ("reference", "torch", "tvm"):
        o, S = call_op(name, xs, initial_state=S0, output_final_state=True, backend=backend)
        assert o.shape == (B, T, HV, V) and S.shape == (B, HV, K, V)
        assert rel(o, want[0]) < 1e-5 and rel(S, want[1]) < 1e-5, backend


def test_fla_naive_references_with_grouped_heads():
    pytest.importorskip("fla", reason="flash-linear-attention (the bench extra) is not installed")
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
    from fla.ops.kda.naive import naive_recurrent_kda
    q, k, v, gk, beta = grouped("kda")
    S0 = 0.5 * torch.randn(B, HV, K, V)
    want = naive_recurrent_kda(q, k, v, gk, beta, initial_state=S0, output_final_state=True)
    for backend in ("torch", "tvm", "triton"):
        o, S = rk.ops.kda(q, k, v, gk, beta, initial_state=S0, output_final_state=True,
                          backend=backend)
        assert rel(o, want[0]) < 1e-5 and rel(S, want[1]) < 1e-5, backend
    q, k, v, g, beta = grouped("gated_delta_rule")
    want = naive_recurrent_gated_delta_rule(q.repeat_interleave(G, 2), k.repeat_interleave(
        G, 2), v, beta, g, scale=K ** -0.5, initial_state=S0, output_final_state=True)
    o, S = rk.ops.gated_delta_rule(q, k, v, g, beta, initial_state=S0,
                                   output_final_state=True, backend="triton")
    assert rel(o, want[0]) < 1e-5 and rel(S, want[1]) < 1e-5


def gradients(fn, xs, S0):
    leaves = [x.clone().requires_grad_() for x in xs]
    s0 = S0.clone().requires_grad_()
    o, S = fn(leaves, s0)
    gen = torch.Generator().manual_seed(3)
    ((o * torch.randn(o.shape, generator=gen)).sum()
     + (S * torch.randn(S.shape, generator=gen)).sum()).backward()
    return [t.grad for t in leaves] + [s0.grad]


@pytest.mark.parametrize("backend,backward", [("torch", "auto"), ("torch", "chunk"),
                                              ("tvm", "auto"), ("tvm", "chunk"),
                                              pytest.param("triton", "auto",
                                                           marks=pytest.mark.slow)])
def test_gradients_of_grouped_inputs_sum_over_their_group(backend, backward):
    name = "gated_delta_rule"
    xs = grouped(name, T=21 if backend == "triton" else T)
    S0 = 0.5 * torch.randn(B, HV, K, V)
    decl = rk.ops.gated_delta_rule.decl
    ref = rk.compile(decl, backend="reference")
    want = gradients(lambda a, s: ref(*a, initial_state=s, output_final_state=True),
                     xs, S0)
    op = rk.compile(decl, backend=backend, backward=backward)
    got = gradients(lambda a, s: op(*a, initial_state=s, output_final_state=True), xs, S0)
    scale = max(w.abs().max().item() for w in want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and (g - w).abs().max().item() / scale < 1e-4


def test_varlen_and_sub_steps_with_grouped_heads():
    @rk.recurrence
    def product(S: rk.State["K", "V"], q: rk.Token["K"], k1: rk.Token["K"],
                k2: rk.Token["K"], v: rk.Token["V"], b: rk.Token[()]):
        S = S + b * rk.outer(k1, v - k1 @ S)
        S = S + b * rk.outer(k2, v - k2 @ S)
        return S, q @ S
    gen = torch.Generator().manual_seed(1)
    q, k1, k2 = (F.normalize(torch.randn(1, 40, H, K, generator=gen), dim=-1)
                 for _ in range(3))
    v, b = torch.randn(1, 40, HV, V, generator=gen), torch.rand(1, 40, HV, generator=gen)
    cu = torch.tensor([0, 0, 1, 17, 40])
    ref = rk.compile(product, backend="reference")
    want = ref(q.repeat_interleave(G, 2), k1.repeat_interleave(G, 2),
               k2.repeat_interleave(G, 2), v, b, cu_seqlens=cu, output_final_state=True)
    for backend in ("torch", "tvm"):
        o, S = rk.compile(product, backend=backend, form="chunk_wy")(
            q, k1, k2, v, b, cu_seqlens=cu, output_final_state=True)
        assert rel(o, want[0]) < 1e-5 and rel(S, want[1]) < 1e-5


def test_heads_that_do_not_divide_are_refused():
    q, k, v, g, beta = grouped("gated_delta_rule")
    with pytest.raises(CallError, match="argument 'q'.*does not divide the 6 heads"):
        rk.ops.gated_delta_rule(q[:, :, :1].expand(-1, -1, 4, -1), k, v, g, beta)
    with pytest.raises(CallError, match="initial_state"):
        rk.ops.gated_delta_rule(q, k, v, g, beta, initial_state=torch.zeros(B, H, K, V))


@pytest.mark.parametrize("layer", ["GatedDeltaNet", "KDA", "GLA"])
def test_layers_with_grouped_value_heads(layer):
    torch.manual_seed(0)
    m = getattr(rk.nn, layer)(32, num_heads=2, head_dim=8, num_v_heads=4)
    assert m.v_proj.out_features == 32 and m.q_proj.out_features == 16
    x = torch.randn(2, 19, 32, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="num_v_heads=3 is not a multiple"):
        getattr(rk.nn, layer)(32, num_heads=2, head_dim=8, num_v_heads=3)


@pytest.mark.parametrize("decl", [rk.ops.gated_delta_rule.decl,
                                  pytest.param(rk.ops.gla.decl, marks=pytest.mark.slow)])
def test_the_triton_chunk_kernels_read_grouped_heads_without_a_copy(decl, monkeypatch):
    """Forward and chunk backward in Triton's interpreter: q and k are never repeated (the
    kernels read head h // G) and everything matches the reference."""
    name = "gated_delta_rule" if decl is rk.ops.gated_delta_rule.decl else "gla"
    xs = grouped(name, T=21)
    S0 = 0.5 * torch.randn(B, HV, K, V)
    ref = rk.compile(decl, backend="reference")
    want = gradients(lambda a, s: ref(*a, initial_state=s, output_final_state=True), xs, S0)
    op = rk.compile(decl, backend="triton", form=rk.analyze(decl).forms[0], chunk=16,
                    backward="chunk")
    seen = []
    real = torch.Tensor.repeat_interleave

    def spy(self, *a, **kw):
        seen.append(tuple(self.shape))
        return real(self, *a, **kw)
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", spy)
    got = gradients(lambda a, s: op(*a, initial_state=s, output_final_state=True), xs, S0)
    monkeypatch.undo()
    assert not [s for s in seen if s[2] == H], seen   # no H-head input was repeated
    scale = max(w.abs().max().item() for w in want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and (g - w).abs().max().item() / scale < 1e-4
    tp = rk.lower(decl, chunk=16)   # q and k (inputs 1 and 2) read at their group's head
    src, _ = chunk_source(tp, {"K": K, "V": V}, HV, check_config(None),
                          groups=((1, G), (2, G)))
    assert f"(h // {G})" in src
