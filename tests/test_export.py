"""rk.export: the declaration as a torch custom op with fake impl and autograd, checked by
torch.library.opcheck, against the reference's gradients, and under torch.compile."""
import pytest
import torch

import recurkit as rk
from cases import matrix_inputs, vector_inputs
from test_custom_recurrences import draw, value_gated

OPS = ["gated_delta_rule", "gla", "kda", "hgrn", "simple_gla"]


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def inputs(name, T, B=1, seed=0):
    if name in ("hgrn", "min_gru"):
        return vector_inputs(name, B, T, 2, 6, seed=seed)
    return matrix_inputs(name, B, T, 2, 4, 5, seed=seed)


def exported(name):
    return rk.export(getattr(rk.ops, name), f"rk_test::{name}")


@pytest.mark.parametrize("name", OPS)
def test_opcheck(name):
    op = exported(name)
    x = inputs(name, 19)
    S0 = torch.randn(1, 2, *((6,) if name == "hgrn" else (4, 5)))
    n_scalars = len(op.scalar_names)
    for init in (None, S0):
        args = tuple(x) + (None,) * n_scalars + (init, None)
        torch.library.opcheck(op.op.default, args)


@pytest.mark.parametrize("T", [1, 23])
@pytest.mark.parametrize("name", OPS)
def test_gradients_match_the_reference(name, T):
    op = exported(name)
    ref = rk.compile(getattr(rk.ops, name), backend="reference")
    x = inputs(name, T, B=2)
    S0 = torch.randn(2, 2, *((6,) if name == "hgrn" else (4, 5))) * 0.5
    grads = []
    for fn in (op, ref):
        xs = [t.clone().requires_grad_() for t in x] + [S0.clone().requires_grad_()]
        o, S = fn(*xs[:-1], initial_state=xs[-1], output_final_state=True)
        (o * torch.linspace(-1, 1, o.numel()).reshape(o.shape)).sum().backward(
            retain_graph=True)
        S.square().sum().backward()
        grads.append([t.grad for t in xs])
    for g, g_ref in zip(*grads):
        assert rel(g, g_ref) < 1e-4


def test_varlen_gradients_and_a_declaration_from_the_tests():
    op = rk.export(value_gated, "rk_test::value_gated")
    ref = rk.compile(value_gated, backend="reference")
    x = [t[:1] for t in draw(value_gated, 30)]
    cu = torch.tensor([0, 1, 12, 30])
    grads = []
    for fn in (op, ref):
        xs = [t.clone().requires_grad_() for t in x]
        o, S = fn(*xs, cu_seqlens=cu, output_final_state=True)
        (o.sum() + S.square().sum()).backward()
        grads.append([t.grad for t in xs])
    for g, g_ref in zip(*grads):
        assert rel(g, g_ref) < 1e-4
    args = tuple(x) + (None,) * len(op.scalar_names) + (None, cu)
    torch.library.opcheck(op.op.default, args)


class Mixer(torch.nn.Module):
    """Two different exported ops in one model."""

    def __init__(self, d=8, H=2, K=4):
        super().__init__()
        self.H, self.K = H, K
        self.proj = torch.nn.Linear(d, 4 * H * K + 2 * H)
        self.gdn, self.gla = exported("gated_delta_rule"), exported("gla")

    def forward(self, x):
        B, T, _ = x.shape
        H, K = self.H, self.K
        q, k, v, gk, g, beta = self.proj(x).split([H * K] * 4 + [H, H], -1)
        q, k, v, gk = (t.reshape(B, T, H, K) for t in (q, k, v, gk))
        k = torch.nn.functional.normalize(k, dim=-1)
        o1, _ = self.gdn(q, k, v, torch.nn.functional.logsigmoid(g),
                         torch.sigmoid(beta))
        o2, _ = self.gla(q, k, v, torch.nn.functional.logsigmoid(gk))
        return (o1 + o2).reshape(B, T, H * K)


def test_torch_compile_fullgraph_traces_and_trains():
    torch.manual_seed(0)
    model = Mixer()
    compiled = torch.compile(model, fullgraph=True)   # a graph break would raise here
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(2, 12, 8), torch.randn(2, 12, 8)
    losses = []
    for _ in range(5):
        loss = (compiled(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    eager = (model(x) - y).square().mean().item()
    assert abs(eager - (compiled(x) - y).square().mean().item()) < 1e-5


def test_export_errors():
    with pytest.raises(ValueError, match="namespace::name"):
        rk.export(rk.ops.gla, "no_namespace")
    exported("gla")
    with pytest.raises(ValueError, match="already registered for another declaration"):
        rk.export(rk.ops.kda, "rk_test::gla")
    assert rk.export(rk.ops.gla, "rk_test::gla") is exported("gla")
    with pytest.raises(rk.CallError, match="missing required argument 'beta'"):
        exported("gated_delta_rule")(*inputs("gated_delta_rule", 5)[:4])


@pytest.mark.parametrize("backend", ["auto", "tvm", "torch", "reference"])
def test_every_compiled_op_is_a_custom_op(backend):
    """rk.compile results call a registered custom op: opcheck passes, gradients (also of the
    TVM kernel, whose backward recomputes with the torch tile program) match the reference,
    and torch.compile(fullgraph=True) traces a function that calls one."""
    op = rk.compile(rk.ops.gated_delta_rule, backend=backend)
    assert op.torch_op.qualname.startswith("recurkit_jit::gated_delta_rule_")
    x = inputs("gated_delta_rule", 13, B=2)
    S0 = torch.randn(2, 2, 4, 5) * 0.5
    torch.library.opcheck(op.torch_op.op.default, (*x, None, S0, None))
    ref = rk.compile(rk.ops.gated_delta_rule, backend="reference")
    grads = []
    for fn in (op, ref):
        xs = [t.clone().requires_grad_() for t in x] + [S0.clone().requires_grad_()]
        o, S = fn(*xs[:-1], initial_state=xs[-1], output_final_state=True)
        (o.sin().sum() + S.square().sum()).backward()
        grads.append([t.grad for t in xs])
    for g, g_ref in zip(*grads):
        assert rel(g, g_ref) < 1e-4

    def f(*a):
        return op(*a)[0].square().sum()
    assert torch.allclose(torch.compile(f, fullgraph=True)(*x), f(*x), rtol=1e-5)


def test_compiled_op_custom_op_is_shared_and_keyed_by_config():
    a = rk.compile(rk.ops.gla, backend="torch", chunk=16)
    b = rk.compile(rk.ops.gla, backend="torch", chunk=16)
    c = rk.compile(rk.ops.gla, backend="torch", chunk=32)
    assert a.torch_op is b.torch_op and a.torch_op is not c.torch_op
