"""Steps of several updates run as sub-steps of the chunk forms (``lowering.substeps``):
several erases per token (DeltaProduct), rank-R writes (Mamba-3's MIMO), both, with every
gate side; forward and gradients on every backend against the reference interpreter."""
import pytest
import torch
import torch.nn.functional as F

import recurkit as rk
from recurkit.lowering.substeps import cuts


@rk.recurrence
def delta_product(S: rk.State["K", "V"], q: rk.Token["K"], k1: rk.Token["K"],
                  v1: rk.Token["V"], b1: rk.Token[()], k2: rk.Token["K"], v2: rk.Token["V"],
                  b2: rk.Token[()], g: rk.Token[()]):
    S = rk.exp(g) * S
    S = S + b1 * rk.outer(k1, v1 - k1 @ S)   # two Householder-like updates per token
    S = S + b2 * rk.outer(k2, v2 - k2 @ S)
    return S, q @ S


@rk.recurrence
def delta_product3(S: rk.State["K", "V"], q: rk.Token["K"], k1: rk.Token["K"],
                   v1: rk.Token["V"], b1: rk.Token[()], k2: rk.Token["K"],
                   v2: rk.Token["V"], b2: rk.Token[()], k3: rk.Token["K"],
                   v3: rk.Token["V"], gk: rk.Token["K"], z: rk.Token["V"]):
    S = rk.exp(gk) * S                        # a per-key gate, then three updates
    S = S + rk.sigmoid(b1) * rk.outer(k1, v1 - k1 @ S)
    S = S + rk.sigmoid(b2) * rk.outer(k2, v2 - k2 @ S)
    S = S - 0.5 * rk.outer(k3, k3 @ S) + rk.outer(k1, v3)   # an erase not along the write
    return S, rk.silu(z) * (q @ S) + v1


@rk.recurrence
def mimo(S: rk.State["K", "V"], q: rk.Token["K"], kt: rk.Token["K", "R"],
         vt: rk.Token["R", "V"], g: rk.Token[()]):
    S = rk.exp(g) * S + kt @ vt               # a rank-R write
    return S, q @ S


@rk.recurrence
def mimo_delta(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"], v: rk.Token["V"],
               b1: rk.Token[()], kt: rk.Token["K", "R"], vt: rk.Token["R", "V"],
               gk: rk.Token["K"], gv: rk.Token["V"]):
    S = rk.exp(gk) * S
    S = S + b1 * rk.outer(k, v - k @ S)       # an erase, then a rank-R write of a sum
    S = S + 0.5 * (kt @ (rk.exp(gv) * vt))
    return S, q @ S


DECLS = {"delta_product": delta_product, "delta_product3": delta_product3, "mimo": mimo,
         "mimo_delta": mimo_delta}
SIZES = {"K": 6, "V": 5, "R": 3}


def inputs(decl, B, T, H=2, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for s in decl.program.call_inputs:
        x = torch.randn(B, T, H, *(SIZES[d] for d in s.dims), generator=gen)
        if s.name.startswith("g"):
            x = -0.02 - 0.5 * torch.rand(x.shape, generator=gen)
        elif s.name.startswith("k") and s.dims == ("K",):
            x = F.normalize(x, dim=-1)
        elif s.name.startswith("b"):
            x = torch.rand(x.shape, generator=gen)
        elif s.name in ("kt", "vt"):
            x = 0.4 * x
        out[s.name] = x.to(dtype)
    return out


def call(op, xs, S0, cu):
    return op(**xs, initial_state=S0, output_final_state=True, cu_seqlens=cu)


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


def grads(op, xs, S0, cu):
    leaves = {n: x.clone().requires_grad_() for n, x in xs.items()}
    s0 = S0.clone().requires_grad_()
    o, S = call(op, leaves, s0, cu)
    gen = torch.Generator().manual_seed(5)
    ((o * torch.randn(o.shape, generator=gen)).sum()
     + (S * torch.randn(S.shape, generator=gen)).sum()).backward()
    return {**{n: t.grad for n, t in leaves.items()}, "initial_state": s0.grad}


def test_the_analysis_names_the_sub_steps():
    cases = {"delta_product": ("chunk_wy", "2 sub-steps", "3 rank-1 terms"),
             "delta_product3": ("chunk_wy", "3 sub-steps", "rank-1 terms"),
             "mimo": ("chunk_gated", "R sub-steps", "rank-R write"),
             "mimo_delta": ("chunk_wy", "1 + R sub-steps", "rank-R write")}
    for name, (form, count, why) in cases.items():
        rec = rk.analyze(DECLS[name])
        assert rec.forms[0] == form and rec.forms[-1] == "sequential", name
        note = " ".join(rec.reasons)
        assert count in note and why in note, (name, note)
        tp = rk.lower(DECLS[name])
        assert tp.form == form and tp.meta["expansion"].program.content_hash() == \
            rec.expansion.program.content_hash()
        assert "sub-step" in str(tp)


def test_cuts_follow_the_updates():
    p = delta_product.program
    state = next(n for n in p.nodes() if n.role == "state")
    chain = cuts(p, state)
    assert chain[0] is state and chain[-1] is p.new_state and len(chain) == 4


def test_a_step_that_does_not_split_stays_sequential_with_its_reason():
    @rk.recurrence
    def tangled(S: rk.State["K", "V"], q: rk.Token["K"], k1: rk.Token["K"],
                k2: rk.Token["K"], v: rk.Token["V"]):
        S = S - rk.outer(k1, k1 @ S) - rk.outer(k2, k2 @ S) + rk.outer(k1, v)
        return S, q @ S   # two erases reading the same state: no order of sub-steps
    rec = rk.analyze(tangled)
    assert rec.forms == ("sequential",) and "2 rank-1 terms" in rec.reasons[-1]
    with pytest.raises(ValueError, match="2 rank-1 terms"):
        rk.lower(tangled, form="chunk_wy")


def lengths(short: int) -> list:
    """(backend, T, varlen) cases: T = 1, 63, 100 (varlen); in Triton's interpreter, whose
    chunk kernels run slowly, T = 1 and a ``short`` varlen call that crosses chunks, the
    long ones under -m slow."""
    return [(b, T, v) for b in ("torch", "tvm", "triton")
            for T, v in ([(1, False), (63, False), (100, True)] if b != "triton"
                         else [(1, False), (short, True)])] + [
        pytest.param("triton", T, v, marks=pytest.mark.slow)
        for T, v in ((63, False), (100, True))]


def forward_matches(decl, backend, form, T, varlen, draw, sizes):
    """The op's output and final state against the reference (initial state given; varlen
    with an empty and a length-1 segment): (inputs, initial state, cu_seqlens)."""
    cu = torch.tensor([0, 0, 1, T // 2, T]) if varlen else None
    xs = draw(decl, 1 if varlen else 2, T)
    S0 = 0.5 * torch.randn(4 if varlen else 2, 2, sizes["K"], sizes["V"])
    want = call(rk.compile(decl, backend="reference"), xs, S0, cu)
    got = call(rk.compile(decl, backend=backend, form=form, chunk=16), xs, S0, cu)
    assert rel(got[0], want[0]) < 1e-5 and rel(got[1], want[1]) < 1e-5
    return xs, S0, cu


# the interpreter's varlen call of the widest declarations takes 35-60 s, and all of
# delta_product3's (delta_product covers the path): under -m slow
HEAVY_IN_THE_INTERPRETER = ("delta_product3", "mimo_delta")


def cases(short: int) -> list:
    out = []
    for name in sorted(DECLS):
        for p in lengths(short):
            values, marks = (p.values, p.marks) if hasattr(p, "values") else (p, ())
            if values[0] == "triton" and (values[2] or name == "delta_product3") \
                    and name in HEAVY_IN_THE_INTERPRETER:
                marks = (pytest.mark.slow,)
            out.append(pytest.param(name, *values, marks=marks))
    return out


@pytest.mark.parametrize("name,backend,T,varlen", cases(9))   # 9 tokens: 27-36 sub-steps
def test_sub_steps_match_the_reference(name, backend, T, varlen):
    decl = DECLS[name]
    form = rk.analyze(decl).forms[0]
    xs, S0, cu = forward_matches(decl, backend, form, T, varlen, inputs, SIZES)
    if T <= 63 or backend == "torch":
        gradients_match(decl, backend, form, xs, S0, cu,
                        ("auto", "chunk") if backend != "triton" else ("auto",))


def gradients_match(decl, backend, form, xs, S0, cu, modes=("auto", "chunk")):
    """Every input's and the initial state's gradient, for each backward mode, against
    autograd through the reference (relative to the largest)."""
    g_want = grads(rk.compile(decl, backend="reference"), xs, S0, cu)
    scale = max(w.abs().max().item() for w in g_want.values())
    for bw in modes:
        g = grads(rk.compile(decl, backend=backend, form=form, chunk=16, backward=bw),
                  xs, S0, cu)
        for n, w in g_want.items():
            assert (g[n] - w).abs().max().item() / scale < 1e-4, (bw, n)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sub_steps_in_half_precision(dtype):
    for decl in (delta_product, mimo_delta):
        xs = inputs(decl, 2, 40, dtype=dtype)
        want = call(rk.compile(decl, backend="reference"),
                    {k: v.float() for k, v in xs.items()}, None, None)
        o, S = call(rk.compile(decl, backend="torch"), xs, None, None)
        assert o.dtype == dtype and rel(o, want[0]) < 2e-2 and rel(S, want[1]) < 1e-5


def test_extreme_gates_and_the_tvm_default():
    for lo in (-30.0, -1e-6):   # decays near 0 and near 1
        xs = inputs(mimo_delta, 2, 50)
        for n in ("gk", "gv"):
            xs[n] = torch.full_like(xs[n], lo)
        want = call(rk.compile(mimo_delta, backend="reference"), xs, None, None)
        for op in (rk.compile(mimo_delta, backend="torch"), rk.compile(mimo_delta)):
            got = call(op, xs, None, None)
            assert rel(got[0], want[0]) < 1e-5 and rel(got[1], want[1]) < 1e-5


def test_codegen_shows_the_expanded_kernels():
    src = rk.codegen(delta_product, "triton", sizes={"K": 16, "V": 16})
    assert "@triton.jit" in src
    assert "sub-step" in repr(rk.lower(mimo)) or "sub-step" in str(rk.lower(mimo))


@rk.recurrence
def subtracted_write(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"],
                     v: rk.Token["V"], g: rk.Token[()]):
    S = rk.exp(g) * S - rk.outer(k, v)   # a state minus a state-free value
    return S, q @ S


@rk.recurrence
def erase_after_write(S: rk.State["K", "V"], w: rk.Token["V"], p: rk.Token["V"],
                      b1: rk.Token[()], kt: rk.Token["K", "R"], vt: rk.Token["R", "V"]):
    S = S + kt @ vt
    S = S - rk.sigmoid(b1) * rk.outer(S @ w, w)   # minus a value with a state-free part
    return S, S @ p


@pytest.mark.parametrize("decl", [subtracted_write, erase_after_write], ids=lambda d: d.name)
def test_a_subtraction_keeps_the_sign_of_its_state_free_part(decl):
    """Found by the fuzzer: ``a - c`` negated c's state-free part twice (the write of
    ``exp(g) * S - k v^T`` came out as ``+ k v^T``)."""
    xs = inputs(decl, 2, 37)
    xs = {k: (F.normalize(v, dim=-1) if k == "w" else v) for k, v in xs.items()}
    want = call(rk.compile(decl, backend="reference"), xs, None, None)
    for form in rk.analyze(decl).forms:
        got = call(rk.compile(decl, backend="torch", form=form, chunk=16), xs, None, None)
        assert rel(got[0], want[0]) < 1e-5 and rel(got[1], want[1]) < 1e-5, form


def test_sub_steps_whose_roles_are_not_one_update_stay_sequential():
    """Found by the fuzzer: a per-value gate in one sub-step and an erase in another are,
    as one update of the expanded declaration, what the WY form does not take."""
    @rk.recurrence
    def gate_then_erase(S: rk.State["K", "V"], p: rk.Token["V"], w: rk.Token["V"],
                        b1: rk.Token[()], gk: rk.Token["K"], kt: rk.Token["K", "R"],
                        vt: rk.Token["R", "V"]):
        S = rk.exp(gk) * S
        S = S + kt @ vt
        S = S - rk.sigmoid(b1) * rk.outer(S @ w, w)
        return S, S @ p
    rec = rk.analyze(gate_then_erase)
    assert rec.forms == ("sequential",)
    assert "as sub-steps: the sub-steps as one update: value-side decay" in rec.reasons[-1]
    xs = inputs(gate_then_erase, 2, 11)
    xs["w"] = F.normalize(xs["w"], dim=-1)
    want = call(rk.compile(gate_then_erase, backend="reference"), xs, None, None)
    got = call(rk.compile(gate_then_erase, backend="torch"), xs, None, None)
    assert rel(got[0], want[0]) < 1e-5 and rel(got[1], want[1]) < 1e-5


@rk.recurrence
def unequal_scales(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"],
                   v: rk.Token["V"], b1: rk.Token[()], b2: rk.Token[()]):
    S = S + b2 * rk.outer(k, v) - b1 * rk.outer(k, k @ S)   # erase and write scaled apart
    return S, q @ S


def test_a_write_scale_of_zero_is_not_divided_by():
    """Found in review: the erase taken as c times the write key with c = b1 / b2 made NaN
    where b2 = 0; the general WY form serves such steps."""
    xs = inputs(unequal_scales, 2, 30)
    xs["b2"][:, 5] = 0.0
    assert rk.analyze(unequal_scales).erase_scale is None
    want = call(rk.compile(unequal_scales, backend="reference"), xs, None, None)
    got = call(rk.compile(unequal_scales, backend="torch", chunk=16), xs, None, None)
    assert torch.isfinite(got[0]).all() and rel(got[0], want[0]) < 1e-5
