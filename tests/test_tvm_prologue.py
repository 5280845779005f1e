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


def _rows_kernel(scratch, steps, outs):
    """A kernel over rows of 64 floats: A from its first argument, ``steps`` (statements
    over ``i``) through the ``scratch`` buffers, then each of ``outs`` to an argument."""
    lines = "\n".join(f"        for i in T.vectorized(64):\n            {s}" for s in steps)
    bufs = ["A", *outs, *scratch]
    allocs = "\n".join(f"        {b} = T.alloc_buffer((64,), \"float32\")" for b in bufs)
    params = ", ".join(f"{b.lower()}: T.handle" for b in ["A", *outs])
    matches = "\n".join(f"    {b}0 = T.match_buffer({b.lower()}, (N, 64), \"float32\")"
                         for b in ["A", *outs])
    stores = "\n".join(f"            {b}0[r, i] = {b}[i]" for b in outs)
    return compile_source(f'''@T.prim_func
def main({params}):
    T.func_attr({{"global_symbol": "main", "tir.noalias": True}})
    N = T.int32()
{matches}
    for r in T.serial(N):
{allocs}
        for i in T.vectorized(64):
            A[i] = A0[r, i]
{lines}
        for i in T.vectorized(64):
{stores}
''')


# the float range at both ends, specials, and values near exp's limits
FLOATS = torch.cat([torch.linspace(-120, 120, 64 * 40), torch.randn(64 * 20),
                    torch.tensor([-float("inf"), float("inf"), float("nan"), -87.4, -87.3,
                                  88.7, 88.8, 0.0] * 8)]).reshape(-1, 64)


@pytest.mark.parametrize("op", ["exp", "sigmoid", "silu"])
def test_vector_functions_match_torch_over_the_float_range(op):
    fn = _rows_kernel(*fast_steps(op, "A[i]", "Y", "i"), ["Y"])
    x = FLOATS
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
    with pytest.MonkeyPatch.context() as m:   # the plan for two threads
        m.setattr(torch, "get_num_threads", lambda: 2)
        src = seq.sequential_source(decl.program, {"D": 96}, 1, knobs={"columns": 32})
    # three 32-wide blocks, a task each (the fewest tasks, at least one per thread, that
    # divide them); each task walks its blocks of the state through S, a view of its part
    assert "pp: T.let = nhb % 3" in src and "vb: T.let = (pp * 1 + j) % 3" in src
    assert 'S = T.decl_buffer((32,), "float32", data=S_all.data' in src
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


@pytest.mark.parametrize("name", ["linear_attn", "retention", "simple_gla", "gla"])
def test_token_groups_share_a_pass_over_the_state(name):
    """Four tokens per pass over the state (their updates applied in turn to each entry),
    then the rest one by one: lengths around multiples of four, varlen with empty and
    length-1 segments, and the backward's checkpoints taken from it."""
    decl = rk.ops.ALL[name].decl
    src = seq.sequential_source(decl.program, {"K": 8, "V": 16}, 2)
    assert "for tg in T.serial((SEG[n, 2] - SEG[n, 1]) // 4):" in src
    assert "for tr in T.serial((SEG[n, 2] - SEG[n, 1]) % 4):" in src
    for T in (1, 3, 4, 63, 100):
        x = matrix_inputs(name, 2, T, 2, 8, 16)
        kw = dict(initial_state=torch.randn(2, 2, 8, 16), output_final_state=True)
        o_ref, S_ref = rk.compile(decl, backend="reference")(*x, **kw)
        o, S = rk.compile(decl, backend="tvm")(*x, **kw)
        assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5
    lens = [5, 0, 1, 9, 4]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    x = [t.requires_grad_() for t in matrix_inputs(name, 1, sum(lens), 2, 8, 16)]
    kw = dict(initial_state=torch.randn(len(lens), 2, 8, 16), output_final_state=True,
              cu_seqlens=cu)
    grads = []
    for backend in ("reference", "tvm"):
        o, S = rk.compile(decl, backend=backend)(*x, **kw)
        grads.append(torch.autograd.grad((o * o).sum() + S.sum(), x))
        if backend == "tvm":
            assert rel(o, o_ref_v) < 1e-5 and rel(S, S_ref_v) < 1e-5
        else:
            o_ref_v, S_ref_v = o, S
    for g, g_ref in zip(grads[1], grads[0]):
        assert rel(g, g_ref) < 1e-4


def test_token_groups_only_where_the_step_allows():
    """The delta rules read the old state before their update, and an output that sums the
    new state over its last dim is read after the pass: one token at a time."""
    for name in ("delta_rule", "gated_delta_rule", "kda"):
        src = seq.sequential_source(rk.ops.ALL[name].decl.program, {"K": 8, "V": 16}, 2)
        assert "for tg in" not in src
    p = rk.ops.linear_attn.decl.program
    assert "for tg in" not in seq.sequential_source(p, {"K": 8, "V": 16}, 2,
                                                    knobs={"tokens": 1})
    key_sum = next(d for op in rk.ops.ALL.values() for d in op.variants.values()
                   if d.name == "key_sum")   # out = q^T z' sums the new state over K
    assert "for tg in" not in seq.sequential_source(key_sum.program, {"K": 8}, 2)


def test_large_outputs_are_kept_buffers_the_caller_may_modify():
    """Outputs of 1 MB and more come from kept buffers (no page faults on each call): not
    views, so autograd allows in-place changes, and reused once the caller drops them."""
    from recurkit.backends.shared import buffers
    x = vector_inputs("hgrn", 1, 600, 1, 512)
    op = rk.compile(rk.ops.hgrn.decl, backend="tvm")
    o, _ = op(*x)
    assert o._base is None and o.is_contiguous() and o.shape == (1, 600, 1, 512)
    ptr = o.data_ptr()
    o_ref, _ = rk.compile(rk.ops.hgrn.decl, backend="reference")(*x)
    assert rel(o, o_ref) < 1e-5
    del o
    o2, _ = op(*x)
    assert o2.data_ptr() == ptr              # the same memory again
    o3, _ = op(*x)
    assert o3.data_ptr() != o2.data_ptr()    # o2 is still held
    assert rel(o3, o_ref) < 1e-5 and rel(o2, o_ref) < 1e-5
    g = x[1].clone().requires_grad_()
    o4, _ = op(x[0], g)
    o4 += 1                                  # in place on a custom op's output
    o4.sum().backward()
    assert g.grad is not None
    del o2, o3, o4
    assert buffers.release() >= 600 * 512 * 4


def test_sigmoid_pairs_match_torch_over_the_float_range():
    """sigmoid(x) and sigmoid(-x) from one exp (minGRU's gate and its complement): each to
    its own relative precision, at both ends of the float range, NaN kept."""
    from recurkit.backends.tvm.fastmath import sigmoid_pair_steps
    fn = _rows_kernel(*sigmoid_pair_steps("A[i]", "P", "M", "i"), ["P", "M"])
    x = FLOATS
    pos, neg = torch.empty_like(x), torch.empty_like(x)
    fn(x, pos, neg)
    for y, ref in ((pos, torch.sigmoid(x.double())), (neg, torch.sigmoid(-x.double()))):
        assert torch.equal(torch.isnan(y), torch.isnan(ref))
        ok = ~torch.isnan(ref) & (ref > 1e-36)
        assert ((y.double() - ref).abs() <= 4e-7 * ref.abs())[ok].all()
        assert (y.double()[~torch.isnan(ref) & ~ok] <= 1e-36).all()


@pytest.mark.parametrize("name", sorted(VECTOR_CASES))
def test_vector_state_strips_cross_heads(name, monkeypatch):
    """Three heads of 64 in 32-wide blocks: six blocks, two tasks of three (for two
    threads), so a task's walk of each row crosses from one head into the next; groups of
    four tokens and the rest one by one, the outputs written in the update pass."""
    decl = rk.ops.ALL[name].decl
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    src = seq.sequential_source(decl.program, {"D": 64}, 3)
    assert "for j in T.serial(3):" in src and "h: T.let = (pp * 3 + j) // 2" in src
    assert "for tg in T.serial(" in src
    for T in (1, 5, 63):
        x = vector_inputs(name, 1, T, 3, 64)
        kw = dict(initial_state=torch.randn(1, 3, 64), output_final_state=True)
        o_ref, S_ref = rk.compile(decl, backend="reference")(*x, **kw)
        o, S = rk.compile(decl, backend="tvm")(*x, **kw)
        assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5


def test_vector_state_with_a_sum_over_its_dim_stays_whole():
    """A state-free value that sums over the state's dim (an l2 norm of the input) is made
    in the kernel, which then walks whole rows rather than column blocks (where it would be
    a torch-computed feed)."""
    @rk.recurrence
    def normed(h: rk.State["D"], x: rk.Token["D"], g: rk.Token["D"]):
        h = rk.sigmoid(g) * h + rk.l2norm(x)
        return h, h
    gen = seq._Gen(normed.program, {"D": 64, "__H": 2})
    assert gen.cb is None and gen.feeds == []
    x = [torch.randn(1, 9, 2, 64), torch.randn(1, 9, 2, 64)]
    o_ref, S_ref = rk.compile(normed, backend="reference")(*x, output_final_state=True)
    o, S = rk.compile(normed, backend="tvm")(*x, output_final_state=True)
    assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5
