"""Bad calls fail before any kernel runs, naming the argument, the expectation and the value."""
import pytest
import torch

import recurkit as rk

B, T, H, K, V = 1, 8, 2, 4, 3
gdn = rk.compile(rk.ops.gated_delta_rule.decl)


def args(**over):
    a = dict(q=torch.randn(B, T, H, K), k=torch.randn(B, T, H, K), v=torch.randn(B, T, H, V),
             g=-torch.rand(B, T, H), beta=torch.rand(B, T, H))
    a.update(over)
    return a


@pytest.mark.parametrize("over,pattern", [
    (dict(v=torch.randn(B, T, H)), r"argument 'v': expected 4 dims laid out \[B, T, H, V\], "
                                   r"got shape \(1, 8, 2\)"),
    (dict(k=torch.randn(B, T, H, K + 1)), r"argument 'k': dim K \(axis 3 of \[B, T, H, K\]\) is "
                                          r"5, but 'q' bound K = 4"),
    (dict(g=-torch.rand(B, T + 1, H)), r"argument 'g': T \(axis 1 of \[B, T, H\]\) is 9, but "
                                       r"'q' has T = 8"),
    (dict(beta=torch.rand(B, T, H).double()), r"argument 'beta': expected dtype float32, "
                                              r"float16 or bfloat16, got torch.float64"),
    (dict(q=torch.randint(0, 3, (B, T, H, K))), r"argument 'q': expected dtype"),
    (dict(v=[[1.0]]), r"argument 'v': expected a torch.Tensor laid out \[B, T, H, V\], got list"),
    (dict(v=None), r"missing required argument 'v'"),
    (dict(q=torch.randn(B, 0, H, K), k=torch.randn(B, 0, H, K), v=torch.randn(B, 0, H, V),
          g=torch.randn(B, 0, H), beta=torch.randn(B, 0, H)), r"T = 0"),
])
def test_bad_tensor(over, pattern):
    with pytest.raises(rk.CallError, match=pattern):
        gdn(**args(**over))


def test_device_mismatch_is_named():
    a = args(v=torch.randn(B, T, H, V, device="meta"))
    with pytest.raises(rk.CallError, match=r"argument 'v': expected device cpu.*got meta"):
        gdn(**a)


def test_initial_state_shape_and_dtype():
    with pytest.raises(rk.CallError, match=r"'initial_state': expected shape \(1, 2, 4, 3\) "
                                           r"laid out \[N, H, K, V\] \(N = B\), got \(1, 2, 3, 4\)"):
        gdn(**args(), initial_state=torch.zeros(1, H, V, K))
    with pytest.raises(rk.CallError, match=r"'initial_state': expected dtype"):
        gdn(**args(), initial_state=torch.zeros(1, H, K, V, dtype=torch.int64))


@pytest.mark.parametrize("cu,pattern", [
    (torch.tensor([0, 5, 3, 8]), r"non-decreasing, but cu_seqlens\[2\] = 3 < cu_seqlens\[1\] = 5"),
    (torch.tensor([0, 5, 7]), r"must end at T = 8, got 7"),
    (torch.tensor([1, 5, 8]), r"must start at 0, got 1"),
    (torch.tensor([0.0, 8.0]), r"1-D int32/int64 tensor"),
    (torch.tensor([8]), r"at least 2 offsets"),
])
def test_bad_cu_seqlens(cu, pattern):
    with pytest.raises(rk.CallError, match=r"argument 'cu_seqlens': .*" + pattern):
        gdn(**args(), cu_seqlens=cu)


def test_varlen_needs_batch_one_and_state_per_sequence():
    with pytest.raises(rk.CallError, match=r"B = 1, got B = 2"):
        a = {n: torch.cat([t, t]) for n, t in args().items()}
        gdn(**a, cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(rk.CallError, match=r"expected shape \(2, 2, 4, 3\).*N = len\(cu_seqlens\) - 1"):
        gdn(**args(), cu_seqlens=torch.tensor([0, 3, 8]), initial_state=torch.zeros(1, H, K, V))


def test_argument_binding_errors():
    a = args()
    with pytest.raises(rk.CallError, match="unexpected argument 'gamma'"):
        gdn(**a, gamma=1.0)
    with pytest.raises(rk.CallError, match="argument 'q' twice"):
        gdn(a["q"], q=a["q"], k=a["k"], v=a["v"], g=a["g"], beta=a["beta"])
    with pytest.raises(rk.CallError, match="takes at most 9 arguments"):
        gdn(*a.values(), None, None, False, None, None)
    with pytest.raises(rk.CallError, match="'scale': expected a finite number, got nan"):
        gdn(**a, scale=float("nan"))
    with pytest.raises(rk.CallError, match="'output_final_state': expected a bool"):
        gdn(**a, output_final_state="yes")


def test_builtin_flag_type_checked():
    with pytest.raises(rk.CallError, match="'use_qk_l2norm_in_kernel': expected a bool"):
        rk.ops.gated_delta_rule(*args().values(), use_qk_l2norm_in_kernel="no")


def test_unknown_backends():
    with pytest.raises(ValueError, match="unknown backend 'cuda'; choose one of auto, "
                                         "reference, torch, tvm, triton"):
        rk.compile(rk.ops.gla.decl, backend="cuda")
    with pytest.raises(TypeError, match="expected an @rk.recurrence declaration"):
        rk.compile(lambda x: x)
