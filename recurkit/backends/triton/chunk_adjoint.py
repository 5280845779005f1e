"""The chunk-form backward (``lowering.chunk_adjoint``) as Triton kernels: the same stage
generator as the forward (``chunk_module``), four kernels (the chunk prep, the forward's state
pass, the cotangent state's pass backwards over the chunks, the gradients per chunk), on a GPU
or in Triton's interpreter for CPU tensors. The prologue is computed in the kernels from the
call's tensors as in the forward; the readout's cotangent is a host feed. See
``backends.shared.chunk_backward`` for the host side."""
from __future__ import annotations

import torch

from ...ir.bind import BoundCall, as_given, full_shape
from ...lowering.tile import TileProgram
from ..shared.host import chunk_count
from .chunk_module import chunk_source
from .runtime import (DTYPE_NAMES, _launch, call_groups, check_config, chunk_inputs,
                      intermediate_dtype, load_module)


def adjoint_module(tp: TileProgram, bc: BoundCall, cfg: dict, has_dsf: bool,
                   segments: int = 1):
    """(source, ChunkIO) of the backward's kernels for call ``bc``; its two state passes
    in ``segments`` (``segments.py``) where their kernels make every segment's map, else
    whole (``io.segments``)."""
    return chunk_source(tp, bc.sizes, bc.H, cfg, bc.cu_seqlens is not None,
                        bc.initial_state is not None, False,
                        DTYPE_NAMES.get(bc.out_dtype, "fp32"), bc.device.type != "cuda",
                        has_dsf=has_dsf, groups=call_groups(bc), segments=segments)


def run_chunk_adjoint_triton(tp: TileProgram, bc: BoundCall, feeds: dict[str, torch.Tensor],
                             d_final: torch.Tensor | None, config: dict | None = None):
    """The kernel of ``shared.chunk_backward``: (None, None, the initial state's cotangent,
    the inputs' gradients) where the grads kernel renders the prologue's backward (each
    token input's in its dtype and layout, a parameter's per-token shares in fp32), else
    (cotangents by prologue value, h or None, the initial state's cotangent, None), the
    cotangents in the call's dtype when it is 16-bit (as FLA's backward writes its
    gradients), else fp32. The initial state's is fp32."""
    from .segments import Joiner, choose
    cfg = check_config(config)
    interpret = bc.device.type != "cuda"
    src, io = adjoint_module(tp, bc, cfg, d_final is not None, choose(tp, bc, cfg))
    join = (Joiner(tp, bc, io.segments, cfg, interpret),) if io.segments > 1 else ()
    mod = load_module(src, interpret)
    p = bc.program
    xs, fs, scs = chunk_inputs(io, bc, feeds)
    res = list(tp.meta["grads"]) + (["h"] if tp.meta["h"] else [])
    # the cotangents leave in the intermediates' dtype: a 16-bit call's, as its gradients
    lowp = intermediate_dtype(bc, cfg)
    if io.input_grads is not None:   # the kernels ran the prologue's backward too
        spec = {s.name: s for s in p.inputs}
        # at H heads, a grouped input's too (summed over its group by ``fold_groups``)
        os = [torch.empty(full_shape(bc, x), device=bc.device, dtype=as_given(bc, x)[0].dtype)
              if spec[x].role == "token" else torch.empty(
                  bc.B, bc.T, *full_shape(bc, x), device=bc.device) for x in io.input_grads]
    else:
        os = [torch.empty(bc.B, bc.T, bc.H, *(bc.sizes[d] for d in (
            p.output.dims if r == "h" else tp.prologue[r].dims)), device=bc.device,
            dtype=lowp) for r in res]
    N = bc.N
    state = (N, bc.H, *(bc.sizes[d] for d in p.state.dims))
    s0 = bc.initial_state.float().contiguous() if bc.initial_state is not None else None
    dsf = d_final.float().contiguous() if d_final is not None else None
    ds0 = torch.empty(state, device=bc.device)
    cu = bc.cu_seqlens_tensor if bc.cu_seqlens is not None else None
    if cu is not None and cu.device != bc.device:
        cu = cu.to(bc.device)
    _launch(mod, interpret, xs, fs, scs, os, s0, dsf, ds0, cu, N, chunk_count(bc, tp.chunk),
            bc.T, lowp, *join)
    if io.input_grads is not None:
        return None, None, ds0, dict(zip(io.input_grads, os))
    grads = dict(zip(tp.meta["grads"], os))
    return grads, (os[-1] if tp.meta["h"] else None), ds0, None
