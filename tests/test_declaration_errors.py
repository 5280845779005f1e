"""Refused declarations fail at decoration time with the user's file, line and the fix."""
import math

import pytest
import torch

import recurkit as rk

THIS = __file__


def line_of(marker: str) -> int:
    with open(THIS) as f:
        for i, text in enumerate(f, 1):
            if marker in text and "line_of" not in text:
                return i
    raise AssertionError(marker)


def refused(fn, *, match: str, marker: str | None = None):
    with pytest.raises(rk.DeclarationError, match=match) as info:
        rk.recurrence(fn)
    msg = str(info.value)
    assert THIS in msg
    if marker:
        assert f"{THIS}:{line_of(marker)}:" in msg, msg
    assert "hint:" in msg or info.value.hint is None
    return info.value


def test_contraction_over_dims_that_do_not_match():
    def step(S: rk.State["K", "V"], q: rk.Token["K"], x: rk.Token["D"], v: rk.Token["V"],
             k: rk.Token["K"]):
        S = S + rk.outer(k, v)
        return S, x @ v  # MARK-contract
    e = refused(step, match="share none", marker="MARK-contract")
    assert "rk.outer" in e.hint


def test_outer_of_values_sharing_a_dim():
    def step(S: rk.State["K", "V"], k: rk.Token["K"], v: rk.Token["V"]):
        S = S + rk.outer(k, k)  # MARK-outer
        return S, k @ S
    refused(step, match="share dim 'K'", marker="MARK-outer")


def test_reduction_over_undeclared_dim():
    def step(S: rk.State["K", "V"], k: rk.Token["K"], v: rk.Token["V"]):
        S = S + rk.outer(k, v)
        return S, rk.sum(S, "Z")  # MARK-undeclared
    e = refused(step, match="undeclared dim 'Z'", marker="MARK-undeclared")
    assert "K" in e.hint and "V" in e.hint


def test_reduction_over_dim_the_value_lacks():
    def step(S: rk.State["K", "V"], k: rk.Token["K"], v: rk.Token["V"]):
        S = S + rk.outer(k, v)
        return S, rk.sum(v, "K")  # MARK-lacks
    refused(step, match="over dim 'K', but the value has dims \\[V\\]", marker="MARK-lacks")


def test_returned_state_with_other_dims():
    def step(S: rk.State["K", "V"], k: rk.Token["K"], v: rk.Token["V"]):
        S2 = k @ S  # MARK-state-dims
        return S2, v
    e = refused(step, match=r"returned state has dims \[V\].*rk.State\['K', 'V'\]",
                marker="MARK-state-dims")
    assert "declared dims" in e.hint


def test_state_grown_by_broadcasting_is_refused():
    def step(S: rk.State["K", "V"], k: rk.Token["K"], v: rk.Token["V"], d: rk.Token["D"]):
        S = S * d + rk.outer(k, v)  # MARK-grown
        return S, k @ S
    refused(step, match=r"returned state has dims \[K, V, D\]", marker="MARK-grown")


def test_python_control_flow_on_traced_value():
    def step(S: rk.State["K", "V"], k: rk.Token["K"], v: rk.Token["V"], g: rk.Token[()]):
        if g > 0:  # MARK-if
            S = S + rk.outer(k, v)
        return S, k @ S
    e = refused(step, match="Python control flow", marker="MARK-if")
    assert "rk.where" in e.hint


@pytest.mark.parametrize("which", ["torch", "math", "index", "method", "numpy"])
def test_unsupported_ops(which):
    import numpy as np

    def step(S: rk.State["K", "V"], k: rk.Token["K"], v: rk.Token["V"], g: rk.Token[()]):
        if which == "torch":
            d = torch.exp(g)  # MARK-unsupported-torch
        elif which == "math":
            d = math.exp(g)  # MARK-unsupported-math
        elif which == "index":
            d = k[0]  # MARK-unsupported-index
        elif which == "method":
            d = S.transpose()  # MARK-unsupported-method
        else:
            d = np.exp(g)  # MARK-unsupported-numpy
        S = d * S + rk.outer(k, v)
        return S, k @ S
    e = refused(step, match={"torch": "torch.exp", "math": "Python number", "index": "indexing",
                             "method": "'.transpose'", "numpy": "numpy"}[which],
                marker=f"MARK-unsupported-{which}")
    assert "rk" in e.hint


def test_unannotated_argument():
    def step(S: rk.State["K", "V"], k):  # MARK-annot
        return S, k @ S
    e = refused(step, match="argument 'k' is annotated nothing", marker="MARK-annot")
    assert "rk.Token" in e.hint


def test_state_dim_that_no_input_binds():
    def step(S: rk.State["K", "M"], k: rk.Token["K"]):  # MARK-unbound
        return S, k @ S
    refused(step, match="state dim 'M' appears in no token or param input", marker="MARK-unbound")


def test_wrong_return_structure():
    def step(S: rk.State["K", "V"], k: rk.Token["K"], v: rk.Token["V"]):  # MARK-ret
        return S + rk.outer(k, v)
    refused(step, match=r"must return \(new_state, output\)", marker="MARK-ret")


def test_state_must_come_first_and_be_single():
    def step(k: rk.Token["K"], S: rk.State["K", "V"], v: rk.Token["V"]):  # MARK-first
        return S, k @ S
    refused(step, match="must come first", marker="MARK-first")


def test_reserved_dim_names():
    def step(S: rk.State["H"], x: rk.Token["H"]):  # MARK-reserved
        return S + x, S
    refused(step, match="reserved", marker="MARK-reserved")

    def positions(S: rk.State["i"], x: rk.Token["i"]):  # MARK-position
        return S + x, S
    refused(positions, match="reserved for the positions inside a chunk",
            marker="MARK-position")


def test_bool_arithmetic_is_refused():
    def step(S: rk.State["K", "V"], k: rk.Token["K"], v: rk.Token["V"], g: rk.Token[()]):
        S = (g > 0) * S + rk.outer(k, v)  # MARK-bool
        return S, k @ S
    e = refused(step, match="comparison result", marker="MARK-bool")
    assert "rk.where" in e.hint


def test_python_error_inside_step_points_at_the_line():
    def step(S: rk.State["K", "V"], k: rk.Token["K"], v: rk.Token["V"]):
        S = S + rk.outer(k, v, 3)  # MARK-typeerror
        return S, k @ S
    refused(step, match="TypeError", marker="MARK-typeerror")


def test_scalar_default_with_undeclared_dim():
    def step(S: rk.State["K", "V"], k: rk.Token["K"], v: rk.Token["V"],  # MARK-scalar
             scale: rk.Scalar = rk.dim("Q") ** -0.5):
        return S + rk.outer(k, v), scale * (k @ S)
    refused(step, match="uses dim 'Q'", marker="MARK-scalar")


def test_where_and_comparisons_are_accepted():
    @rk.recurrence
    def clipped(S: rk.State["K", "V"], k: rk.Token["K"], v: rk.Token["V"], g: rk.Token[()]):
        d = rk.where(g < -20.0, 0.0, rk.exp(g))
        S = d * S + rk.outer(k, v)
        return S, k @ S
    assert "where" in str(clipped)
