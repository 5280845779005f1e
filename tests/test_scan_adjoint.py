"""The scan form's backward (backends/shared/scan_backward.py): the reverse scan of the
states' cotangents, in torch (the oracle) and Triton (its interpreter on CPU tensors), against
autograd through the reference interpreter: every declaration with a scan form, odd lengths,
varlen with empty and length-1 segments, initial and final states, signed multipliers, decays
near 1, 16-bit inputs; gates over fewer dims than the state (one per token), states of two
dims (a rank-R write)."""
import pytest
import torch

from recurkit.lowering.analysis import analyze
from test_adjoint import BUILTINS, CUSTOM
from test_chunk_adjoint import VARLEN, check

SCANNED = {n: d for n, d in {**BUILTINS, **CUSTOM}.items() if "scan" in analyze(d.program).forms}


@pytest.fixture
def scan_calls(monkeypatch):
    """The calls the scan-form backward made the gradients of."""
    import recurkit.backends.shared.scan_backward as sb
    calls, orig = [], sb.scan_backward

    def spy(bc, *a, **k):
        calls.append(bc.program.name)
        return orig(bc, *a, **k)
    monkeypatch.setattr(sb, "scan_backward", spy)
    return calls


def test_the_scan_declarations_are_covered():
    assert {"hgrn", "min_gru", "signed_scan", "gated_scan", "rank_r_write"} <= set(SCANNED)


@pytest.mark.parametrize("name", list(SCANNED))
def test_torch_scan_backward_matches_autograd_through_the_reference(name, scan_calls):
    decl = SCANNED[name]
    check(decl, T=1, S0=False, form="scan")
    check(decl, T=63, form="scan")
    check(decl, T=100, cu=VARLEN, form="scan")
    check(decl, T=40, B=2, form="scan")
    assert scan_calls == [decl.program.name] * 4


@pytest.mark.parametrize("name", ["hgrn", "signed_scan", "rank_r_write"])
def test_decays_near_one_and_half_inputs(name):
    check(SCANNED[name], T=100, gate=(-1e-6, -1e-7), form="scan")
    check(SCANNED[name], T=40, dtype=torch.bfloat16, tol=1e-2, form="scan")


@pytest.mark.parametrize("name", ["hgrn", "signed_scan", "linear_attn_normalizer", "gated_scan",
                                  "rank_r_write"])   # a matrix state: scanned as K * V entries
def test_triton_scan_backward_in_the_interpreter(name, scan_calls):
    decl = SCANNED[name]
    check(decl, T=33, backend="triton", form="scan")
    check(decl, T=40, backend="triton", cu=[0, 0, 1, 17, 40], form="scan")
    assert scan_calls == [decl.program.name] * 2
