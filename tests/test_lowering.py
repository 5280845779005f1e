"""Every form that applies to every built-in matches the reference interpreter."""
import functools

import pytest
import torch

import recurkit as rk
import loops
from cases import CASES, GATED, VECTOR_CASES, call_loop, matrix_inputs, vector_inputs

B, H, K, V, D = 2, 2, 6, 5, 7


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def decl_of(name):
    return getattr(rk.ops, name).decl


def inputs(name, T, Bn=B, **kw):
    if name in VECTOR_CASES:
        return vector_inputs(name, Bn, T, H, D, **kw)
    return matrix_inputs(name, Bn, T, H, K, V, **kw)


def state(name, N, seed=3):
    shape = (N, H, D) if name in VECTOR_CASES else (N, H, K, V)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@functools.lru_cache(maxsize=None)
def reference(name, T, init, gate=None, Bn=B):
    x = inputs(name, T, Bn, gate=gate)
    S0 = state(name, Bn) if init else None
    return x, S0, rk.compile(decl_of(name), backend="reference")(
        *x, initial_state=S0, output_final_state=True)


def cases(Ts, chunks):
    out = []
    for name in [*CASES, *VECTOR_CASES]:
        for form in rk.analyze(decl_of(name)).forms:
            for T in Ts:
                for chunk in (chunks if form.startswith("chunk") else [None]):
                    out.append(pytest.param(name, form, T, chunk,
                                            id=f"{name}-{form}-T{T}" + (f"-C{chunk}" if chunk
                                                                        else "")))
    return out


def check(name, form, T, chunk, init, backend="torch"):
    x, S0, (o_ref, S_ref) = reference(name, T, init)
    op = rk.compile(decl_of(name), backend=backend, form=form, chunk=chunk)
    assert op.form == form
    o, S = op(*x, initial_state=S0, output_final_state=True)
    assert o.shape == o_ref.shape and S.shape == S_ref.shape
    assert rel(o, o_ref) < 1e-5, rel(o, o_ref)
    assert rel(S, S_ref) < 1e-5, rel(S, S_ref)


BACKENDS = ["torch", "tvm"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("init", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("name,form,T,chunk", cases([1, 15, 64, 100], [16, 32, 64, 128]))
def test_forms_match_reference(name, form, T, chunk, init, backend):
    check(name, form, T, chunk, init, backend)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,form,T,chunk", cases([1000], [16, 32, 64, 128]))
def test_forms_match_reference_long(name, form, T, chunk, backend):
    check(name, form, T, chunk, True, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,form,T,chunk", cases([40], [16]))
def test_varlen_with_short_and_empty_segments(name, form, T, chunk, backend):
    lens = [1, 3, 0, 16, 17, 2, 1]   # shorter than a chunk, exactly one, one past, length 1
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    Tn = sum(lens)
    x = [t[:1] for t in inputs(name, Tn)]
    S0 = state(name, len(lens))
    kw = dict(initial_state=S0, output_final_state=True, cu_seqlens=cu)
    o_ref, S_ref = rk.compile(decl_of(name), backend="reference")(*x, **kw)
    o, S = rk.compile(decl_of(name), backend=backend, form=form, chunk=chunk)(*x, **kw)
    assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("name", ["gla", "gated_delta_rule", "kda", "dplr_delta_rule", "hgrn"])
def test_low_precision_inputs(name, dtype, tol, backend):
    x = inputs(name, 50, dtype=dtype)
    o_ref, S_ref = rk.compile(decl_of(name), backend="reference")(*x, output_final_state=True)
    o, S = rk.compile(decl_of(name), backend=backend, chunk=16)(*x, output_final_state=True)
    assert o.dtype == dtype and S.dtype == torch.float32
    assert rel(o, o_ref) < tol and rel(S, S_ref) < 1e-5


EXTREME = [(-69.0, -69.0), (-1e-6, -1e-6)]   # per-step decay 1e-30 and 1 - 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", EXTREME, ids=["decay1e-30", "decay1-1e-6"])
@pytest.mark.parametrize("name", ["simple_gla", "gla", "gated_delta_rule", "kda", "hgrn"])
def test_extreme_gates(name, gate, backend):
    check_extreme(name, gate, 1000, backend)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", EXTREME, ids=["decay1e-30", "decay1-1e-6"])
@pytest.mark.parametrize("name", sorted(GATED) + ["hgrn", "min_gru"])
def test_extreme_gates_T16384(name, gate, backend):
    check_extreme(name, gate, 16384, backend)


def check_extreme(name, gate, T, backend="torch"):
    """Against a float64 loop: at decay 1 - 1e-6 over 16384 steps even the fp32 reference
    drifts by ~1e-4 (exp(g) rounded to fp32 compounds); the log-space forms must not."""
    x = inputs(name, T, Bn=1, gate=gate)
    if name == "min_gru":   # its gate is sigmoid(z): saturate it the same way
        x[1] = torch.full_like(x[1], 69.0 if gate[0] < -1 else -13.8)
    loops.DTYPE = torch.float64
    try:
        o_ref, S_ref = call_loop(name, x)
    finally:
        loops.DTYPE = torch.float32
    forms = rk.analyze(decl_of(name)).forms
    if backend == "tvm":   # the sequential form rounds exp(g) to fp32 every step, as the
        # fp32 reference does (and fuses a*h+b into one FMA, which the reference does not):
        # its drift from float64 must stay within twice the reference's own; the log-space
        # forms must match float64
        o, S = rk.compile(decl_of(name), backend="tvm")(*x, output_final_state=True)
        o_fp32, S_fp32 = rk.compile(decl_of(name), backend="reference")(
            *x, output_final_state=True)
        assert rel(o, o_ref) <= max(2 * rel(o_fp32, o_ref), 1e-5), rel(o, o_ref)
        assert rel(S, S_ref) <= max(2 * rel(S_fp32, S_ref), 1e-5), rel(S, S_ref)
    for form in forms[:-1]:
        o, S = rk.compile(decl_of(name), backend=backend, form=form, chunk=64)(
            *x, output_final_state=True)
        assert torch.isfinite(o).all() and torch.isfinite(S).all()
        assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5, (form, rel(o, o_ref))


def test_lower_prints_the_form_and_stages():
    tp = rk.lower(rk.ops.kda, chunk=32)
    text = str(tp)
    assert text.startswith("tile program kda: form chunk_wy, chunk 32")
    for stage in ["stage prep (chunk", "stage state_pass (loop", "stage output (chunk"]:
        assert stage in text
    assert "invert_unit_lower" in text and "decay_ratio" in text


def test_inapplicable_form_and_chunk_are_refused():
    with pytest.raises(rk.LoweringError, match="form 'scan' does not apply to gla"):
        rk.lower(rk.ops.gla, form="scan")
    with pytest.raises(rk.LoweringError, match="chunk size 48"):
        rk.lower(rk.ops.gla, chunk=48)
    with pytest.raises(rk.LoweringError, match="form 'chunk_gated' does not apply to kda"):
        rk.compile(rk.ops.kda, backend="torch", form="chunk_gated")


def test_tile_verifier_catches_a_broken_program():
    from recurkit.lowering.tile import TileOp, TileVerifyError, verify_tile_program
    tp = rk.lower(rk.ops.gla)
    tp.stages[0].ops.insert(0, TileOp("bad", "contract", ("read_q", "G"), ("i",),
                                      (("over", ("K",)),)))
    with pytest.raises(TileVerifyError, match="before it is defined"):
        verify_tile_program(tp)
    tp = rk.lower(rk.ops.gla)
    op = tp.stages[0].ops[-1]
    tp.stages[0].ops[-1] = TileOp(op.out, op.op, op.args, ("Q",), op.attrs)
    with pytest.raises(TileVerifyError, match="axis"):
        verify_tile_program(tp)


@pytest.mark.parametrize("stream_bytes", [1, 1 << 16])
def test_chunk_stages_streamed_in_groups(monkeypatch, stream_bytes):
    """The stages are streamed over groups of chunks (one chunk per group, or a few): the
    result does not depend on the grouping."""
    from recurkit.backends.torch import tile as torch_backend
    monkeypatch.setattr(torch_backend, "STREAM_BYTES", stream_bytes)
    for name in ["kda", "gla", "gated_delta_rule"]:
        x, S0, (o_ref, S_ref) = reference(name, 100, True)
        o, S = rk.compile(decl_of(name), backend="torch", chunk=16)(
            *x, initial_state=S0, output_final_state=True)
        assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5


def test_loop_plan_matches_op_by_op_execution():
    """The torch backend's loop plan (fused baddbmm, in place onto an accumulator it made,
    transposed views, the general path where a contraction is not one matmul, and results
    written into given buffers) computes what executing the ops one by one does."""
    from recurkit.backends.torch.tile_ops import LoopPlan, Val, exec_op
    from recurkit.lowering.tile import TileOp
    g = torch.Generator().manual_seed(0)
    B, C, K, V = 6, 4, 5, 6     # one batch axis: sequences x heads
    first = {"Y": Val(torch.randn(B, K, C, generator=g), ("K", "i")),
             "bT": Val(torch.randn(B, V, C, generator=g), ("V", "i")),
             "b": Val(torch.randn(B, C, V, generator=g), ("i", "V")),
             "d": Val(torch.rand(B, K, generator=g), ("K",)),
             "S": Val(torch.randn(B, K, V, generator=g), ("K", "V"))}
    ops = [TileOp("s1", "contract", ("Y", "S"), ("V", "i"), (("over", ("K",)),)),
           TileOp("nuT", "ir", ("bT", "s1"), ("V", "i"), (("ir_op", "add"),)),  # acc (V, i)
           TileOp("s2", "contract", ("Y", "b"), ("V", "K"), (("over", ("i",)),)),
           TileOp("s3", "contract", ("Y", "S"), ("i", "V"), (("over", ("K",)),)),
           TileOp("nu", "ir", ("b", "s3"), ("i", "V"), (("ir_op", "add"),)),    # fused
           TileOp("tot", "contract", ("S", "S"), (), (("over", ("K", "V")),)),   # not a matmul
           TileOp("s4", "ir", ("S", "d"), ("K", "V"), (("ir_op", "mul"),)),
           TileOp("s5", "contract", ("Y", "nu"), ("K", "V"), (("over", ("i",)),)),
           TileOp("S", "ir", ("s4", "s5"), ("K", "V"), (("ir_op", "add"),)),   # onto s4
           # fused, the contraction's axes the reverse of the sum's
           TileOp("s6", "contract", ("Y", "b"), ("V", "K"), (("over", ("i",)),)),
           TileOp("s7", "ir", ("S", "d"), ("K", "V"), (("ir_op", "mul"),)),
           TileOp("s8", "ir", ("s7", "s6"), ("K", "V"), (("ir_op", "add"),))]
    plan = LoopPlan(ops, "S", first, C, {"K": K, "V": V}, needed=("nuT", "s2", "tot", "s8"))
    ref = dict(first)
    for op in ops:
        ref[op.out] = exec_op(op, ref, C, {"K": K, "V": V})
    b_before = first["b"].t.clone()
    for out in (None, {"nu": torch.empty(B, C, V)}):
        env = {n: v.t for n, v in first.items()}
        plan.run(env, out)
        for n in ("nuT", "s2", "nu", "tot", "S", "s8"):
            got = Val(env[n], plan.axes[n]).to(ref[n].axes)
            assert torch.allclose(got, ref[n].t, atol=1e-5), n
        if out is not None:
            assert env["nu"] is out["nu"]            # written into the given buffer
    assert torch.equal(first["b"].t, b_before)       # an input accumulator is not overwritten


def test_decay_exp_clamp_changes_no_result():
    """The torch backend clamps log-decays before exp (keeping torch's exp off its slow path
    for -inf and large negative inputs); that must give exactly exp with results below the
    flush threshold set to 0, in place or not, at the threshold's edge and beyond."""
    import math
    from recurkit.backends.torch.tile_ops import FLUSH_BELOW, _decay_exp
    edge = math.log(FLUSH_BELOW)
    x = torch.tensor([0.0, -1.0, -20.0, edge + 1e-4, edge - 1e-4, -46.0, -47.0, -60.0, -88.0,
                      -200.0, float("-inf"), 0.5])
    want = torch.where(torch.exp(x) < FLUSH_BELOW, torch.zeros(()), torch.exp(x))
    assert torch.equal(_decay_exp(x), want)
    assert torch.equal(_decay_exp(x.clone(), inplace=True), want)
    xg = x.clone().requires_grad_()
    assert torch.equal(_decay_exp(xg, inplace=True).detach(), want)   # autograd: not in place
    assert torch.equal(xg.detach(), x)
