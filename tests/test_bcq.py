"""The binary-coding (ShiftAddLLM) quantizer: format, optimality of the code search, error
against round-to-nearest at the same bits, and refusals."""
from itertools import product

import pytest
import torch

from recurkit.nn.bcq import (_search, bcq_quantize, quantization_report, round_pow2,
                             round_to_nearest)


def weight(out=64, n=256, seed=0):
    return torch.randn(out, n, generator=torch.Generator().manual_seed(seed)) * 0.02


def test_format_codes_alphas_and_bytes():
    W = weight()
    q = bcq_quantize(W, bits=3, group_size=128)
    assert q.codes.shape == (3, 64, 256) and q.alpha.shape == (3, 64, 2)
    assert set(q.codes.unique().tolist()) <= {-1, 1}
    assert torch.equal(round_pow2(q.alpha, 2), q.alpha)    # each a sum of two powers of two
    assert q.dequantize().shape == W.shape
    assert q.packed_bytes() == 3 * 64 * 256 // 8 + 3 * 64 * 2 * 2 * 2
    assert q.packed_bytes() < W.numel() * 4 / 8


def test_code_search_is_optimal_for_given_alphas():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 8, generator=g, dtype=torch.float64)
    alpha = torch.rand(5, 3, generator=g, dtype=torch.float64)
    B = _search(w, alpha)
    err = (w - (alpha[:, :, None] * B).sum(1)).square().sum(-1)
    for gi in range(5):
        best = sum(min((w[gi, j] - sum(a * s for a, s in zip(alpha[gi], signs))) ** 2
                       for signs in product((-1, 1), repeat=3)) for j in range(8))
        assert abs(err[gi].item() - best.item()) < 1e-12


def test_error_falls_with_bits_and_beats_round_to_nearest_at_low_bits():
    rows = quantization_report(weight(128, 512), bits_list=(2, 3, 4))
    errs = [r["bcq_pow2"] for r in rows]
    assert errs[0] > errs[1] > errs[2]
    for r in rows:
        assert r["bcq_fp32_alpha"] <= r["bcq_pow2"] + 1e-6   # rounding costs a little
    assert rows[0]["bcq_pow2"] < rows[0]["rtn"] and rows[1]["bcq_pow2"] < rows[1]["rtn"]


def test_round_to_nearest_is_exact_on_its_own_grid():
    W = torch.arange(16.0).repeat(4, 8)    # 16 levels per group of 128: exact at 4 bits
    torch.testing.assert_close(round_to_nearest(W, 4, 128), W)


def test_refusals():
    with pytest.raises(ValueError, match=r"input dim \(200\) is not a multiple of group_size"):
        bcq_quantize(torch.randn(4, 200), 3, 128)
    with pytest.raises(ValueError, match="expected a float weight"):
        bcq_quantize(torch.ones(4, 128, dtype=torch.int32), 3, 128)
    with pytest.raises(ValueError, match=r"expected a 2-D weight"):
        bcq_quantize(torch.randn(4, 128, 2), 3, 128)
    with pytest.raises(ValueError, match="bits must be"):
        bcq_quantize(torch.randn(4, 128), 5, 128)
