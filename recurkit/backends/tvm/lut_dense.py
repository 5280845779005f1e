"""The LUT form's dense-weight kernels (TVM, CPU): for large batches and for the backward.

Look-ups repeat per sample, so from ``tvm.lut.dense_from()`` samples on a matmul with the dense
weight is cheaper. ``dequant_source`` builds rows of that weight from the codes, a block of
rows at a time (``DENSE_BLOCK`` bytes, at least 8 rows, in a reused scratch: no fresh pages
per call), and the
host multiplies each block as it is built. The backward uses the same blocks for the row's
gradient (dx += dy[:, block] D_block) and, for the scale's, forms P = dy[:, block]^T x and
reduces it against the signs with ``sdot_source`` (dS[g, o, q] = sum_e c P), so no
unpacked sign tensor (4 bytes per code) is ever built. Both need codes laid out (group, out,
plane, packed).
"""
from __future__ import annotations

import torch

from ...ir.tiled import TiledCall
from ...lowering.lut import LutPlan
from ..torch.lut import dims_of, lut_grads_torch, needs, weight_grads
from .lut import (_compiled, _operands, _scratch, _sel, canonical_codes, plan_sizes,
                      row_order, scale_order)

DENSE_BLOCK = 4 << 20   # bytes of the dense weight built (and multiplied) at a time


def dequant_source(plan: LutPlan, sizes: dict[str, int]) -> str:
    """Rows o0 .. o0 + R of the dense weight, D[r, g, e] = sum_q (bit ? a : -a)[g, o0 + r, q],
    from codes laid out (group, out, plane, packed): for large batches, where a matmul with
    it beats the look-ups. The host builds it a block of rows at a time (``_weight_blocks``)."""
    Gs, O, Q, E = plan.extents(sizes)
    terms = " + ".join(_sel(f"(C[g, o0 + r, {q}, s] >> j) & T.uint8(1)", f"A[g, o0 + r, {q}]")
                       for q in range(Q))
    return "\n".join([
        "@T.prim_func",
        "def main(c: T.handle, a: T.handle, d: T.handle, o0: T.int32):",
        '    T.func_attr({"global_symbol": "main", "tir.noalias": True})',
        "    R = T.int32()",
        f"    C = T.match_buffer(c, ({Gs}, {O}, {Q}, {E // 8}), \"uint8\")",
        f"    A = T.match_buffer(a, ({Gs}, {O}, {Q}), \"float32\")",
        f"    D = T.match_buffer(d, (R, {Gs}, {E}), \"float32\")",
        f"    for rg in T.parallel(R * {Gs}):",
        f"        r: T.let = rg // {Gs}",
        f"        g: T.let = rg % {Gs}",
        f"        for s in T.serial({E // 8}):",
        "            for j in T.vectorized(8):",
        f"                D[r, g, s * 8 + j] = {terms}",
    ]) + "\n"


def sdot_source(plan: LutPlan, sizes: dict[str, int]) -> str:
    """dS[g, o0 + r, q] = sum_e (bit ? P : -P)[r, g, e]: the codes' signed dot with rows of P."""
    Gs, O, Q, E = plan.extents(sizes)
    return "\n".join([
        "@T.prim_func",
        "def main(c: T.handle, p: T.handle, ds: T.handle, o0: T.int32):",
        '    T.func_attr({"global_symbol": "main", "tir.noalias": True})',
        "    R = T.int32()",
        f"    C = T.match_buffer(c, ({Gs}, {O}, {Q}, {E // 8}), \"uint8\")",
        f"    P = T.match_buffer(p, (R, {Gs}, {E}), \"float32\")",
        f"    DS = T.match_buffer(ds, ({Gs}, {O}, {Q}), \"float32\")",
        f"    for rg in T.parallel(R * {Gs}):",
        f"        r: T.let = rg // {Gs}",
        f"        g: T.let = rg % {Gs}",
        "        acc = T.alloc_buffer((8,), \"float32\")",
        f"        for q in T.serial({Q}):",
        "            for j in T.vectorized(8):",
        "                acc[j] = T.float32(0)",
        f"            for s in T.serial({E // 8}):",
        "                for j in T.vectorized(8):",
        "                    acc[j] = acc[j] + "
        + _sel("(C[g, o0 + r, q, s] >> j) & T.uint8(1)", "P[r, g, s * 8 + j]"),
        "            DS[g, o0 + r, q] = " + " + ".join(f"acc[{j}]" for j in range(8)),
    ]) + "\n"


def _weight_blocks(dequant, codes: torch.Tensor, a: torch.Tensor):
    """(o0, r, rows o0 .. o0 + r of the dense weight as [r, K]) in turn: ``DENSE_BLOCK`` bytes
    (at least 8 rows) at a time, each built by ``dequant`` into the same reused block."""
    Gs, O, Q, S = codes.shape
    K = Gs * S * 8
    rows = max(8, min(O, DENSE_BLOCK // (4 * K)))
    block = _scratch("dense", (rows, Gs, S * 8))
    for o0 in range(0, O, rows):
        r = min(rows, O - o0)
        dequant(codes, a, block[:r], o0)
        yield o0, r, block[:r].reshape(r, K)


def run_dense(plan: LutPlan, tc: TiledCall, sizes: dict[str, int]) -> torch.Tensor:
    (dequant,) = _compiled("dense", plan, sizes, dequant_source)
    x, codes, a = _operands(plan, tc, sizes)
    xt = x.reshape(tc.N, -1).T
    yt = torch.empty(codes.shape[1], tc.N)
    for o0, r, w in _weight_blocks(dequant, codes, a):
        torch.mm(w, xt, out=yt[o0:o0 + r])
    return yt.T.to(tc.out_dtype)


def lut_grads_tvm(plan: LutPlan, tc: TiledCall, dy: torch.Tensor,
                  need: frozenset[str] | None = None) -> dict[str, torch.Tensor]:
    """The row's and the weights' gradients (as ``lut_grads_torch``, ``need`` too) from blocks
    of the dense weight and of dy^T x; codes in another layout go to ``lut_grads_torch``."""
    if not canonical_codes(plan):
        return lut_grads_torch(plan, tc, dy, need)
    row, weights = needs(plan, need)   # (frozen alphas: the weights' half is skipped)
    sizes = plan_sizes(plan, tc)
    dequant, sdot = _compiled("grads", plan, sizes, dequant_source, sdot_source)
    x, codes, a = _operands(plan, tc, sizes)
    Gs, O, Q, S = codes.shape
    xf, dyf = x.reshape(tc.N, -1), dy.float().reshape(tc.N, O)
    dx = torch.zeros_like(xf)
    dS = torch.empty(Gs, O, Q)
    for o0, r, w in _weight_blocks(dequant, codes, a):
        if row:
            dx.addmm_(dyf[:, o0:o0 + r], w)
        if weights:     # the scale's cotangent
            outer = _scratch("outer", (r, Gs, S * 8))
            torch.mm(dyf[:, o0:o0 + r].T, xf, out=outer.view(r, -1))
            sdot(codes, outer, dS, o0)
    out = {}
    if row:
        xin = tc.tensors[plan.row]
        rdims, grow = dims_of(plan, plan.row), row_order(plan)
        dx = dx.reshape(tc.N, *(sizes[d] for d in grow))
        dx = dx.permute(0, *(1 + grow.index(d) for d in rdims))
        out[plan.row] = dx.reshape(xin.shape).to(xin.dtype)
    if not weights:
        return out
    gop = scale_order(plan)
    dS = dS.reshape([sizes[d] for d in gop])
    extra = [i for i, d in enumerate(gop) if d not in plan.scale_dims]
    if extra:
        dS = dS.sum(extra)
    kept = [d for d in gop if d in plan.scale_dims]
    dscale = dS.permute([kept.index(d) for d in plan.scale_dims])
    return weight_grads(plan, tc, dscale, out)
