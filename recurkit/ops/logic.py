"""Logic-gate layers (difflogic) as a tiled declaration.

Each output neuron o reads inputs a = x[ia[o]] and b = x[ib[o]] and mixes the 16 two-input
gates; every relaxed gate is k0 + k1 a + k2 b + k3 ab, so the layer is that bilinear form with
per-neuron coefficients k = softmax(z) @ GATE_COEFFS (``recurkit.lowering.packed``). The
coefficients are the op's weights, so its generated backward gives dk as four reductions per
neuron and dx through the inverse index of (ia, ib). ``group_sum`` is GroupSum (a reduction
over each class's group, divided by the temperature).
"""
from __future__ import annotations

from ..ir import Index, Row, Scalar, Weight, tiled
from ..ir.dsl import gather, sum as rk_sum


@tiled
def logic_layer(x: Row["I"], ia: Index["O"], ib: Index["O"], k0: Weight["O"],
                k1: Weight["O"], k2: Weight["O"], k3: Weight["O"]):
    """y[n, o] = k0 + k1 a + k2 b + k3 a b with a = x[n, ia[o]], b = x[n, ib[o]]."""
    a = gather(x, ia)
    b = gather(x, ib)
    return k0 + k1 * a + k2 * b + k3 * a * b


@tiled
def group_sum(x: Row["C", "G"], tau: Scalar = 1.0):
    """difflogic's GroupSum: y[n, c] = sum_g x[n, c, g] / tau."""
    return rk_sum(x, "G") / tau
