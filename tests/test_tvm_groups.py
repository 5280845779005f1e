"""The CPU kernel's groups of decayed tokens (``backends.tvm.groups``): four tokens' readouts
from the state they enter plus their own writes, and one update of the state per group,
against the reference interpreter; custom declarations with a readout gate and skip, and a
decay that is not provably positive."""
import pytest
import torch

import recurkit as rk
from cases import matrix_inputs
from recurkit.backends.tvm import sequential as seq


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


@rk.recurrence
def gated_readout(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"], v: rk.Token["V"],
                  gk: rk.Token["K"], z: rk.Token["V"]):
    S = rk.exp(gk) * S + rk.outer(k, v)
    return S, rk.silu(z) * (q @ S) + v        # o = post * (q^T S') + c, post and c over V


@rk.recurrence
def raw_decay(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"], v: rk.Token["V"],
              d: rk.Token["K"]):
    S = d * S + rk.outer(k, v)                # d of any sign: not provably positive
    return S, q @ S


def grouped(decl, K=8, V=16) -> bool:
    return "GACC" in seq.sequential_source(decl.program, {"K": K, "V": V}, 2)


def test_groups_where_a_decay_makes_them_shorter():
    for name in ("retention", "simple_gla", "gla"):
        assert grouped(rk.ops.ALL[name].decl), name
    for name in ("linear_attn", "delta_rule", "gated_delta_rule", "kda", "kla", "gdn2"):
        assert not grouped(rk.ops.ALL[name].decl), name   # no decay, or an erase
    assert grouped(gated_readout) and grouped(raw_decay)
    p = rk.ops.gla.decl.program
    assert "GACC" not in seq.sequential_source(p, {"K": 8, "V": 16}, 2, knobs={"tokens": 1})


@pytest.mark.parametrize("name", ["retention", "simple_gla", "gla"])
@pytest.mark.parametrize("gate", [(-100.0, -80.0), (-1e-4, 0.0), (-0.5, -0.01)],
                         ids=["decay~0", "decay~1", "mid"])
def test_builtins_in_groups_match_reference(name, gate):
    decl = rk.ops.ALL[name].decl
    for T in (1, 4, 7, 63, 100):
        x = matrix_inputs(name, 2, T, 2, 8, 32, gate=gate)
        kw = dict(initial_state=torch.randn(2, 2, 8, 32), output_final_state=True)
        o_ref, S_ref = rk.compile(decl, backend="reference")(*x, **kw)
        o, S = rk.compile(decl, backend="tvm")(*x, **kw)
        assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5, T


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_groups_read_half_inputs_and_write_their_dtype(dtype, tol):
    decl = rk.ops.gla.decl
    x = [t.to(dtype) for t in matrix_inputs("gla", 1, 37, 2, 16, 32)]
    o_ref, S_ref = rk.compile(decl, backend="reference")(*x, output_final_state=True)
    o, S = rk.compile(decl, backend="tvm")(*x, output_final_state=True)
    assert o.dtype == dtype and S.dtype == torch.float32
    assert rel(o, o_ref) < tol and rel(S, S_ref) < tol


def _custom_inputs(decl, B, T, H, K, V, gen):
    shapes = {"q": (K,), "k": (K,), "v": (V,), "gk": (K,), "z": (V,), "d": (K,)}
    out = []
    for s in decl.program.call_inputs:
        x = torch.randn(B, T, H, *shapes[s.name], generator=gen)
        if s.name == "gk":
            x = -torch.rand(B, T, H, K, generator=gen)
        out.append(x)
    return out


@pytest.mark.parametrize("decl", [gated_readout, raw_decay], ids=["post_and_skip", "raw_decay"])
def test_custom_declarations_in_groups(decl):
    gen = torch.Generator().manual_seed(0)
    lens = [6, 0, 1, 9, 4]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    x = [t.requires_grad_() for t in _custom_inputs(decl, 1, sum(lens), 2, 8, 16, gen)]
    kw = dict(initial_state=torch.randn(len(lens), 2, 8, 16, generator=gen),
              output_final_state=True, cu_seqlens=cu)
    res = {}
    for backend in ("reference", "tvm"):
        o, S = rk.compile(decl, backend=backend)(*x, **kw)
        res[backend] = (o, S, torch.autograd.grad((o * o).sum() + S.sum(), x))
    (o_r, S_r, g_r), (o, S, g) = res["reference"], res["tvm"]
    assert rel(o, o_r) < 1e-5 and rel(S, S_r) < 1e-5
    for a, b in zip(g, g_r):
        assert rel(a, b) < 1e-4


@rk.recurrence
def gated_h(h: rk.State["D"], x: rk.Token["D"], g: rk.Token["D"], z: rk.Token["D"]):
    h = rk.exp(g) * h + x
    return h, rk.silu(z) * h                  # a function of h' and the token's values


@rk.recurrence
def squared_h(h: rk.State["D"], x: rk.Token["D"], g: rk.Token["D"]):
    h = rk.sigmoid(g) * h + x
    return h, h * h


@rk.recurrence
def state_out(S: rk.State["K", "V"], k: rk.Token["K"], v: rk.Token["V"], gk: rk.Token["K"]):
    S = rk.exp(gk) * S + rk.outer(k, v)
    return S, 2.0 * S                         # the whole state, no reads accumulated


@pytest.mark.parametrize("decl,sizes", [(gated_h, {"D": 64}), (squared_h, {"D": 64}),
                                        (state_out, {"K": 8, "V": 32})],
                         ids=["silu_gate", "square", "matrix"])
def test_outputs_pointwise_in_the_new_state_take_groups(decl, sizes):
    """Outputs computed entry by entry from S' are written in the update pass, so these
    steps take groups of tokens; a matrix output without fused reads (which once left an
    empty loop in the blocked pass) too."""
    src = seq.sequential_source(decl.program, sizes, 2)
    assert "for tg in T.serial(" in src
    gen = torch.Generator().manual_seed(1)
    for T in (1, 5, 63):
        xs = [torch.randn(2, T, 2, *(sizes[d] for d in s.dims), generator=gen)
              for s in decl.program.call_inputs]
        xs = [-x.abs() if s.name in ("g", "gk") else x
              for x, s in zip(xs, decl.program.call_inputs)]
        kw = dict(initial_state=torch.randn(2, 2, *(sizes[d] for d in decl.program.state.dims),
                                            generator=gen), output_final_state=True)
        o_ref, S_ref = rk.compile(decl, backend="reference")(*xs, **kw)
        o, S = rk.compile(decl, backend="tvm")(*xs, **kw)
        assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5, T
