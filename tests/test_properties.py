"""Hypothesis: random shapes, dim names and varlen splits."""
import string

import torch
from hypothesis import given, settings, strategies as st

import recurkit as rk
from cases import CASES, call_loop, call_op, matrix_inputs

SETTINGS = settings(max_examples=15, deadline=None)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@SETTINGS
@given(name=st.sampled_from(sorted(CASES)), B=st.integers(1, 3), T=st.integers(1, 40),
       H=st.integers(1, 3), K=st.integers(1, 9), V=st.integers(1, 9), seed=st.integers(0, 99))
def test_builtins_match_loops_on_random_shapes(name, B, T, H, K, V, seed):
    x = matrix_inputs(name, B, T, H, K, V, seed=seed)
    o, S = call_op(name, x, output_final_state=True)
    o_ref, S_ref = call_loop(name, x)
    assert rel(o, o_ref) < 1e-4 and rel(S, S_ref) < 1e-4


dim_names = st.text(string.ascii_letters, min_size=1, max_size=4).filter(
    lambda s: s not in ("B", "T", "H", "N", "i", "j"))   # reserved: refused by the verifier


@rk.recurrence
def kda_unscaled(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"], v: rk.Token["V"],
                 g: rk.Token["K"], beta: rk.Token[()]):
    S = rk.exp(g) * S
    S = S + beta * rk.outer(k, v - k @ S)
    return S, q @ S


@SETTINGS
@given(names=st.lists(dim_names, min_size=2, max_size=2, unique=True), K=st.integers(1, 6),
       V=st.integers(1, 6), T=st.integers(1, 20))
def test_dim_names_do_not_change_meaning(names, K, V, T):
    dk, dv = names

    def step(S: rk.State[dk, dv], q: rk.Token[dk], k: rk.Token[dk], v: rk.Token[dv],
             g: rk.Token[dk], beta: rk.Token[()]):
        S = rk.exp(g) * S
        S = S + beta * rk.outer(k, v - k @ S)
        return S, q @ S
    decl = rk.recurrence(step)
    assert decl.content_hash() == kda_unscaled.content_hash()
    x = matrix_inputs("kda", 1, T, 2, K, V)
    o, S = rk.compile(decl)(*x, output_final_state=True)
    o_ref, S_ref = call_loop("kda", x)
    assert rel(o * K ** -0.5, o_ref) < 1e-4 and rel(S, S_ref) < 1e-4


@SETTINGS
@given(lens=st.lists(st.integers(0, 12), min_size=1, max_size=5).filter(lambda l: sum(l) > 0),
       name=st.sampled_from(["gla", "gated_delta_rule", "dplr_delta_rule"]))
def test_varlen_matches_segments(lens, name):
    T = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    x = matrix_inputs(name, 1, T, 2, 3, 4)
    o, S = call_op(name, x, output_final_state=True, cu_seqlens=cu)
    for n in range(len(lens)):
        s, e = cu[n].item(), cu[n + 1].item()
        if s == e:
            assert S[n].abs().max() == 0
            continue
        o_n, S_n = call_loop(name, [t[:, s:e] for t in x])
        assert rel(o[:, s:e], o_n) < 1e-4 and rel(S[n:n + 1], S_n) < 1e-4
