"""Differential fuzzing: random declarations (``fuzz_decls``) on every backend and every exact
form the analysis gives them, forward (output and final state, with an initial state, some
calls varlen) and gradients of every input and of the initial state, against the reference
interpreter (and autograd through it). A small budget runs by default (8 examples a test, 3
for the Triton gradients, seeded); ``-m slow`` runs 2,000 more on torch and TVM and 200 in
Triton's interpreter (forward and gradients), and RECURKIT_FUZZ_EXAMPLES=n sets every budget
to n (unseeded). Hypothesis prints a failing example (its step's source, length, seed, dims)
and the assertion the declaration's source; ``print_blob`` gives the line that replays it."""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import recurkit as rk
from fuzz_decls import SIZES, declaration, inputs, matrix_step, paired, sizes, vector_step

BUDGET = int(os.environ.get("RECURKIT_FUZZ_EXAMPLES", "0"))
QUICK = settings(max_examples=BUDGET or 8, deadline=None, derandomize=not BUDGET,
                 print_blob=True, suppress_health_check=[HealthCheck.too_slow])
LONG = settings(max_examples=BUDGET or 2000, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow])
steps = st.one_of(matrix_step(), matrix_step(), vector_step())


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


def call(op, xs, S0, cu):
    return op(**xs, initial_state=S0, output_final_state=True, cu_seqlens=cu)


def grads(op, xs, S0, cu, seed=7):
    leaves = {n: x.clone().requires_grad_() for n, x in xs.items()}
    s0 = S0.clone().requires_grad_()
    o, S = call(op, leaves, s0, cu)
    gen = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=gen)).sum() + \
        (S * torch.randn(S.shape, generator=gen)).sum()
    loss.backward()
    return {**{n: t.grad for n, t in leaves.items()}, "initial_state": s0.grad}


def check(body, T, varlen, seed, backends=("torch", "tvm", "triton"), grad=True, dims=None,
          grouped=False):
    decl, src = declaration(body)
    forms = rk.analyze(decl).forms
    dims = paired(decl, dims or SIZES)
    xs = inputs(decl, T, seed=seed, sizes=dims, grouped=grouped)
    cu = None
    if varlen and T >= 3:   # an empty and a length-1 segment among them
        cu = torch.tensor([0, 0, 1, T // 2, T])
    N = 1 if cu is None else len(cu) - 1
    sd = decl.program.state.dims
    S0 = torch.randn(N, 2, *(dims[d] for d in sd), generator=torch.Generator().manual_seed(
        seed + 1)) * 0.5
    o_ref, S_ref = call(rk.compile(decl, backend="reference"), xs, S0, cu)
    for b in backends:
        for form in forms:
            if b == "triton" and form.startswith("chunk") and T > 40:
                continue   # the interpreter's chunk kernels are slow; short calls cover them
            o, S = call(rk.compile(decl, backend=b, form=form, chunk=16), xs, S0, cu)
            e = max(rel(o, o_ref), rel(S, S_ref))
            assert e < 1e-4, (b, form, e, src)
    if not grad:
        return
    want = grads(rk.compile(decl, backend="reference"), xs, S0, cu)
    ops = {"auto": rk.compile(decl)}   # on CPU: the generated sequential adjoint (TVM)
    if any(f.startswith("chunk") for f in forms):
        ops["chunk"] = rk.compile(decl, backward="chunk")   # the chunk-form backward, torch
    if "triton" in backends and T <= 40:   # Triton's forward and backward, in the interpreter
        ops["triton"] = rk.compile(decl, backend="triton")
    # errors relative to the largest gradient: one that is zero in exact arithmetic (a key
    # normalised over a dim of size 1) is rounding noise in both
    scale = max(w.abs().max().item() for w in want.values() if w is not None)
    for mode, op in ops.items():
        got = grads(op, xs, S0, cu)
        for n, w in want.items():
            if w is None:
                continue
            assert got[n] is not None, (mode, n, src)
            e = (got[n] - w).abs().max().item() / max(scale, 1e-6)
            assert e < 1e-4, (mode, n, e, src)


@QUICK
@given(body=steps, T=st.integers(1, 40), varlen=st.booleans(), seed=st.integers(0, 99),
       dims=sizes, grouped=st.booleans())
def test_random_declarations_match_the_reference(body, T, varlen, seed, dims, grouped):
    check(body, T, varlen, seed, backends=("torch", "tvm"), dims=dims, grouped=grouped)


@QUICK
@given(body=steps, T=st.integers(1, 20), seed=st.integers(0, 99), dims=sizes)
def test_random_declarations_in_the_triton_interpreter(body, T, seed, dims):
    check(body, T, False, seed, backends=("triton",), grad=False, dims=dims)


@settings(max_examples=BUDGET or 3, deadline=None, derandomize=not BUDGET,
          suppress_health_check=[HealthCheck.too_slow])
@given(body=steps, T=st.integers(1, 12), seed=st.integers(0, 99))
def test_random_declarations_triton_gradients(body, T, seed):
    check(body, T, False, seed, backends=("triton",))


@pytest.mark.slow
@LONG
@given(body=steps, T=st.integers(1, 100), varlen=st.booleans(), seed=st.integers(0, 999),
       dims=sizes, grouped=st.booleans())
def test_random_declarations_long(body, T, varlen, seed, dims, grouped):
    check(body, T, varlen, seed, backends=("torch", "tvm"), dims=dims, grouped=grouped)


@pytest.mark.slow
@settings(max_examples=BUDGET or 200, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(body=steps, T=st.integers(1, 24), varlen=st.booleans(), seed=st.integers(0, 999),
       dims=sizes, grouped=st.booleans())
def test_random_declarations_long_in_the_triton_interpreter(body, T, varlen, seed, dims,
                                                              grouped):
    check(body, T, varlen, seed, backends=("triton",), dims=dims, grouped=grouped)
