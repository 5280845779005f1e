"""The chunk-form backward (lowering/chunk_adjoint.py): the adjoint lowered as a tile program
and run by the torch renderer (batched) and by Triton (its interpreter on CPU tensors),
against autograd through the reference interpreter: every built-in with a chunk form, its
variants and the tests' own declarations; odd lengths, chunk sizes, varlen with empty and
length-1 segments, initial and final states, extreme decays, 16-bit inputs."""
import pytest
import torch

import recurkit as rk
from recurkit.lowering.analysis import analyze
from recurkit.lowering.chunk_adjoint import lower_adjoint
from recurkit.lowering.forms import LoweringError
from recurkit.lowering.tile import verify_tile_program
from test_adjoint import BUILTINS, CUSTOM, draw, gradients, state_shape

CHUNKED = {n: d for n, d in {**BUILTINS, **CUSTOM}.items()
           if any(f.startswith("chunk") for f in analyze(d.program).forms)}
VARLEN = [0, 1, 33, 33, 100]   # lengths 1, 32, 0 and 67


def err(got, want, scale=0.0):
    """Max error relative to the largest entry, or to 1% of ``scale`` (the call's largest
    gradient) where that is more: the log-gates' gradients are sums of terms of the other
    gradients' size (q dq - k dk ...), so a gradient that is truly ~0 (decays near 0, a zero
    state) comes out at fp32 rounding of those terms (measured: 1e-6 against terms of 5)."""
    den = max(want.float().abs().max().item(), 1e-2 * scale, 1e-30)
    return (got.float() - want.float()).abs().max().item() / den


def check(decl, T=63, S0=True, cu=None, B=1, tol=1e-4, dtype=torch.float32, backend="torch",
          chunk=None, form=None, **draw_kw):
    xs = draw(decl, T, B=B, dtype=dtype, **draw_kw)
    N = B if cu is None else len(cu) - 1
    init = torch.randn(*state_shape(decl, N)) * 0.5 if S0 else None
    op = rk.compile(decl, backend=backend, form=form, chunk=chunk, backward="chunk") \
        if backend == "torch" else rk.compile(decl, backend=backend, form=form, chunk=chunk)
    got = gradients(op, xs, init, cu)
    want = gradients(rk.compile(decl, backend="reference"), xs, init, cu)
    assert set(got) == set(want)
    scale = max(w.float().abs().max().item() for w in want.values() if w is not None)
    for n in want:
        if want[n] is None:
            continue
        assert got[n] is not None and got[n].dtype == want[n].dtype, n
        e = err(got[n], want[n], scale)
        assert e < tol, (decl.name, n, e)


@pytest.fixture
def chunk_calls(monkeypatch):
    """The programs the chunk-form backward ran for (proof that it, not the sequential
    adjoint, made the gradients)."""
    import recurkit.backends.shared.chunk_backward as cb
    calls, orig = [], cb.chunk_backward

    def spy(bc, tp, *a, **k):
        calls.append(tp.name)
        return orig(bc, tp, *a, **k)
    monkeypatch.setattr(cb, "chunk_backward", spy)
    return calls


@pytest.mark.parametrize("name", list(CHUNKED))
def test_torch_chunk_backward_matches_autograd_through_the_reference(name, chunk_calls):
    decl = CHUNKED[name]
    check(decl, T=1, S0=False)
    check(decl, T=63)
    check(decl, T=100, cu=VARLEN)
    ex = analyze(decl.program).expansion   # sub-steps: the expanded declaration's backward
    assert chunk_calls == [(ex.program if ex else decl).name + "_adjoint"] * 3


SLOW = pytest.mark.slow


@pytest.mark.parametrize("chunk", [16, 32, 64])
@pytest.mark.parametrize("name", ["gated_delta_rule", pytest.param("gla", marks=SLOW),
                                  pytest.param("kda", marks=SLOW)])
def test_chunk_sizes_and_batches(name, chunk):
    check(BUILTINS[name], T=100, B=2, chunk=chunk)


@pytest.mark.parametrize("gate", [(-69.0, -60.0), (-1e-6, -1e-7)], ids=["decay~0", "decay~1"])
@pytest.mark.parametrize("name", ["gated_delta_rule", "gla", pytest.param("kda", marks=SLOW),
                                  "simple_gla"])
def test_extreme_gates(name, gate):
    check(BUILTINS[name], T=100, gate=gate)


def test_a_long_sequence():
    check(BUILTINS["gated_delta_rule"], T=1000, chunk=64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["gated_delta_rule", "gla"])
def test_half_inputs(name, dtype):
    """16-bit inputs, fp32 math: equal to the reference's up to the dtype's rounding of the
    gradients it returns."""
    check(BUILTINS[name], T=40, dtype=dtype, tol=1e-2)


# --- Triton: the same program in the interpreter ------------------------------------------------
@pytest.mark.parametrize("name", ["gated_delta_rule", pytest.param("gla", marks=SLOW)])
def test_triton_chunk_backward_in_the_interpreter(name, chunk_calls):
    """backend="triton" on CPU tensors: forward and backward are Triton kernels (interpreted)."""
    decl = BUILTINS[name]
    check(decl, T=40, backend="triton", chunk=16, cu=[0, 0, 1, 17, 40])
    assert chunk_calls == [decl.name + "_adjoint"]


def test_triton_renders_the_prologue_backward_with_parameters_and_post_scales():
    """Per-head parameters (their per-token shares summed on the host), a softplus/sigmoid
    prologue and an l2-norm, in the interpreted gradient kernel."""
    check(CHUNKED["normalised_beta"], T=20, backend="triton", chunk=16)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in CHUNKED if n not in ("gated_delta_rule", "gla")])
def test_triton_chunk_backward_every_declaration(name):
    check(CHUNKED[name], T=33, backend="triton", chunk=16)
    check(CHUNKED[name], T=40, backend="triton", chunk=16, cu=[0, 0, 1, 17, 40])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gated_delta_rule", "kda"])
def test_triton_chunk_backward_longer(name):
    check(BUILTINS[name], T=100, backend="triton", chunk=32, cu=VARLEN)
    check(BUILTINS[name], T=1, S0=False, backend="triton", chunk=16)


@pytest.mark.parametrize("name", ["gated_delta_rule", pytest.param("kda", marks=SLOW),
                                  pytest.param("gla", marks=SLOW),
                                  pytest.param("two_sided_gate", marks=SLOW)])
def test_the_gradient_kernel_looping_over_blocks_of_v(name, monkeypatch):
    """The gradient kernel's loop over blocks of V (state_loop.py; on by default for [K, V]
    above 8192 entries), forced at a size the interpreter runs: V = 40 in blocks of 16 (the
    last one partial), K = 20 (padded to 32)."""
    from recurkit.backends.triton import chunk_module
    from recurkit.backends.triton.chunk import _StageGen
    from recurkit.backends.triton.runtime import check_config
    from test_adjoint import gradients
    monkeypatch.setattr(_StageGen, "STATE_LOOP_ELEMS", 0)
    monkeypatch.setattr(_StageGen, "STATE_BLOCK_V", 16)
    decl = CHUNKED[name]
    sizes = {"K": 20, "V": 40, "D": 6}
    src, _ = chunk_module.chunk_source(lower_adjoint(decl, chunk=16), sizes, 2,
                                       check_config(None), dtype="fp32", has_dsf=True)
    grads_src = src[src.index("def grads_kernel"):]
    assert "for kb in tl.range(0, 40, 16, num_stages=1):" in grads_src
    cu = [0, 0, 1, 17, 40]
    xs = draw(decl, 40, sizes=sizes)
    init = torch.randn(len(cu) - 1, 2, 20, 40) * 0.5
    got = gradients(rk.compile(decl, backend="triton", chunk=16), xs, init, cu)
    want = gradients(rk.compile(decl, backend="reference"), xs, init, cu)
    scale = max(w.abs().max().item() for w in want.values() if w is not None)
    for n in want:
        assert err(got[n], want[n], scale) < 1e-4, n


# --- the prologue's backward --------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CHUNKED))
def test_the_prologue_backward_is_ir_the_triton_kernel_renders(name):
    """Every chunk-form declaration's prologue has a backward as IR (lowering.prologue_vjp)
    for each floating input, and the Triton gradient kernel computes it (its module stores
    the inputs' gradients, not the prologue values' cotangents), at fp32 and bf16."""
    from recurkit.backends.triton.chunk_module import chunk_source
    from recurkit.backends.triton.runtime import check_config
    decl = CHUNKED[name]
    ex = analyze(decl.program).expansion   # sub-steps: the expanded declaration's backward
    decl = ex.program if ex else decl.program
    tp = lower_adjoint(decl)
    ivjp = tp.meta["input_vjp"]
    assert ivjp is not None, tp.meta["input_vjp_reason"]
    want = {s.name for s in decl.call_inputs if s.role in ("token", "param")}
    assert set(ivjp) == want
    for dt in ("fp32", "bf16"):
        src, io = chunk_source(tp, {d: 8 for d in decl.dims}, 2, check_config(None),
                               dtype=dt, has_dsf=True)
        assert io.input_grads == list(ivjp)
        grads = src[src.index("def grads_kernel"):]
        assert all(f"tl.store(O{k} " in grads for k in range(len(ivjp)))


@pytest.mark.parametrize("name", ["gated_delta_rule_l2norm", "normalised_beta",
                                  "two_sided_gate", "simple_gla_g_gamma"])
def test_the_prologue_backward_ir_equals_autograd_through_the_prologue(name):
    """The host's two ways through the prologue (its backward IR evaluated; autograd, the
    fallback where no IR exists) give the same gradients from the same kernel."""
    from recurkit.backends.shared.chunk_backward import chunk_backward
    from recurkit.backends.torch.chunk_adjoint import run_chunk_adjoint_torch
    from recurkit.ir.bind import bind_call
    decl = CHUNKED[name]
    xs = draw(decl, 37, B=2)
    leaves = {k: v.clone().requires_grad_() for k, v in xs.items()}
    leaves["initial_state"] = (torch.randn(*state_shape(decl, 2)) * 0.5).requires_grad_()
    bc = bind_call(decl.program, (), dict(leaves))
    tp = lower_adjoint(decl, chunk=16)
    go = torch.randn(bc.B, bc.T, bc.H, *(bc.sizes[d] for d in decl.program.output.dims))
    gs = torch.randn(leaves["initial_state"].shape)
    by_ir = chunk_backward(bc, tp, go, gs, run_chunk_adjoint_torch, leaves)
    tp.meta["input_vjp"] = None
    by_autograd = chunk_backward(bc, tp, go, gs, run_chunk_adjoint_torch, leaves)
    assert set(by_ir) == set(by_autograd) == set(leaves)
    for n in by_ir:
        assert err(by_ir[n], by_autograd[n]) < 1e-5, n


# --- the program ------------------------------------------------------------------------------
def test_the_backward_program_prints_and_verifies():
    tp = lower_adjoint(BUILTINS["gated_delta_rule"], chunk=32)
    verify_tile_program(tp)
    text = str(tp)
    assert text.startswith("tile program gated_delta_rule_adjoint: form chunk_wy, chunk 32")
    assert "stage adjoint_pass (loop, grid N x H, sequential backwards over chunks, " \
           "carries dS)" in text
    assert [s.name for s in tp.stages] == ["prep", "state_pass", "adjoint_pass", "grads"]
    assert set(tp.meta["grads"]) == {"read_q", "write_a0", "write_b0", "erase_u", "erase_r",
                                     "log_gate_k"}
    # no value of the backward is [K, V] per token: only per chunk (the states)
    for st in tp.stages:
        for op in st.ops:
            assert not ({"i", "K", "V"} <= set(op.axes)), op


def test_a_declaration_without_a_chunk_form_has_no_chunk_backward():
    with pytest.raises(LoweringError, match="no chunk-form backward"):
        lower_adjoint(BUILTINS["hgrn"])


def test_opcheck_of_the_chunk_backward_op():
    decl = BUILTINS["kda"]
    op = rk.compile(decl, backward="chunk").torch_op
    xs = draw(decl, 9)
    S0 = torch.randn(*state_shape(decl, 1)) * 0.5
    args = tuple(xs[n] for n in op.tensor_names) + (None,) * len(op.scalar_names) + (S0, None)
    o, S = op.op(*args)
    torch.library.opcheck(op.backward_op.default,
                          (torch.randn_like(o), torch.randn_like(S), *args))


@pytest.mark.parametrize("backend,mode,want", [
    ("auto", "auto", "run_adjoint_tvm"), ("torch", "auto", "run_adjoint_tvm"),
    ("tvm", "auto", "run_adjoint_tvm"), ("triton", "auto", "run_chunk_adjoint_triton"),
    ("auto", "chunk", "run_chunk_adjoint_torch"), ("tvm", "chunk", "run_chunk_adjoint_torch"),
    pytest.param("triton", "chunk", "run_chunk_adjoint_triton", marks=SLOW),
    ("triton", "adjoint", "run_adjoint_tvm")])
def test_which_backward_runs_on_the_cpu(backend, mode, want, monkeypatch):
    """docs/torch.md's table, CPU column."""
    import recurkit.backends.shared.adjoint as sa
    import recurkit.backends.shared.chunk_backward as cb
    ran = []

    def spy(mod, name):
        orig = getattr(mod, name)

        def f(bc, x, go, gs, kernel, leaves, *rest):
            ran.append(getattr(kernel, "func", kernel).__name__)
            return orig(bc, x, go, gs, kernel, leaves, *rest)
        monkeypatch.setattr(mod, name, f)
    spy(cb, "chunk_backward")
    spy(sa, "generated_backward")
    decl = BUILTINS["gated_delta_rule"]
    gradients(rk.compile(decl, backend=backend, backward=mode), draw(decl, 9), None)
    assert ran == [want]
