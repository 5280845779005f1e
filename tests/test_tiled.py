"""Tiled declarations (rk.tiled): tracing and refusals, the derived backward, and every
backend's kernels (forward and backward) against the reference interpreter under autograd."""
import pytest
import torch

import recurkit as rk
from recurkit.lowering.forms import LoweringError
from recurkit.lowering.tiled import lower_tiled


@rk.tiled
def mixed(x: rk.Row["I"], r: rk.Row["Q", "P"], idx: rk.Index["P", "Q"], w: rk.Weight["Q", "P"],
          c: rk.Scalar = 0.5):
    """Every kind of input, unary/binary ops, where, a scalar, and a 2-D output whose inputs
    are declared in other dim orders than the canonical one."""
    a = rk.gather(x, idx)
    return rk.where(a > 0.2, rk.exp(a) * w, c * rk.sigmoid(r * w)) + rk.tanh(r) * a / (1.0 + a * a)


@rk.tiled
def reduced(x: rk.Row["G", "C"], y: rk.Row["C"], idx: rk.Index["C"], z: rk.Row["I"],
            w: rk.Weight["C"]):
    """A reduction over a row whose dims are not in output-then-reduced order, next to a
    gather, a weight and a directly read row."""
    s = rk.sum(rk.exp(x) * x - 1.0, "G")
    return s * w + y * rk.gather(z, idx) + rk.sigmoid(s)


def logic_inputs(N, I=19, O=70, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(N, I, generator=g).to(dtype)
    ia, ib = torch.randint(0, I, (O,), generator=g), torch.randint(0, I, (O,), generator=g)
    return (x, ia, ib, *(torch.randn(O, generator=g).to(dtype) for _ in range(4)))


def mixed_inputs(N, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    P, Q, I = 5, 3, 11
    return (torch.randn(N, I, generator=g).to(dtype), torch.randn(N, Q, P, generator=g).to(dtype),
            torch.randint(0, I, (P, Q), generator=g, dtype=torch.int32),
            torch.randn(Q, P, generator=g).to(dtype))


def reduced_inputs(N, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, 4, 3, generator=g).to(dtype), torch.randn(N, 3, generator=g).to(dtype),
            torch.randint(0, 6, (3,), generator=g), torch.randn(N, 6, generator=g).to(dtype),
            torch.randn(3, generator=g).to(dtype))


def group_sum_inputs(N, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, 10, 7, generator=g).to(dtype), 1.7)


CASES = {"logic_layer": (rk.ops.logic_layer, logic_inputs), "mixed": (mixed, mixed_inputs),
         "reduced": (reduced, reduced_inputs), "group_sum": (rk.ops.group_sum, group_sum_inputs)}


def test_tiled_declaration_prints_hashes_and_round_trips():
    p = rk.ops.logic_layer.program
    text = str(p)
    assert text.startswith("tiled logic_layer") and "gather[I](x, ia)" in text
    assert "index   ia: [O]" in text and "row     x: [N, I]" in text
    q = rk.Program.from_json(p.to_json())
    assert q.content_hash() == p.content_hash()
    assert mixed.program.content_hash() != p.content_hash()
    plan = lower_tiled(p)
    assert set(plan.weight_grads) == {"k0", "k1", "k2", "k3"}
    assert [s.index for s in plan.scatters] == ["ia", "ib"]


def test_tiled_declaration_errors():
    with pytest.raises(rk.DeclarationError, match="rk.Row, which @rk.recurrence"):
        @rk.recurrence
        def bad(S: rk.State["K"], x: rk.Row["K"]):
            return S, S
    with pytest.raises(rk.DeclarationError, match="rk.Token, which @rk.tiled"):
        @rk.tiled
        def bad2(x: rk.Token["K"]):
            return x
    with pytest.raises(rk.DeclarationError, match="indices only select"):
        @rk.tiled
        def bad3(x: rk.Row["I"], idx: rk.Index["O"]):
            return idx * 2.0
    with pytest.raises(rk.DeclarationError, match="must be an rk.Index"):
        @rk.tiled
        def bad4(x: rk.Row["I"], w: rk.Weight["O"]):
            return rk.gather(x, w)
    with pytest.raises(rk.DeclarationError, match="also a dim of the gathered value"):
        @rk.tiled
        def bad5(x: rk.Row["I"], idx: rk.Index["I"]):
            return rk.gather(x, idx)

    @rk.tiled
    def reduces(x: rk.Row["I"], idx: rk.Index["O"]):
        return rk.sum(rk.gather(x, idx), "O") + rk.gather(x, idx)
    with pytest.raises(LoweringError, match=r"rk.sum leaves dims \[\]"):
        lower_tiled(reduces.program)

    @rk.tiled
    def maxes(x: rk.Row["O", "G"]):
        return rk.max(x, "G")
    with pytest.raises(LoweringError, match="tiled ops reduce with rk.sum"):
        lower_tiled(maxes.program)

    @rk.tiled
    def weighted_inside(x: rk.Row["O", "G"], w: rk.Weight["O"]):
        return rk.sum(x * w, "G")
    with pytest.raises(LoweringError, match="weight 'w' is read inside a reduction"):
        lower_tiled(weighted_inside.program)

    @rk.tiled
    def narrow_weight(x: rk.Row["I"], idx: rk.Index["O", "P"], w: rk.Weight["O"]):
        return rk.gather(x, idx) * w
    with pytest.raises(LoweringError, match="weights carry exactly the output's dims"):
        lower_tiled(narrow_weight.program)


def test_tiled_call_errors():
    op = rk.compile(rk.ops.logic_layer, backend="torch")
    x, ia, ib, *k = logic_inputs(4)
    with pytest.raises(rk.CallError, match=r"'ia': indices select along dim I of size 19"):
        op(x, ia + 19, ib, *k)
    with pytest.raises(rk.CallError, match="'ia': expected an int32 or int64 index"):
        op(x, ia.float(), ib, *k)
    with pytest.raises(rk.CallError, match=r"'x': expected dtype float32"):
        op(x.int(), ia, ib, *k)
    with pytest.raises(rk.CallError, match=r"'k1': dim O \(axis 0 of \[O\]\) is 3"):
        op(x, ia, ib, k[0], k[1][:3], *k[2:])
    with pytest.raises(rk.CallError, match=r"'x': expected 2 dims laid out \[N, I\]"):
        op(x[None], ia, ib, *k)
    with pytest.raises(ValueError, match="tiled declaration"):
        rk.compile(rk.ops.logic_layer, chunk=32)


@pytest.mark.parametrize("backend", ["torch", "tvm", "triton"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("N", [1, 63, 100])
def test_tiled_forward_and_backward_match_reference(backend, case, N):
    decl, make = CASES[case]
    args = make(N)
    leaves = [a.clone().requires_grad_(a.is_floating_point()) if torch.is_tensor(a) else a
              for a in args]
    ref = decl(*leaves)
    dy = torch.randn_like(ref)
    want = torch.autograd.grad(ref, [a for a in leaves if torch.is_tensor(a) and a.requires_grad],
                               dy)
    op = rk.compile(decl, backend=backend)
    leaves2 = [a.clone().requires_grad_(a.is_floating_point()) if torch.is_tensor(a) else a
               for a in args]
    out = op(*leaves2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(out, [a for a in leaves2 if torch.is_tensor(a) and a.requires_grad],
                              dy)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["tvm", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tiled_half_inputs(backend, dtype):
    args = logic_inputs(33, dtype=dtype)
    ref = rk.ops.logic_layer(*[a.float() if a.is_floating_point() else a for a in args])
    out = rk.compile(rk.ops.logic_layer, backend=backend)(*args)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


def test_tiled_op_is_a_custom_op_and_passes_opcheck():
    op = rk.compile(rk.ops.logic_layer)
    args = logic_inputs(9)
    torch.library.opcheck(op.op.default, args)
    e = rk.export(rk.ops.logic_layer, "rk_test::logic_layer")
    assert torch.ops.rk_test.logic_layer is not None and e(*args).shape == (9, 70)
    with pytest.raises(ValueError, match="already registered for another declaration"):
        rk.export(mixed, "rk_test::logic_layer")


def test_tiled_op_under_torch_compile_fullgraph():
    layer1, layer2 = rk.nn.LogicLayer(12, 40, "unique"), rk.nn.LogicLayer(40, 20)
    model = torch.nn.Sequential(layer1, layer2, rk.nn.GroupSum(2, tau=2.0))
    compiled = torch.compile(model, fullgraph=True)
    x = (torch.rand(16, 12) < 0.5).float()
    torch.testing.assert_close(compiled(x), model(x))
    loss = compiled(x).square().mean()
    loss.backward()
    assert layer1.weights.grad is not None and layer1.weights.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["sm_90", "gfx942"])
def test_tiled_triton_kernels_compile_ahead_of_time(arch):
    from recurkit.backends.triton.tiled import aot_report
    for plan, sizes in ((lower_tiled(rk.ops.logic_layer.program), {"I": 784, "O": 8000}),
                        (lower_tiled(mixed.program), {"I": 11, "P": 5, "Q": 3}),
                        (lower_tiled(reduced.program), {"G": 4, "C": 3, "I": 6}),
                        (lower_tiled(rk.ops.group_sum.program), {"C": 10, "G": 800})):
        for r in aot_report(plan, sizes, arch):
            assert r["spill_bytes"] in (0, None), r
