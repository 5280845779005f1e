"""Binary-coding quantization (ShiftAddLLM's weight format), the quantizer only.

A weight matrix W [out, in] is cut into groups of ``group_size`` consecutive input columns per
row; each group w is approximated by ``sum_{i<q} alpha_i * B_i`` with ``B_i`` in {-1, +1}^g.
``alpha`` is fitted by alternating least squares: given the codes, alpha solves the q x q
normal equations; given alpha, each weight takes the best of the 2^q sign patterns (codeword
search). Each alpha is then rounded to a sum of ``terms`` signed powers of two (so scaling is a
shift) and the codes re-searched for the rounded alphas. ``round_to_nearest`` is the baseline
of the same bit width: asymmetric min-max integer quantization per group.

``bcq_quantize_hessian`` fits the same format to an objective that also weighs the layer's
inputs: ``tr((W - Wq) H' (W - Wq)^T)`` with ``H' = H / mean(diag H) + lam * I``, H the sum of
``x x^T`` over calibration inputs (output-activation error) and ``lam`` the weight of the
weight error (ShiftAddLLM's multi-objective). It quantizes groups of input columns in order,
GPTQ-style: a group's alphas are fitted (as above) to its current, compensated weights, its
columns then take their nearest levels one at a time, and each column's error is carried to
the columns after it through the Cholesky factor of ``H'^-1``.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import torch


@dataclass(frozen=True)
class BCQWeight:
    """A quantized [out, in] weight: ``codes`` [q, out, in] in {-1, +1} (int8) and ``alpha``
    [q, out, in // group_size] (fp32, already rounded to sums of powers of two when
    ``terms`` > 0)."""

    codes: torch.Tensor
    alpha: torch.Tensor
    group_size: int
    terms: int

    @property
    def bits(self) -> int:
        return self.codes.shape[0]

    def dequantize(self) -> torch.Tensor:
        q, out, n = self.codes.shape
        a = self.alpha.repeat_interleave(self.group_size, dim=-1)       # [q, out, in]
        return (a * self.codes.float()).sum(0)

    def packed_bytes(self) -> int:
        """Storage of the packed format: one bit per code, and per alpha ``terms`` (sign,
        exponent) byte pairs (4 bytes of fp32 when not rounded)."""
        q, out, n = self.codes.shape
        per_alpha = 2 * self.terms if self.terms else 4
        return q * out * n // 8 + self.alpha.numel() * per_alpha


def _check(W: torch.Tensor, bits: int, group_size: int) -> None:
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        got = tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
        raise ValueError(f"expected a 2-D weight [out, in], got {got}")
    if not W.is_floating_point():
        raise ValueError(f"expected a float weight, got {W.dtype}")
    if bits not in (1, 2, 3, 4):
        raise ValueError(f"bits must be 1, 2, 3 or 4, got {bits}")
    if group_size < 8 or group_size % 8:
        raise ValueError(f"group_size must be a positive multiple of 8, got {group_size}")
    if W.shape[1] % group_size:
        raise ValueError(f"the weight's input dim ({W.shape[1]}) is not a multiple of "
                         f"group_size ({group_size})")


def _search(w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Best sign pattern per weight: w [G, g], alpha [G, q] -> codes [G, q, g]."""
    q = alpha.shape[1]
    patterns = torch.tensor(list(product((-1.0, 1.0), repeat=q)), dtype=w.dtype)   # [P, q]
    levels = alpha @ patterns.T                                                    # [G, P]
    best = (w[:, :, None] - levels[:, None, :]).abs().argmin(-1)                   # [G, g]
    return patterns[best].permute(0, 2, 1)                                         # [G, q, g]


def _fit_alpha(w: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Least-squares alpha for codes B [G, q, g]: solves (B B^T) alpha = B w per group."""
    q = B.shape[1]
    A = B @ B.transpose(1, 2) + 1e-6 * torch.eye(q, dtype=w.dtype)
    return torch.linalg.solve(A, (B @ w[:, :, None]))[..., 0]


def round_pow2(alpha: torch.Tensor, terms: int) -> torch.Tensor:
    """Each value as the sum of ``terms`` signed powers of two, chosen greedily (nearest in
    the log domain, then the remainder)."""
    out = torch.zeros_like(alpha)
    rest = alpha.clone()
    for _ in range(terms):
        mag = rest.abs()
        e = torch.round(torch.log2(mag.clamp_min(1e-30)))
        t = torch.where(mag > 0, torch.sign(rest) * torch.exp2(e), torch.zeros_like(rest))
        out += t
        rest -= t
    return out


def bcq_quantize(W: torch.Tensor, bits: int = 3, group_size: int = 128, iters: int = 15,
                 terms: int = 2) -> BCQWeight:
    """Quantize ``W`` [out, in] to ``bits`` binary codes per weight (see the module doc).
    ``terms``: powers of two per alpha (0 keeps fp32 alphas)."""
    _check(W, bits, group_size)
    out, n = W.shape
    w = W.detach().to(torch.float64).reshape(-1, group_size)                 # [G, g]
    B = torch.empty(w.shape[0], bits, group_size, dtype=w.dtype)
    alpha = torch.empty(w.shape[0], bits, dtype=w.dtype)
    r = w.clone()
    for i in range(bits):   # greedy start: residual signs and their mean magnitudes
        B[:, i] = torch.where(r >= 0, 1.0, -1.0)
        alpha[:, i] = r.abs().mean(-1)
        r -= alpha[:, i:i + 1] * B[:, i]
    for _ in range(iters):
        alpha = _fit_alpha(w, B)
        B = _search(w, alpha)
    if terms:
        alpha = round_pow2(alpha, terms)
        B = _search(w, alpha)
    codes = B.reshape(out, n // group_size, bits, group_size).permute(2, 0, 1, 3)
    return BCQWeight(codes.reshape(bits, out, n).to(torch.int8),
                     alpha.reshape(out, n // group_size, bits).permute(2, 0, 1).float()
                     .contiguous(), group_size, terms)


def bcq_quantize_hessian(W: torch.Tensor, H: torch.Tensor, bits: int = 3,
                         group_size: int = 128, lam: float = 0.01, iters: int = 15,
                         terms: int = 2) -> BCQWeight:
    """Quantize ``W`` [out, in] for the objective ``tr(E H' E^T)``, ``E = W - Wq``,
    ``H' = H / mean(diag H) + lam * I`` (see the module doc); ``H`` [in, in] symmetric
    positive semi-definite (``sum x x^T``), ``lam`` > 0."""
    _check(W, bits, group_size)
    out, n = W.shape
    if tuple(H.shape) != (n, n):
        raise ValueError(f"H must be [{n}, {n}] for a weight [{out}, {n}], got {tuple(H.shape)}")
    if not lam > 0:
        raise ValueError(f"lam (the weight error's weight) must be > 0, got {lam}")
    Hd = H.detach().to(torch.float64).cpu()
    scale = Hd.diagonal().mean()
    Hd = (Hd / scale if scale > 0 else torch.zeros_like(Hd)) + lam * torch.eye(n, dtype=Hd.dtype)
    # U: upper Cholesky factor of H'^-1 (GPTQ's form of the error feedback)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
    w = W.detach().to(torch.float64).cpu().clone()
    patterns = torch.tensor(list(product((-1.0, 1.0), repeat=bits)), dtype=w.dtype)  # [P, q]
    codes = torch.empty(bits, out, n, dtype=torch.int8)
    alphas = torch.empty(bits, out, n // group_size, dtype=torch.float32)
    for g in range(n // group_size):
        lo, hi = g * group_size, (g + 1) * group_size
        a = bcq_quantize(w[:, lo:hi], bits, group_size, iters, terms).alpha[:, :, 0]  # [q, out]
        alphas[:, :, g] = a
        levels = a.T.double() @ patterns.T                                            # [out, P]
        err = torch.empty(out, group_size, dtype=w.dtype)
        for j in range(lo, hi):
            col = w[:, j]
            best = (col[:, None] - levels).abs().argmin(1)
            codes[:, :, j] = patterns[best].T.to(torch.int8)
            e = (col - levels.gather(1, best[:, None])[:, 0]) / U[j, j]
            w[:, j + 1:hi] -= e[:, None] * U[j, j + 1:hi]
            err[:, j - lo] = e
        w[:, hi:] -= err @ U[lo:hi, hi:]
    return BCQWeight(codes, alphas, group_size, terms)


def round_to_nearest(W: torch.Tensor, bits: int = 3, group_size: int = 128) -> torch.Tensor:
    """The dequantized weight of asymmetric min-max integer quantization per group."""
    _check(W, bits, group_size)
    w = W.detach().float().reshape(-1, group_size)
    lo, hi = w.min(-1, keepdim=True).values, w.max(-1, keepdim=True).values
    scale = ((hi - lo) / (2 ** bits - 1)).clamp_min(1e-12)
    qv = torch.clamp(torch.round((w - lo) / scale), 0, 2 ** bits - 1)
    return (qv * scale + lo).reshape(W.shape)


def quantization_report(W: torch.Tensor, bits_list=(2, 3, 4), group_size: int = 128,
                        terms: int = 2) -> list[dict]:
    """Relative Frobenius reconstruction error per bit width: BCQ with power-of-two alphas,
    BCQ with fp32 alphas, and round-to-nearest integer quantization."""
    rows = []
    norm = W.float().norm()
    for bits in bits_list:
        q2 = bcq_quantize(W, bits, group_size, terms=terms)
        qf = bcq_quantize(W, bits, group_size, terms=0)
        rows.append({"bits": bits,
                     "bcq_pow2": ((q2.dequantize() - W.float()).norm() / norm).item(),
                     "bcq_fp32_alpha": ((qf.dequantize() - W.float()).norm() / norm).item(),
                     "rtn": ((round_to_nearest(W, bits, group_size) - W.float()).norm()
                             / norm).item(),
                     "packed_bytes": q2.packed_bytes()})
    return rows
