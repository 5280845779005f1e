"""Recurrences that are not in the library lower to the right form without per-op code."""
import pytest
import torch
import torch.nn.functional as F

import recurkit as rk

THIS = __file__


@rk.recurrence
def erase_other_key(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"],
                    v: rk.Token["V"], e: rk.Token["K"], r: rk.Token["K"], g: rk.Token[()]):
    S = rk.exp(g) * S
    S = S - rk.outer(e, r @ S) + rk.outer(k, v)   # erase along e, read with r: not the write key
    return S, q @ S


@rk.recurrence
def value_gated(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"], v: rk.Token["V"],
                gv: rk.Token["V"]):
    S = rk.exp(gv) * S + rk.outer(k, v)
    return S, q @ S


@rk.recurrence
def two_sided_gate(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"], v: rk.Token["V"],
                   gk: rk.Token["K"], gv: rk.Token["V"], z: rk.Token["V"]):
    S = rk.exp(gk) * (rk.exp(gv) * S) + rk.outer(k, v)
    return S, rk.silu(z) * (q @ S) + v        # a gated readout plus a skip connection


@rk.recurrence
def normalised_beta(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"],
                    v: rk.Token["V"], b: rk.Token[()], dt: rk.Token[()],
                    A_log: rk.Param[()], dt_bias: rk.Param[()]):
    k = rk.l2norm(k)
    beta = rk.sigmoid(b) / (1.0 + k @ k)           # hoisted: depends on tokens only
    g = -rk.exp(A_log) * rk.softplus(dt + dt_bias)  # Mamba-2 style gate from per-head params
    S = rk.exp(g) * S
    S = S + beta * rk.outer(k, v - k @ S)
    return S, q @ S


@rk.recurrence
def signed_scan(h: rk.State["D"], x: rk.Token["D"], a: rk.Token["D"]):
    h = rk.tanh(a) * h + x                         # coefficient of either sign
    return h, h * h                                # any readout of the new state


@rk.recurrence
def trapezoid(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"], v: rk.Token["V"],
              kp: rk.Token["K"], vp: rk.Token["V"], g: rk.Token[()], lam: rk.Token[()]):
    a = rk.exp(g)   # Mamba-3's trapezoidal rule, the previous token's pair given as inputs
    S = a * S + lam * rk.outer(k, v) + (1.0 - lam) * a * rk.outer(kp, vp)
    return S, q @ S


@rk.recurrence
def gated_scan(h: rk.State["D"], x: rk.Token["D"], g: rk.Token[()]):
    h = rk.exp(g) * h + x                          # one gate per token for the whole state
    return h, h


@rk.recurrence
def rank_r_write(S: rk.State["K", "V"], q: rk.Token["K"], kt: rk.Token["K", "R"],
                 vt: rk.Token["R", "V"], g: rk.Token[()]):
    S = rk.exp(g) * S + kt @ vt                    # Mamba-3 MIMO: a rank-R write per token
    return S, q @ S


@rk.recurrence
def nonlinear(h: rk.State["D"], x: rk.Token["D"]):
    h = rk.tanh(h + x)  # MARK-nonlinear
    return h, h


@rk.recurrence
def reads_old_state(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"],
                    v: rk.Token["V"]):
    o = q @ S  # MARK-old
    S = S + rk.outer(k, v)
    return S, o


@rk.recurrence
def raw_decay(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"], v: rk.Token["V"],
              d: rk.Token[()]):
    S = d * S + rk.outer(k, v)                     # d's sign is not known until run time
    return S, q @ S


def line_of(marker):
    with open(THIS) as f:
        return next(i for i, t in enumerate(f, 1) if marker in t and "line_of" not in t)


def draw(decl, T, seed=0, B=2, H=2, sizes=None, positive_d=True):
    gen = torch.Generator().manual_seed(seed)
    sizes = sizes or {"K": 5, "V": 4, "D": 6, "R": 3}
    out = []
    for spec in decl.program.call_inputs:
        shape = ((B, T, H) if spec.role == "token" else (H,)) + tuple(sizes[d] for d in spec.dims)
        x = torch.randn(*shape, generator=gen)
        if spec.name in ("g", "gk", "gv"):
            x = -torch.rand(*shape, generator=gen) * 0.5
        if spec.name in ("e", "r", "k"):
            x = F.normalize(x, dim=-1) * (0.4 if spec.name in ("e", "r") else 1.0)
        if spec.name == "d":
            x = torch.rand(*shape, generator=gen) * 0.9 + 0.05
            if not positive_d:
                x = -x
        out.append(x)
    return out


EXPECTED = {
    erase_other_key: ("rank1", "chunk_wy"),
    value_gated: ("diagonal", "chunk_gated"),
    two_sided_gate: ("diagonal", "chunk_gated"),
    normalised_beta: ("rank1", "chunk_wy"),
    signed_scan: ("elementwise", "scan"),
    trapezoid: ("diagonal", "chunk_gated"),   # two writes
    gated_scan: ("elementwise", "scan"),
    rank_r_write: ("diagonal", "chunk_gated"),   # as R sub-steps a token; the scan is exact too
    nonlinear: ("general", "sequential"),
    reads_old_state: ("general", "sequential"),
    raw_decay: ("diagonal", "chunk_gated"),
}


@pytest.mark.parametrize("decl", list(EXPECTED), ids=lambda d: d.name)
def test_analysis_picks_the_form(decl):
    rec = rk.analyze(decl)
    kind, form = EXPECTED[decl]
    assert (rec.kind, rec.forms[0]) == (kind, form), (rec.kind, rec.forms, rec.reasons)
    assert rec.forms[-1] == "sequential"


def test_erase_with_other_key_is_not_treated_as_a_delta_rule():
    assert rk.analyze(erase_other_key).erase_scale is None
    assert rk.analyze(normalised_beta).erase_scale is not None


def test_sequential_reasons_point_at_the_users_line():
    rec = rk.analyze(nonlinear)
    assert rec.reasons == [f"not linear in the state: the state enters nonlinearly through "
                           f"tanh at {THIS}:{line_of('MARK-nonlinear')}"]
    rec = rk.analyze(reads_old_state)
    assert "reads the state before its update" in rec.reasons[0]
    assert f"{THIS}:{line_of('MARK-old')}" in rec.reasons[0]
    with pytest.raises(rk.LoweringError, match="enters nonlinearly through tanh"):
        rk.lower(nonlinear, form="scan")


@pytest.mark.parametrize("T", [1, 15, 70])
@pytest.mark.parametrize("decl", list(EXPECTED), ids=lambda d: d.name)
def test_every_form_matches_reference(decl, T):
    x = draw(decl, T)
    state = decl.program.state
    sizes = {"K": 5, "V": 4, "D": 6, "R": 3}
    S0 = torch.randn(2, 2, *(sizes[d] for d in state.dims)) * 0.5
    o_ref, S_ref = rk.compile(decl, backend="reference")(*x, initial_state=S0,
                                                          output_final_state=True)
    for form in rk.analyze(decl).forms:
        o, S = rk.compile(decl, backend="torch", form=form, chunk=16)(
            *x, initial_state=S0, output_final_state=True)
        err = max(((o - o_ref).abs().max() / o_ref.abs().max()).item(),
                  ((S - S_ref).abs().max() / S_ref.abs().max()).item())
        assert err < 1e-5, (form, err)


def test_non_positive_decay_falls_back_instead_of_a_wrong_answer():
    x = draw(raw_decay, 40, positive_d=False)
    assert not rk.analyze(raw_decay).gate_positive
    o_ref, S_ref = rk.compile(raw_decay, backend="reference")(*x, output_final_state=True)
    o, S = rk.compile(raw_decay, backend="torch")(*x, output_final_state=True)
    assert torch.allclose(o, o_ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(S, S_ref, rtol=1e-5, atol=1e-6)
