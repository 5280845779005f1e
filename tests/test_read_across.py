"""Erases along the value dim with the readout over the key (``S - b (S w) w^T``, ``o = S^T
q``): the WY form with its outputs read across the erase (``forms._read_across``), forward
and gradients on every backend against the reference interpreter."""
import pytest
import torch
import torch.nn.functional as F

import recurkit as rk
from test_substeps import call, forward_matches, gradients_match, lengths, rel


@rk.recurrence
def value_erase(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"], v: rk.Token["V"],
                w: rk.Token["V"], b: rk.Token[()], g: rk.Token[()]):
    S = rk.exp(g) * S
    S = S - b * rk.outer(S @ w, w)   # erase along V
    S = S + rk.outer(k, v)
    return S, q @ S                  # read along K


@rk.recurrence
def value_delta(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"], v: rk.Token["V"],
                b: rk.Token[()], gv: rk.Token["V"], z: rk.Token["V"]):
    S = rk.exp(gv) * S                 # a per-value gate, along the erase
    S = S + b * rk.outer(k - S @ v, v)   # the delta rule, transposed
    return S, rk.silu(z) * (q @ S) + v


@rk.recurrence
def value_erase_twice(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"],
                      v: rk.Token["V"], w1: rk.Token["V"], w2: rk.Token["V"],
                      b: rk.Token[()]):
    S = S - b * rk.outer(S @ w1, w1)
    S = S - 0.5 * rk.outer(S @ w2, w2) + rk.outer(k, v)   # two erases: sub-steps
    return S, q @ S


DECLS = {d.name: d for d in (value_erase, value_delta, value_erase_twice)}
SIZES = {"K": 6, "V": 5}


def inputs(decl, B, T, H=2, seed=0, gate=(-0.5, -0.02)):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for s in decl.program.call_inputs:
        x = torch.randn(B, T, H, *(SIZES[d] for d in s.dims), generator=gen)
        if s.name.startswith("g"):
            x = gate[0] + (gate[1] - gate[0]) * torch.rand(x.shape, generator=gen)
        elif s.name in ("w", "w1", "w2", "v", "k"):
            x = F.normalize(x, dim=-1)
        elif s.name == "b":
            x = torch.rand(x.shape, generator=gen)
        out[s.name] = x
    return out


def test_the_analysis_reads_across_the_erase():
    for name, decl in DECLS.items():
        rec = rk.analyze(decl)
        assert rec.forms[0] == "chunk_wy" and rec.read_across, name
        assert (rec.kdim, rec.vdim) == ("V", "K"), name
    assert rk.analyze(value_delta).erase_scale is not None   # the delta rule's fast path
    assert rk.analyze(value_erase_twice).expansion is not None


@pytest.mark.parametrize("name", sorted(DECLS))
@pytest.mark.parametrize("backend,T,varlen", lengths(21))
def test_read_across_matches_the_reference(name, backend, T, varlen):
    decl = DECLS[name]
    xs, S0, cu = forward_matches(decl, backend, "chunk_wy", T, varlen, inputs, SIZES)
    if T <= 63 or backend == "torch":   # the sequential adjoint (the chunk-form backward
        gradients_match(decl, backend, "chunk_wy", xs, S0, cu)   # refuses this form)


@pytest.mark.parametrize("gate", [(-30.0, -20.0), (-1e-6, -1e-7)])
def test_extreme_gates(gate):
    xs = inputs(value_delta, 2, 70, gate=gate)
    want = call(rk.compile(value_delta, backend="reference"), xs, None, None)
    got = call(rk.compile(value_delta, backend="torch", chunk=32), xs, None, None)
    assert rel(got[0], want[0]) < 1e-5 and rel(got[1], want[1]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    xs = inputs(value_erase, 2, 40)
    want = call(rk.compile(value_erase, backend="reference"), xs, None, None)
    half = {k: v.to(dtype) for k, v in xs.items()}
    for b in ("torch", "tvm"):
        o, S = call(rk.compile(value_erase, backend=b, form="chunk_wy"), half, None, None)
        assert o.dtype == dtype and rel(o, want[0]) < 2e-2 and rel(S, want[1]) < 2e-2
