"""Rotations in the transition (``rk.rotate``, ``rk.pairs``): complex-diagonal states run in
the rotating frame (``lowering.rotation``) on every form, forward and gradients on every
backend against the reference interpreter; rotations the frame does not take run
sequentially, with the reason."""
import math

import pytest
import torch
import torch.nn.functional as F

import recurkit as rk
from recurkit.ir.interpret import rotate_pairs
from test_substeps import call, grads, lengths, rel


@rk.recurrence
def rot_gla(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"], v: rk.Token["V"],
            g: rk.Token[()], th: rk.Token["P"]):
    S = rk.exp(g) * rk.rotate(S, th, "K")          # Mamba-3's complex SSD: decay and turn
    S = S + rk.outer(k, v)
    return S, q @ S


@rk.recurrence
def rot_gdn(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"], v: rk.Token["V"],
            g: rk.Token[()], b: rk.Token[()], th: rk.Token["P"]):
    S = rk.exp(g) * rk.rotate(S, th, "K")
    S = S + rk.sigmoid(b) * rk.outer(k, v - k @ S)  # a delta-rule erase in the turned frame
    return S, q @ S


@rk.recurrence
def gateloop(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"], v: rk.Token["V"],
             g: rk.Token["P"], th: rk.Token["P"]):
    # a complex gate per channel: magnitude per pair, the rotate-half layout
    a = rk.exp(rk.pairs(g, "P", "K", layout="halves"))
    S = a * rk.rotate(S, th, "K", layout="halves") + rk.outer(k, v)
    return S, q @ S


@rk.recurrence
def rot_after(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"], v: rk.Token["V"],
              g: rk.Token[()], b: rk.Token[()], dt: rk.Token[()], w: rk.Param["P"]):
    # the turn after the update, by an angle made in the step (dt times a frequency)
    S = rk.exp(g) * S + rk.sigmoid(b) * rk.outer(rk.l2norm(k), v - rk.l2norm(k) @ S)
    S = rk.rotate(S, rk.softplus(dt) * w, "K")
    return S, 0.5 * (q @ S) + v


@rk.recurrence
def rot_product(S: rk.State["K", "V"], q: rk.Token["K"], k1: rk.Token["K"],
                v1: rk.Token["V"], k2: rk.Token["K"], v2: rk.Token["V"], g: rk.Token[()],
                th: rk.Token[()]):
    S = rk.exp(g) * rk.rotate(S, th, "K")           # one angle for every pair
    S = S + 0.5 * rk.outer(k1, v1 - k1 @ S)        # two erases: sub-steps in the frame
    S = S + 0.5 * rk.outer(k2, v2 - k2 @ S)
    return S, q @ S


@rk.recurrence
def rot_value(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"], v: rk.Token["V"],
              g: rk.Token[()], th: rk.Token["Q"]):
    S = rk.exp(g) * rk.rotate(S, th, "V") + rk.outer(k, v)   # the value side turns:
    return S, q @ S                                           # the output is turned back


@rk.recurrence
def complex_lru(h: rk.State["K"], x: rk.Token["K"], a: rk.Token[()], th: rk.Token["P"],
                z: rk.Token["P"]):
    h = rk.sigmoid(a) * rk.rotate(h, th) + x       # a complex diagonal vector state, read
    return h, rk.pairs(rk.silu(z), "P", "K") * h   # with a gate per pair (turned back)


@rk.recurrence
def rot_per_key(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"],
                v: rk.Token["V"], gk: rk.Token["K"], th: rk.Token["P"]):
    S = rk.exp(gk) * rk.rotate(S, th, "K")          # a per-key gate: no frame
    S = S + rk.outer(k, v)
    return S, q @ S


@rk.recurrence
def turn_last(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"], v: rk.Token["V"],
              gk: rk.Token["K"], th: rk.Token["P"]):
    # no frame (a per-key gate), and the turn is the new state: a kernel must not update
    # the state in place while the turn reads each entry's partner (the fuzzer's find)
    S = rk.rotate(rk.exp(gk) * S + rk.outer(k, v), th, "K")
    return S, q @ S


DECLS = {"rot_gla": rot_gla, "rot_gdn": rot_gdn, "gateloop": gateloop,
         "rot_after": rot_after, "rot_product": rot_product, "rot_value": rot_value,
         "complex_lru": complex_lru, "rot_per_key": rot_per_key, "turn_last": turn_last}
FORMS = {"rot_gla": "chunk_gated", "rot_gdn": "chunk_wy", "gateloop": "chunk_gated",
         "rot_after": "chunk_wy", "rot_product": "chunk_wy", "rot_value": "chunk_gated",
         "complex_lru": "scan", "rot_per_key": "sequential", "turn_last": "sequential"}
SIZES = {"K": 6, "V": 4, "P": 3, "Q": 2}


def draw(decl, B, T, H=2, seed=0, dtype=torch.float32, angle=1.0):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for s in decl.program.call_inputs:
        lead = (B, T, H) if s.role == "token" else (H,)
        x = torch.randn(*lead, *(SIZES[d] for d in s.dims), generator=gen)
        if s.name.startswith("g"):
            x = -0.02 - 0.5 * torch.rand(x.shape, generator=gen)
        elif s.name.startswith("k"):
            x = F.normalize(x, dim=-1)
        elif s.name in ("th", "w"):
            x = angle * x
        out[s.name] = x.to(dtype)
    return out


def state0(decl, N, H=2):
    return 0.5 * torch.randn(N, H, *(SIZES[d] for d in decl.program.state.dims))


def test_the_forms_and_their_reasons():
    for name, decl in DECLS.items():
        rec = rk.analyze(decl)
        assert rec.forms[0] == FORMS[name] and rec.forms[-1] == "sequential", name
        note = " ".join(rec.reasons)
        if name in ("rot_per_key", "turn_last"):
            assert rec.frame is None and "per-K gate" in note and "test_rotation.py:" in note
            continue
        assert rec.frame is not None and "rotating along" in note, name
        tp = rk.lower(decl)
        assert "rotating along" in str(tp)
    assert "sub-steps" in " ".join(rk.analyze(rot_product).reasons)
    assert rk.analyze(rot_value).frame.out_level is not None


@pytest.mark.parametrize("name", sorted(DECLS))
@pytest.mark.parametrize("backend,T,varlen", lengths(9))
def test_rotations_match_the_reference(name, backend, T, varlen):
    decl = DECLS[name]
    cu = torch.tensor([0, 0, 1, T // 2, T]) if varlen else None
    xs = draw(decl, 1 if varlen else 2, T)
    S0 = state0(decl, 4 if varlen else 2)
    want = call(rk.compile(decl, backend="reference"), xs, S0, cu)
    for form in rk.analyze(decl).forms:
        if backend == "triton" and form == "sequential" and T > 9:
            continue
        op = rk.compile(decl, backend=backend, form=form,
                        chunk=16 if form.startswith("chunk") else None)
        got = call(op, xs, S0, cu)
        assert rel(got[0], want[0]) < 1e-5 and rel(got[1], want[1]) < 1e-5, form
    if T <= 63 or backend == "torch":
        form = rk.analyze(decl).forms[0]
        g_want = grads(rk.compile(decl, backend="reference"), xs, S0, cu)
        scale = max(w.abs().max().item() for w in g_want.values())
        modes = ("auto", "chunk") if backend != "triton" else ("auto",)
        for bw in modes:
            g = grads(rk.compile(decl, backend=backend, form=form, backward=bw,
                                 chunk=16 if form.startswith("chunk") else None), xs, S0, cu)
            for n, w in g_want.items():
                assert (g[n] - w).abs().max().item() / scale < 1e-4, (bw, n)


def test_long_sequences_and_large_angles_keep_exact():
    # the cumulative angle reaches ~600 rad: the frame's angles are summed in float64
    for decl in (rot_gla, rot_gdn, complex_lru):
        xs = draw(decl, 2, 300, angle=3.0)
        S0 = state0(decl, 2)
        want = call(rk.compile(decl, backend="reference"), xs, S0, None)
        for backend in ("torch", "tvm"):
            got = call(rk.compile(decl, backend=backend), xs, S0, None)
            assert rel(got[0], want[0]) < 1e-5 and rel(got[1], want[1]) < 1e-5, backend


def test_extreme_gates():
    for lo in (-30.0, -1e-6):   # decays near 0 and near 1
        for decl in (rot_gla, gateloop):
            xs = draw(decl, 2, 50)
            xs["g"] = torch.full_like(xs["g"], lo)
            want = call(rk.compile(decl, backend="reference"), xs, None, None)
            got = call(rk.compile(decl, backend="torch"), xs, None, None)
            assert rel(got[0], want[0]) < 1e-5 and rel(got[1], want[1]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    for decl in (rot_gla, rot_gdn):
        xs = draw(decl, 2, 40, dtype=dtype)
        want = call(rk.compile(decl, backend="reference"),
                    {k: v.float() for k, v in xs.items()}, None, None)
        for backend in ("torch", "tvm"):
            o, S = call(rk.compile(decl, backend=backend), xs, None, None)
            assert o.dtype == dtype and rel(o, want[0]) < 2e-2 and rel(S, want[1]) < 2e-2


def test_grouped_heads_with_a_rotation():
    xs = draw(rot_gdn, 2, 20, H=4)
    for n in ("q", "k"):
        xs[n] = xs[n][:, :, :2].contiguous()   # two q/k heads serve four value heads
    full = {**xs, "q": xs["q"].repeat_interleave(2, 2), "k": xs["k"].repeat_interleave(2, 2)}
    want = call(rk.compile(rot_gdn, backend="reference"), full, None, None)
    got = call(rk.compile(rot_gdn, backend="torch"), xs, None, None)
    assert rel(got[0], want[0]) < 1e-5 and rel(got[1], want[1]) < 1e-5


def test_the_interpreter_is_complex_multiplication():
    x = torch.randn(3, 8)
    th = torch.randn(3, 4)
    got = rotate_pairs(x, ("K",), th, ("P",), "K", "P", "interleaved", 1)
    want = torch.view_as_real(torch.view_as_complex(x.reshape(3, 4, 2)) * torch.polar(
        torch.ones_like(th), th)).reshape(3, 8)
    assert torch.allclose(got, want, atol=1e-6)
    halves = rotate_pairs(x, ("K",), th, ("P",), "K", "P", "halves", 1)
    c = torch.complex(x[:, :4], x[:, 4:]) * torch.polar(torch.ones_like(th), th)
    assert torch.allclose(halves, torch.cat([c.real, c.imag], 1), atol=1e-6)
    quarter = rotate_pairs(x, ("K",), torch.full((3,), math.pi / 2), (), "K", None,
                           "interleaved", 1)
    assert torch.allclose(quarter[:, 0::2], -x[:, 1::2], atol=1e-6)


def test_bad_declarations_name_the_line():
    with pytest.raises(rk.DeclarationError, match="angle has the rotated dim"):
        @rk.recurrence
        def bad(S: rk.State["K", "V"], q: rk.Token["K"], th: rk.Token["K"]):
            S = rk.rotate(S, th, "K")
            return S, q @ S
    with pytest.raises(rk.DeclarationError, match="needs dim="):
        @rk.recurrence
        def bad2(S: rk.State["K", "V"], q: rk.Token["K"], th: rk.Token[()]):
            S = rk.rotate(S, th)
            return S, q @ S
    with pytest.raises(rk.DeclarationError, match="at most one"):
        @rk.recurrence
        def bad3(S: rk.State["K", "V"], q: rk.Token["K"], th: rk.Token["P", "R"]):
            S = rk.rotate(S, th, "K")
            return S, q @ S
    with pytest.raises(rk.DeclarationError, match="layout"):
        @rk.recurrence
        def bad4(S: rk.State["K", "V"], q: rk.Token["K"], th: rk.Token["P"]):
            S = rk.rotate(S, th, "K", layout="diagonal")
            return S, q @ S


def test_bad_calls_name_the_argument():
    xs = draw(rot_gla, 1, 5)
    op = rk.compile(rot_gla, backend="torch")
    with pytest.raises(rk.CallError, match="argument 'th'.*expected P = 3"):
        op(**{**xs, "th": torch.randn(1, 5, 2, 2)})
    odd = {**xs, "q": torch.randn(1, 5, 2, 5), "k": torch.randn(1, 5, 2, 5)}
    with pytest.raises(rk.CallError, match="must be even"):
        op(**odd)


@rk.recurrence
def rope_gla(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"],
             v: rk.Token["V"], g: rk.Token[()], th: rk.Token["P"]):
    # RoPE on q and k inside the step: state-free, hoisted; no frame turn needed
    S = rk.exp(g) * S + rk.outer(rk.rotate(k, th), v)
    return S, rk.rotate(q, th) @ S


def test_rotations_of_token_values_run_ahead_of_the_kernels():
    rec = rk.analyze(rope_gla)
    assert rec.forms[0] == "chunk_gated" and not rec.frame.rotates_state
    xs = draw(rope_gla, 2, 20)
    want = call(rk.compile(rope_gla, backend="reference"), xs, None, None)
    for backend in ("torch", "tvm", "triton"):
        got = call(rk.compile(rope_gla, backend=backend), xs, None, None)
        assert rel(got[0], want[0]) < 1e-5 and rel(got[1], want[1]) < 1e-5, backend


def test_codegen_and_the_custom_op():
    for backend in ("tvm", "triton"):
        src = rk.codegen(rot_gdn, backend, sizes={"K": 16, "V": 16, "P": 8})
        assert "rotate" not in src   # the kernels are the rotation-free declaration's
        src = rk.codegen(rot_per_key, backend, sizes={"K": 16, "V": 16, "P": 8})
        assert ("tl.gather" in src) if backend == "triton" else ("T.cos" in src)
    op = rk.compile(rot_gdn, backend="torch")
    xs = draw(rot_gdn, 2, 12)
    S0 = state0(rot_gdn, 2).requires_grad_()
    args = tuple(xs[s.name].requires_grad_() for s in rot_gdn.program.call_inputs)
    torch.library.opcheck(op.torch_op.op.default, (*args, S0, None))


@pytest.mark.parametrize("arch", ["sm_90", "gfx942"])
def test_the_triton_kernels_compile_ahead_of_time(arch):
    """The sequential kernel that gathers each lane's partner (no frame) and the chunk
    kernels of a turned delta rule compile with no spills, within shared memory."""
    from recurkit.backends.triton import runtime
    sizes = {"K": 128, "V": 128, "P": 64}
    for decl, form in ((rot_per_key, "sequential"), (rot_gdn, "chunk_wy")):
        src = rk.codegen(decl, "triton", form=form, sizes=sizes, H=16)
        for r in runtime.aot_compile(src, arch):
            assert 0 <= r["shared"] <= runtime.SHARED_LIMIT[arch], r
            assert not r["spill_bytes"], (decl.program.name, r)


def test_one_angle_for_every_pair_in_the_sequential_kernels():
    @rk.recurrence
    def one_angle(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"],
                  v: rk.Token["V"], gk: rk.Token["K"], th: rk.Token[()]):
        S = rk.exp(gk) * rk.rotate(S, th, "K") + rk.outer(k, v)   # no frame: sequential
        return S, q @ S
    xs = draw(one_angle, 2, 7)
    want = call(rk.compile(one_angle, backend="reference"), xs, None, None)
    for backend in ("tvm", "triton"):
        got = call(rk.compile(one_angle, backend=backend), xs, None, None)
        assert rel(got[0], want[0]) < 1e-5 and rel(got[1], want[1]) < 1e-5, backend


def test_a_pair_constant_value_meeting_the_state_is_refused_not_crashed():
    @rk.recurrence
    def odd(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"], v: rk.Token["V"],
            g: rk.Token[()], th: rk.Token["P"], z: rk.Token["P", "V"]):
        S = rk.exp(g) * rk.rotate(S, th, "K") + rk.outer(k, v)
        return S, (q @ S) @ rk.pairs(z, "P", "K")   # [K] from a pair-constant value
    rec = rk.analyze(odd)
    assert rec.forms == ("sequential",) and "constant on pairs" in rec.reasons[0]
