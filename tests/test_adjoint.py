"""The generated backward of recurrences (lowering/adjoint.py): the adjoint step derived from the
declaration, run back in time from checkpoints by the compiled TVM kernel (the custom op's
backward on CPU) and by the torch step runner, against autograd through the reference."""
import functools

import pytest
import torch
import torch.nn.functional as F

import recurkit as rk
from recurkit.backends.shared.adjoint import generated_backward
from recurkit.backends.torch.backward import run_adjoint_torch
from recurkit.backends.tvm.adjoint import run_adjoint_tvm
from recurkit.ir.bind import bind_call
from recurkit.lowering.adjoint import derive_adjoint
from recurkit.ops import ALL
from test_custom_recurrences import EXPECTED

SIZES = {"K": 4, "V": 5, "D": 6, "R": 3}
BUILTINS = {name: fn.decl for name, fn in ALL.items()}
BUILTINS.update({f"{name}_{v}": d for name, fn in ALL.items() for v, d in fn.variants.items()})
CUSTOM = {d.name: d for d in EXPECTED}


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def draw(decl, T, B=1, H=2, seed=0, gate=(-0.5, -0.01), dtype=torch.float32, sizes=SIZES):
    """Tensor inputs by name: unit keys, log-decays in ``gate``, betas in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for spec in decl.program.call_inputs:
        if spec.role == "scalar":
            continue
        shape = ((B, T, H) if spec.role == "token" else (H,)) + tuple(sizes[d] for d in spec.dims)
        x = torch.randn(*shape, generator=gen)
        if spec.name in ("g", "gk", "gv", "g_gamma"):
            lo, hi = gate
            x = lo + (hi - lo) * torch.rand(*shape, generator=gen)
        elif spec.name in ("beta", "eta", "b", "w") and "dplr" not in decl.name:
            x = torch.rand(*shape, generator=gen)
        elif spec.name in ("k", "e", "r") or (spec.name == "b" and "dplr" in decl.name):
            x = F.normalize(x, dim=-1) * (0.4 if spec.name in ("e", "r") else 1.0)
        elif spec.name == "d":
            x = torch.rand(*shape, generator=gen) * 0.9 + 0.05
        out[spec.name] = x
    if "dplr" in decl.name:   # a = -beta b keeps I + a b^T contractive
        out["a"] = -out["b"] * torch.rand(B, T, H, 1, generator=gen)
    return {n: x.to(dtype) for n, x in out.items()}


def state_shape(decl, N, H=2):
    return (N, H, *(SIZES[d] for d in decl.program.state.dims))


def gradients(fn, xs: dict, S0, cu=None, seed=1):
    """d/d(inputs, S0) of <o, w_o> + <S, w_S> for fixed random weights."""
    leaves = {n: x.clone().requires_grad_() for n, x in xs.items()}
    if S0 is not None:
        leaves["initial_state"] = S0.clone().requires_grad_()
    kw = dict(leaves)
    if cu is not None:
        kw["cu_seqlens"] = torch.tensor(cu)
    o, S = fn(**kw, output_final_state=True)
    gen = torch.Generator().manual_seed(seed)
    loss = (o.float() * torch.randn(o.shape, generator=gen)).sum() + \
        (S.float() * torch.randn(S.shape, generator=gen)).sum()
    got = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return dict(zip(leaves, got))


def check(decl, T=63, S0=True, cu=None, B=1, tol=1e-4, dtype=torch.float32, **draw_kw):
    xs = draw(decl, T, B=B, dtype=dtype, **draw_kw)
    N = B if cu is None else len(cu) - 1
    init = torch.randn(*state_shape(decl, N)) * 0.5 if S0 else None
    got = gradients(rk.compile(decl, backward="adjoint"), xs, init, cu)
    want = gradients(rk.compile(decl, backend="reference"), xs, init, cu)
    assert set(got) == set(want)
    for n in want:
        assert got[n] is not None, n
        assert got[n].dtype == want[n].dtype, n
        assert torch.isfinite(got[n]).all(), n
        assert rel(got[n], want[n]) < tol, (decl.name, n, rel(got[n], want[n]))


@pytest.mark.parametrize("name", list(BUILTINS))
def test_builtin_gradients_match_the_reference(name):
    decl = BUILTINS[name]
    check(decl, T=1, S0=False)
    check(decl, T=63)                       # two checkpoint chunks, the last one partial
    check(decl, T=100, cu=[0, 1, 33, 33, 100])   # varlen: lengths 1, 32, 0 and 67


@pytest.mark.parametrize("name", list(CUSTOM))
def test_declarations_from_the_tests(name):
    """Linear or not (the nonlinear step, a readout of the old state, a signed scan)."""
    check(CUSTOM[name], T=70, B=2)


@pytest.mark.parametrize("gate", [(-69.0, -60.0), (-1e-6, -1e-7)], ids=["decay~0", "decay~1"])
@pytest.mark.parametrize("name", ["gated_delta_rule", "gla", "hgrn"])
def test_extreme_gates(name, gate):
    check(BUILTINS[name], T=100, gate=gate)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["gated_delta_rule", "kda"])
def test_half_inputs(name, dtype):
    """Inputs read and gradients returned in the input dtype, computed in fp32: equal to the
    reference's up to the dtype's rounding of the result."""
    check(BUILTINS[name], T=40, dtype=dtype, tol=1e-2)


@pytest.mark.parametrize("name", ["gated_delta_rule", "hgrn", "dplr_delta_rule"])
def test_torch_runner_equals_the_compiled_kernel(name):
    """The torch step runner (the path off the CPU) and the TVM kernel walk the same adjoint."""
    a, b, _ = runner_and_kernel(BUILTINS[name])
    for n in a:
        assert rel(a[n], b[n]) < 1e-5, n


def runner_and_kernel(decl, sizes=SIZES, **kernel_kw):
    """The gradients of a varlen call (lengths 7, 0, 38) from the torch step runner, from the
    TVM kernel (``kernel_kw``: its options) and from the kernel again (cached) for another
    derivation of the declaration's adjoint."""
    p = decl.program
    adj = derive_adjoint(p)
    xs = {n: x.requires_grad_() for n, x in draw(decl, 45, sizes=sizes).items()}
    S0 = torch.randn(3, 2, *(sizes[d] for d in p.state.dims)).requires_grad_()
    cu = torch.tensor([0, 7, 7, 45])
    bc = bind_call(p, (), {**xs, "initial_state": S0, "cu_seqlens": cu})
    o, S = rk.compile(decl, backend="reference")(**xs, initial_state=S0, cu_seqlens=cu,
                                                  output_final_state=True)
    go, gS = torch.randn_like(o), torch.randn_like(S)
    leaves = {**xs, "initial_state": S0}
    kernel = functools.partial(run_adjoint_tvm, chunk=16, **kernel_kw)
    a = generated_backward(bc, adj, go, gS, functools.partial(run_adjoint_torch, checkpoint=8),
                           leaves)
    b = generated_backward(bc, adj, go, gS, kernel, leaves)
    c = generated_backward(bc, derive_adjoint(p), go, gS, kernel, leaves)
    assert set(a) == set(b) == set(c) == set(leaves)
    return a, b, c


@pytest.mark.parametrize("name,backward", [("gated_delta_rule", "auto"), ("gla", "chunk")])
def test_only_the_final_state_or_only_the_output_gets_a_gradient(name, backward):
    """The sequential adjoint (CPU's auto) and the chunk-form backward."""
    decl = BUILTINS[name]
    op, ref = rk.compile(decl, backward=backward), rk.compile(decl, backend="reference")
    xs = draw(decl, 30)
    for pick in (0, 1):
        got = []
        for fn in (op, ref):
            leaves = {n: x.clone().requires_grad_() for n, x in xs.items()}
            out = fn(**leaves, output_final_state=True)
            out[pick].square().sum().backward()
            got.append([leaves[n].grad for n in leaves])
        for g, w in zip(*got):
            assert rel(g, w) < 1e-4


def test_the_adjoint_of_gated_delta_rule_reads_as_its_math():
    """Printed: the feeds (state-free values), then the backward step's nodes; a
    broadcasting product (the outer product k v^T) is no feed, so no K x V value is stored
    per token."""
    text = str(derive_adjoint(BUILTINS["gated_delta_rule"].program))
    assert text.splitlines()[0] == "adjoint of gated_delta_rule"
    feeds = [line for line in text.splitlines() if line.strip().startswith("feed")]
    assert [f.split(":")[1].split("=")[0].strip() for f in feeds] == ["[]", "[K]", "[V]", "[]",
                                                                     "[K]", "[]"]
    assert "dS = " in text and "contract[K, V]" in text


def test_backward_option():
    decl = BUILTINS["gla"]
    xs = draw(decl, 20)
    want = gradients(rk.compile(decl, backend="reference"), xs, None)
    got = gradients(rk.compile(decl, backward="autograd"), xs, None)
    for n in want:
        assert rel(got[n], want[n]) < 1e-4
    with pytest.raises(ValueError, match="backward must be one of"):
        rk.compile(decl, backward="magic")
    with pytest.raises(ValueError, match="backward must be one of"):
        rk.export(decl, "rk_test::gla_bad_backward", backward="magic")


@pytest.mark.parametrize("name", list(BUILTINS) + list(CUSTOM))
def test_opcheck_every_declaration_and_its_backward_op(name):
    """opcheck (schema, fake impl, autograd registration, AOT dispatch) of the op that
    rk.compile registers, and of its backward op, for every built-in (and its variants) and
    every recurrence declared in the tests."""
    decl = BUILTINS.get(name) or CUSTOM[name]
    op = rk.compile(decl).torch_op
    xs = draw(decl, 9)
    S0 = torch.randn(*state_shape(decl, 1)) * 0.5
    args = tuple(xs[n] for n in op.tensor_names) + (None,) * len(op.scalar_names) + (S0, None)
    torch.library.opcheck(op.op.default, args)
    o, S = op.op(*args)
    torch.library.opcheck(op.backward_op.default,
                          (torch.randn_like(o), torch.randn_like(S), *args))


def test_the_backward_steps_reductions_are_factored():
    """Gated DeltaNet's dbeta = sum_KV dS'' * k (v - k^T S), which reverse mode writes over
    the whole state, becomes a sum over K of dk's sum over V (computed once), and the
    scalars (beta, the gate, the scale) move out of the reductions."""
    adj = derive_adjoint(ALL["gated_delta_rule"].decl.program)
    red = [n for n in adj.nodes() if n.op in ("contract", "sum")]
    full = [n for n in red if set(n.attr("over")) == {"K", "V"}]
    assert len(full) == 1                      # only the gate's sum dS'' * S is over K and V
    over_v = [n for n in red if n.attr("over") == ("V",)]
    keys = {(tuple(sorted(id(a) for a in n.args)), n.attr("over")) for n in red}
    assert len(keys) == len(red)               # no reduction computed twice
    assert len(over_v) == 3                    # dk's two terms and dq's
    assert not any(a.op == "mul" and not a.dims for n in red for a in n.args)   # no scalar inside


@rk.recurrence
def value_erase(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"], v: rk.Token["V"],
                w: rk.Token["V"]):
    """An erase on the value side: each column reads the sum S w over all columns."""
    S = S - 0.5 * rk.outer(S @ w, w) + rk.outer(k, v)
    return S, q @ S


def test_column_kinds_of_the_gated_delta_rules_adjoint():
    """Gated DeltaNet acts on the key side: its columns (V) separate, every sum over them
    (dq, dk, dbeta, dg) is a sum of the blocks' shares, dv a column value; its rows (K) do
    not (k^T S sums them into what each column's update reads). A value-side erase
    separates along K only."""
    from recurkit.lowering.columns import column_kinds
    p = ALL["gated_delta_rule"].decl.program
    adj = derive_adjoint(p)
    stop = {id(f) for f in adj.feeds}
    leaves = {id(n): "col" for n in (adj.d_new, p.new_state,
                                     next(n for n in p.nodes() if n.role == "state"))}
    leaves[id(adj.d_out)] = "col"
    kinds = column_kinds([p.new_state] + adj.roots(), "V", leaves, stop)
    assert kinds is not None
    names = {id(f): f.attr("name") or "" for f in adj.feeds}
    got = {names.get(id(f), ""): kinds[id(d)] for f, d in zip(adj.feeds, adj.d_feeds)
           if d is not None and f.op == "input"}
    assert got == {"k": "part", "v": "col", "q": "part", "beta": "part"}, got
    assert kinds[id(adj.d_state)] == "col"
    assert column_kinds([p.new_state] + adj.roots(), "K", leaves, stop) is None
    assert column_kinds([value_erase.program.new_state], "V") is None
    assert column_kinds([value_erase.program.new_state], "K") is not None


@rk.recurrence
def projected(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"], v: rk.Token["V"],
              x: rk.Token["V", "D", "R"]):
    """A readout through a per-token [V, D, R] map: the adjoint sums over D and R at each
    column (partial sums kept per lane across two dims, in the kernel's own buffers)."""
    S = S + rk.outer(k, v)
    return S, (q @ S) @ x


BLOCKED = {"K": 4, "V": 6, "D": 6, "R": 3}


WIDE = ["gated_delta_rule", "gla", "kda", "dplr_delta_rule", "hgrn", "gated_scan",
        "reads_old_state", "value_erase", "projected"]
LAYOUTS = {"blocks of 3": (8, BLOCKED, 3),   # narrower than a vector: no lanes
           "blocks of 8, 8 lanes": (8, {**BLOCKED, "V": 16, "D": 16, "R": 16}, 8),
           "blocks of 16, 16 lanes": (16, {**BLOCKED, "V": 32, "D": 32, "R": 16}, 16)}
EXTRA = {"value_erase": value_erase, "projected": projected}


@pytest.mark.parametrize("name,layout", [(n, "blocks of 3") for n in list(BUILTINS) +
                                         list(CUSTOM) + list(EXTRA)] +
                         [(n, lay) for n in WIDE for lay in list(LAYOUTS)[1:]])
def test_the_walk_in_column_blocks(name, layout, monkeypatch):
    """The compiled backward walking the state's last dim in blocks (each block the whole
    sequence, sums over the columns added up block by block) equals the torch step runner;
    declarations that do not separate along it walk the whole state."""
    from recurkit.backends.tvm import adjoint as tvm_adjoint
    lanes, sizes, block = LAYOUTS[layout]
    monkeypatch.setattr(tvm_adjoint, "vector_lanes", lambda: lanes)
    decl = BUILTINS.get(name) or CUSTOM.get(name) or EXTRA[name]
    p = decl.program
    adj = derive_adjoint(p)
    sd = p.state.dims
    gen = tvm_adjoint._AdjGen(adj, {**sizes, "__H": 2}, 16, None, False, block)
    separable = name != "value_erase" and sd and sizes[sd[-1]] > block and \
        sizes[sd[-1]] % block == 0
    assert (gen.L is not None) == bool(separable), name
    if gen.L is not None:
        assert f"for vb in T.serial({sizes[sd[-1]] // block}):" in gen.source()
    a, b, c = runner_and_kernel(decl, sizes, block=block)
    for n in a:
        assert rel(b[n], a[n]) < 1e-5, n
        assert torch.equal(b[n], c[n]), n   # the cached kernel, another derivation


def test_value_erase_gradients_match_the_reference():
    check(value_erase, T=40)
