"""The scan form's backward as Triton kernels (``backends.shared.scan_backward``): the
forward's own scan kernel recomputes the states, then one kernel runs the reverse scan of
their cotangents, ``L_t = a_(t+1) L_(t+1) + dh_t``, per (sequence, head, block of the state),
in the forward's compensated form (``a L = L + m L`` with ``m = expm1(log|a|)``, the add
Kahan-compensated) and writes ``db_t = L_t``, ``da_t = L_t h_(t-1)`` and the initial state's
cotangent ``a_1 L_1``. On a GPU, or in Triton's interpreter for CPU tensors."""
from __future__ import annotations

from typing import Callable

import torch

from ...ir.bind import BoundCall
from ...lowering.forms import lower
from ..shared.host import scan_args, state_shaped
from .runtime import _launch, check_config, load_module, warps
from .sequential import HEADER, pow2, scan_program_lines, scan_source


def scan_adjoint_source(D: int, H: int, signed: bool, block: int = 256, num_warps: int = 4
                        ) -> str:
    B = min(pow2(D), block)
    sg_arg = ", SG" if signed else ""
    L = ["", "", "@triton.jit",
         f"def scan_adjoint_kernel(M{sg_arg}, DH, HS, S0, DSF, DA, DB, DS0, SEG, TT):",
         *scan_program_lines(D, H, B),
         "    lv = tl.load(DSF + sbase + o_D, mask=m_D, other=0.0)",
         "    s0 = tl.load(S0 + sbase + o_D, mask=m_D, other=0.0)",
         "    cv = lv * 0.0",
         "    mn = lv * 0.0   # the next token's m: a = 1 for the final state's cotangent"]
    if signed:
        L += ["    sn = lv * 0.0 + 1.0"]
    sgn = "sn * " if signed else ""
    L += ["    for tt in range(start, end):",
          "        t = end - 1 - (tt - start)",
          f"        base = ((row * TT + t) * {H} + h).to(tl.int64) * {D} + o_D",
          "        dh = tl.load(DH + base, mask=m_D, other=0.0)"]
    if signed:
        L += ["        cv = sn * cv"]
    L += [f"        y = {sgn}mn * lv + dh - cv",
          f"        tv = {sgn}lv + y",
          f"        cv = (tv - {sgn}lv) - y",
          "        lv = tv",
          "        tl.store(DB + base, lv, mask=m_D)",
          "        later = (o_D * 0 + t) > start   # a block: the interpreter's masks need one",
          f"        hp = tl.load(HS + base - {H * D}, mask=m_D & later, other=0.0)",
          "        hp = tl.where(later, hp, s0)",
          "        tl.store(DA + base, lv * hp, mask=m_D)",
          "        mn = tl.load(M + base, mask=m_D, other=0.0)"]
    if signed:
        L += ["        sn = tl.load(SG + base, mask=m_D, other=1.0)"]
    L += [f"    tl.store(DS0 + sbase + o_D, {sgn}(lv + mn * lv), mask=m_D)",
          "", "",
          "def launch(m, sg, dh, hs, s0, dsf, da, db, ds0, seg, TT, NS):",
          f"    scan_adjoint_kernel[(NS * {H}, {-(-D // B)})](m, {'sg, ' if signed else ''}"
          f"dh, hs, s0, dsf, da, db, ds0, seg, TT, num_warps={num_warps}, num_stages=1)", ""]
    return HEADER + "\n".join(L)


def run_scan_adjoint_triton(bc: BoundCall, a: torch.Tensor, b: torch.Tensor, dh_of: Callable,
                            d_final: torch.Tensor | None, config: dict | None = None):
    """The kernel of ``shared.scan_backward``: (da, db, the initial state's cotangent), the
    states recomputed by the forward's scan kernel (``a``, ``b`` are the host's; the kernels
    read the forward's m and sign, so the states are the forward's bit for bit)."""
    cfg = check_config(config)
    p = bc.program
    tp = lower(p, "scan")
    m, sg, bb, seg, s0, sf = scan_args(tp, bc)
    interpret = bc.device.type != "cuda"
    D, nw = m.shape[-1], warps(cfg, False)
    fwd = load_module(scan_source(D, bc.H, sg is not None, num_warps=nw), interpret)
    hs = torch.empty_like(m)
    _launch(fwd, interpret, m, sg, bb, hs, s0, sf, seg, bc.T, seg.shape[0])
    dh = dh_of(state_shaped(bc, hs)).float().reshape(m.shape).contiguous()
    rev = load_module(scan_adjoint_source(D, bc.H, sg is not None, num_warps=nw), interpret)
    da, db = torch.empty_like(m), torch.empty_like(m)
    ds0 = torch.empty_like(s0)
    dsf = d_final.reshape(s0.shape).contiguous() if d_final is not None else \
        torch.zeros_like(s0)
    _launch(rev, interpret, m, sg, dh, hs, s0, dsf, da, db, ds0, seg, bc.T, seg.shape[0])
    return state_shaped(bc, da), state_shaped(bc, db), state_shaped(bc, ds0)
