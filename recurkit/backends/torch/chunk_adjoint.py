"""The chunk-form backward (``lowering.chunk_adjoint``) executed with batched torch ops: the
oracle of the compiled renderings and the CPU fallback. Chunk stages run on every chunk at
once ([N, H, chunks] batch axes); loop stages walk the chunks (backwards for the adjoint
pass) on [N, H] slices. See ``backends.shared.chunk_backward`` for the host side."""
from __future__ import annotations

import torch

from ...ir.bind import BoundCall
from ...lowering.tile import TileProgram
from ..shared.host import Packing, initial_state
from .tile_ops import Val, exec_op


def run_chunk_adjoint_torch(tp: TileProgram, bc: BoundCall, feeds: dict[str, torch.Tensor],
                            d_final: torch.Tensor | None, config: dict | None = None):
    """(cotangents by prologue value [B, T, H, *dims], the readout ``h`` [B, T, H, V] or
    None, the initial state's cotangent [N, H, *state], None: the host runs the prologue's
    backward) from the prologue values ``feeds``
    ([B|1, T|1, H|1, *dims], fp32, the readout's cotangent under ``d_h`` included). The torch
    renderer has no knobs (``config`` is ignored)."""
    C = tp.chunk
    pk = Packing(bc, C)
    sizes = {**bc.sizes}
    env: dict[str, Val] = {k: Val(pk.pack(feeds[k].float()), ("i", *n.dims))
                           for k, n in tp.prologue.items()}
    whole: set[str] = set()   # values without the chunk axis (a loop's final carried value)
    for st in tp.stages:
        if st.kind == "chunk":
            for op in st.ops:
                env[op.out] = env[op.attr("value")] if op.op == "load" else \
                    exec_op(op, env, C, sizes)
            continue
        carried = st.carried[0]
        init = next(op for op in st.ops if op.op == "zeros" and op.out == carried)
        if init.attr("init") == "initial_state":
            cur = initial_state(bc, pk.N)
        elif d_final is not None:
            cur = d_final.float()
        else:
            cur = torch.zeros_like(initial_state(bc, pk.N))
        reads = {x for op in st.ops for x in op.args} - {op.out for op in st.ops}
        keep = [n for n in st.outputs if n != carried]
        per: dict[str, list] = {n: [None] * pk.nc for n in keep}
        order = range(pk.nc - 1, -1, -1) if st.reverse else range(pk.nc)
        for c in order:
            local = {x: (env[x] if x in whole else Val(env[x].t.select(2, c), env[x].axes))
                     for x in reads if x in env}
            local[carried] = Val(cur, init.axes)
            for op in st.ops:
                if op.op != "zeros":
                    local[op.out] = exec_op(op, local, C, sizes)
            cur = local[carried].to(init.axes)
            for n in keep:
                per[n][c] = local[n]
        for n in keep:
            env[n] = Val(torch.stack([v.t for v in per[n]], 2), per[n][0].axes)
        env[carried] = Val(cur, init.axes)
        whole.add(carried)
    p = bc.program

    def tokens(name: str, dims) -> torch.Tensor:
        return pk.unpack(env[name].to(("i", *dims)))
    grads = {k: tokens(v, tp.prologue[k].dims) for k, v in tp.meta["grads"].items()}
    h = tp.meta.get("h")
    return grads, (tokens(h, p.output.dims) if h else None), \
        env[tp.meta["d_init"]].to(tuple(p.state.dims)), None
