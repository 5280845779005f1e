"""Shift-add matmul (ShiftAddLLM) as a tiled declaration: binary-coded weights, look-ups.

The weight ``W[o, g*E + e] = sum_q alpha[g, o, q] * codes[g, o, q, e]`` (codes in {-1, +1},
alpha rounded to sums of signed powers of two by ``recurkit.nn.bcq``) is never formed: the
LUT form (``recurkit.lowering.lut``) builds, per 8 inputs, the 256 signed sums once and answers
each code byte with one look-up. Layouts: ``x`` [N, G, E] (the input [N, K] viewed with
K = G * E), ``codes`` uint8 [G, O, Q, E // 8] (group-major, so a kernel streams one group's
codes for every output while that group's tables stay in cache), ``alpha`` [G, O, Q].
"""
from __future__ import annotations

from ..ir import Bits, Row, Weight, tiled
from ..ir.dsl import sum as rk_sum


@tiled
def shift_add(x: Row["G", "E"], codes: Bits["G", "O", "Q", "E"], alpha: Weight["G", "O", "Q"]):
    """y[n, o] = sum_{q, g} alpha[g, o, q] * sum_e codes[g, o, q, e] * x[n, g, e]."""
    return rk_sum(alpha * rk_sum(codes * x, "E"), ("Q", "G"))
