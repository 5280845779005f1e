"""The sequential CPU kernel's in-kernel prologue (state-free values computed per token from
the call's tensors in their own dtype), its vector exp / sigmoid / silu, and the
column-blocked layout (blocks of the state's last dim as tasks of their own), against the
reference interpreter."""
import pytest
import torch

import recurkit as rk
from cases import VECTOR_CASES, matrix_inputs, vector_inputs
from recurkit.backends.tvm import sequential as seq
from recurkit.backends.tvm.build import compile_source
from recurkit.backends.tvm.fastmath import fast_steps


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("op", ["exp", "sigmoid", "silu"])
def test_vector_functions_match_torch_over_the_float_range(op):
    steps = fast_steps(op, "A[i]", "Y", "i")
    lines = "\n".join(f"        for i in T.vectorized(64):\n            {s}" for s in steps[1])
    allocs = "\n".join(f"        {b} = T.alloc_buffer((64,), \"float32\")" for b in steps[0])
    src = f'''@T.prim_func
def main(a: T.handle, y: T.handle):
    T.func_attr({{"global_symbol": "main", "tir.noalias": True}})
    N = T.int32()
    A0 = T.match_buffer(a, (N, 64), "float32")
    Y0 = T.match_buffer(y, (N, 64), "float32")
    for r in T.serial(N):
        A = T.alloc_buffer((64,), "float32")
        Y = T.alloc_buffer((64,), "float32")
{allocs}
        for i in T.vectorized(64):
            A[i] = A0[r, i]
{lines}
        for i in T.vectorized(64):
            Y0[r, i] = Y[i]
'''
    fn = compile_source(src)
    x = torch.cat([torch.linspace(-120, 120, 64 * 40), torch.randn(64 * 20),
                   torch.tensor([-float("inf"), float("inf"), float("nan"), -87.4, -87.3,
                                 88.7, 88.8, 0.0] * 8)]).reshape(-1, 64)
    y = torch.empty_like(x)
    fn(x, y)
    ref = {"exp": torch.exp, "sigmoid": torch.sigmoid, "silu": torch.nn.functional.silu}[op](
        x.double())
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    ok = ~torch.isnan(ref) & (ref.abs() < 3.4e38)
    big = ref.abs() > 1e-36   # below: 0 where exp's result would be subnormal
    assert ((y.double() - ref).abs() <= 4e-7 * ref.abs())[ok & big].all()
    assert (y.double()[ok & ~big].abs() <= 1e-36).all()
    assert torch.equal(torch.isinf(y), torch.isinf(ref.float()))


def one_head(name, T, dtype=torch.float32, gate=None, D=96):
    return vector_inputs(name, 1, T, 1, D, dtype=dtype, gate=gate)


@pytest.mark.parametrize("name", sorted(VECTOR_CASES))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3),
                                       (torch.bfloat16, 1e-2)])
def test_vector_state_cut_into_column_tasks(name, dtype, tol):
    """One sequence and one head: the kernel cuts D into blocks to give the threads tasks
    (forced here by a 32-wide ``columns``), reading fp16 / bf16 inputs as they are."""
    decl = rk.ops.ALL[name].decl
    src = seq.sequential_source(decl.program, {"D": 96}, 1, knobs={"columns": 32})
    assert "vb: T.let = nhb % 3" in src
    for T in (1, 63, 100):
        x = one_head(name, T, dtype)
        S0 = torch.randn(1, 1, 96)
        kw = dict(initial_state=S0, output_final_state=True)
        o_ref, S_ref = rk.compile(decl, backend="reference")(*x, **kw)
        for knobs in ({"columns": 32}, {}):
            o, S = rk.compile(decl, backend="tvm", knobs=knobs)(*x, **kw)
            assert o.dtype == dtype and S.dtype == torch.float32
            assert rel(o, o_ref) < tol and rel(S, S_ref) < 1e-5


@pytest.mark.parametrize("name", sorted(VECTOR_CASES))
def test_vector_state_varlen_and_extreme_gates(name):
    lens = [3, 0, 1, 40]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    decl = rk.ops.ALL[name].decl
    for gate in ((-100.0, -80.0), (-1e-4, 0.0), (-0.5, -0.01)):   # decay near 0, near 1
        x = vector_inputs(name, 1, sum(lens), 2, 64, gate=gate)
        if name == "min_gru":   # its gate is a pre-activation: extreme both ways
            x[1] = x[1] * 60
        kw = dict(initial_state=torch.randn(len(lens), 2, 64), output_final_state=True,
                  cu_seqlens=cu)
        o_ref, S_ref = rk.compile(decl, backend="reference")(*x, **kw)
        o, S = rk.compile(decl, backend="tvm", knobs={"columns": 16})(*x, **kw)
        assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5


@pytest.mark.parametrize("name", ["linear_attn", "gated_delta_rule", "kda", "kla"])
def test_matrix_state_in_column_tasks(name):
    """``columns`` cuts a matrix state's value columns into tasks of their own; the prologue
    (l2 norms, exp gates, normalised betas) is made per block."""
    decl = rk.ops.ALL[name].decl
    for T in (1, 63):
        x = matrix_inputs(name, 2, T, 2, 8, 24)
        kw = dict(initial_state=torch.randn(2, 2, 8, 24), output_final_state=True)
        o_ref, S_ref = rk.compile(decl, backend="reference")(*x, **kw)
        o, S = rk.compile(decl, backend="tvm", knobs={"columns": 8})(*x, **kw)
        assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5


def test_prologue_is_in_the_kernel():
    """No torch-computed feeds for the built-ins: every state-free value is made in the
    kernel from the call's tensors (named X*, read in place) and stored ones (P*)."""
    for name, op in rk.ops.ALL.items():
        p = op.decl.program
        gen = seq._Gen(p, {**{d: 16 for d in p.dims}, "__H": 2})
        assert gen.feeds == [], name
    src = seq.sequential_source(rk.ops.hgrn.decl.program, {"D": 64}, 2,
                                layout={"x": ("bfloat16", 1), "g": ("float16", 1)},
                                out_dtype="bfloat16")
    assert '"bfloat16")' in src and 'T.Cast("float32", X' in src
    assert 'T.Cast("bfloat16"' in src and "T.exp(" not in src


def test_mixed_input_dtypes_match_reference():
    decl = rk.ops.gated_delta_rule.decl
    x = matrix_inputs("gated_delta_rule", 1, 37, 2, 8, 16)
    x = [x[0].bfloat16(), x[1], x[2].half(), x[3], x[4].bfloat16()]
    o_ref, S_ref = rk.compile(decl, backend="reference")(*x, output_final_state=True)
    o, S = rk.compile(decl, backend="tvm")(*x, output_final_state=True)
    assert o.dtype == o_ref.dtype and rel(o, o_ref) < 1e-2 and rel(S, S_ref) < 1e-2
