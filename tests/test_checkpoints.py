"""The chunk checkpoints the op's forward saves for the sequential adjoint
(``backends.shared.checkpoints``): written by the TVM forward kernel only when a backward will
follow, used by the TVM adjoint kernel only when they are its call's, the same gradients
either way."""
import pytest
import torch

import recurkit as rk
import recurkit.backends.tvm.adjoint as tvm_adjoint
from recurkit.backends.shared import checkpoints
from recurkit.backends.tvm.sequential import CHECKPOINT_CHUNK
from test_adjoint import BUILTINS, draw, gradients, rel, state_shape


@pytest.fixture
def used(monkeypatch):
    """Per adjoint kernel run: whether it got the forward's checkpoints and used them."""
    seen = []
    orig = tvm_adjoint._kernel

    def kernel(adj, sizes, H, chunk, knobs, given, *rest):
        seen.append(given)
        return orig(adj, sizes, H, chunk, knobs, given, *rest)
    monkeypatch.setattr(tvm_adjoint, "_kernel", kernel)
    return seen


@pytest.mark.parametrize("name", ["gated_delta_rule", "gla", "hgrn", "dplr_delta_rule"])
@pytest.mark.parametrize("T,cu,S0", [(1, None, False), (63, None, True), (100, None, True),
                                     (100, [0, 1, 33, 33, 100], True)],
                         ids=["T1", "T63", "T100", "varlen"])
def test_the_backward_starts_from_the_forwards_checkpoints(name, T, cu, S0, used):
    decl = BUILTINS[name]
    xs = draw(decl, T)
    N = 1 if cu is None else len(cu) - 1
    init = torch.randn(*state_shape(decl, N)) * 0.5 if S0 else None
    op = rk.compile(decl, backend="tvm", form="sequential")
    got = gradients(op, xs, init, cu)
    assert used == [True]
    want = gradients(rk.compile(decl, backend="reference"), xs, init, cu)
    for n in want:
        assert rel(got[n], want[n]) < 1e-4, (n, rel(got[n], want[n]))
    # the same backward recomputing the checkpoints (the op called without its entry)
    used.clear()
    leaves = {n: x.clone().requires_grad_() for n, x in xs.items()}
    args = [leaves.get(n) for n in op.torch_op.arg_names]
    args[op.torch_op.arg_names.index("initial_state")] = init
    if cu is not None:
        args[op.torch_op.arg_names.index("cu_seqlens")] = torch.tensor(cu)
    o, S = op.torch_op.op(*args)
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(3))
    g1 = torch.autograd.grad((o * w).sum(), list(leaves.values()))
    assert used == [False]
    used.clear()
    o, S = op(**leaves, initial_state=init, cu_seqlens=None if cu is None else torch.tensor(cu),
              output_final_state=True)
    g2 = torch.autograd.grad((o * w).sum(), list(leaves.values()))
    assert used == [True]
    for a, b in zip(g1, g2):
        assert rel(b, a) < 1e-6


def test_checkpoints_are_the_states_entering_each_chunk(monkeypatch):
    decl = BUILTINS["gated_delta_rule"]
    T = 2 * CHECKPOINT_CHUNK + 5
    xs = draw(decl, T)
    offered = []
    orig = checkpoints.offer
    monkeypatch.setattr(checkpoints, "offer", lambda ck: (offered.append(ck), orig(ck)))
    op = rk.compile(decl, backend="tvm", form="sequential")
    leaves = {n: x.clone().requires_grad_() for n, x in xs.items()}
    op(**leaves)
    (ck,) = offered
    assert ck.chunk == CHECKPOINT_CHUNK and ck.states.shape == (1, 2, 3, 4, 5)
    ref = rk.compile(decl, backend="reference")
    for c in range(3):
        n = c * CHECKPOINT_CHUNK
        S = torch.zeros(state_shape(decl, 1)) if n == 0 else ref(
            **{k: x[:, :n] for k, x in xs.items()}, output_final_state=True)[1]
        assert rel(ck.states[:, :, c], S) < 1e-5 if n else ck.states[:, :, c].abs().max() == 0


def test_no_checkpoints_without_a_backward_to_come(monkeypatch):
    """Under no_grad, or when no input requires grad, the forward saves nothing (memory)."""
    decl = BUILTINS["gated_delta_rule"]
    xs = draw(decl, 70)
    offered = []
    monkeypatch.setattr(checkpoints, "offer", offered.append)
    op = rk.compile(decl, backend="tvm", form="sequential")
    op(**xs)
    with torch.no_grad():
        op(**{n: x.clone().requires_grad_() for n, x in xs.items()})
    assert offered == []
    assert not checkpoints.wanted()   # nothing left open


def test_checkpoints_of_another_call_are_not_used(used):
    """A kernel given checkpoints at another chunk, shape or declaration recomputes."""
    from recurkit.backends.shared.adjoint import generated_backward
    from recurkit.ir.bind import bind_call
    from recurkit.lowering.adjoint import derive_adjoint
    decl = BUILTINS["gated_delta_rule"]
    xs = {n: x.requires_grad_() for n, x in draw(decl, 40).items()}
    bc = bind_call(decl.program, (), xs)
    adj = derive_adjoint(decl.program)
    go = torch.randn(1, 40, 2, 5)
    right = torch.randn(1, 2, 2, 4, 5)
    bad = [checkpoints.Checkpoints(decl.program.content_hash(), 16, right),
           checkpoints.Checkpoints(decl.program.content_hash(), 32, right[:, :, :1]),
           checkpoints.Checkpoints("another", 32, right)]
    want = generated_backward(bc, adj, go, None, tvm_adjoint.run_adjoint_tvm, xs)
    for ck in bad:
        got = generated_backward(bc, adj, go, None, tvm_adjoint.run_adjoint_tvm, xs, ck)
        for n in want:
            assert torch.equal(got[n], want[n]), n
    assert used == [False] * 4
