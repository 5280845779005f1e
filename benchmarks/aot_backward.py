"""Ahead-of-time compiles of the generated chunk-form backward (no GPU needed): registers,
spills, shared memory and tensor-core instructions of each of its kernels per target.

    PYTHONPATH=. python benchmarks/aot_backward.py [--ops gated_delta_rule,gla,kda]
        [--arch sm_90,sm_80,gfx942] [--dtype bf16,fp32] [--chunk 16] [--unaligned]

K = V = 128, H = 16 (FLA's benchmark shapes); the module is the one a call with an initial
state and a final state's cotangent runs. Pointers are compiled 16-byte aligned and the length
and chunk count as multiples of 16, as Triton's JIT specialises a typical call
(``aot_compile(aligned=True)``); ``--unaligned`` compiles with no such attributes. Writes
benchmarks/results/aot_backward.json."""
from __future__ import annotations

import argparse
import time

from common import cpu_features, machine, save_results

import recurkit.ops as ops
from recurkit.backends.triton.chunk_module import chunk_source
from recurkit.backends.triton.runtime import aot_compile, check_config
from recurkit.lowering.chunk_adjoint import lower_adjoint


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", default="gated_delta_rule,gla,kda")
    ap.add_argument("--arch", default="sm_90,sm_80,gfx942")
    ap.add_argument("--dtype", default="bf16,fp32")
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--unaligned", action="store_true",
                    help="compile with no divisibility attributes (aot_compile(aligned=False))")
    a = ap.parse_args()
    print(f"machine: {machine()}\nvector features: {' '.join(cpu_features())}")
    rows = []
    for name in a.ops.split(","):
        decl = ops.ALL[name].decl
        tp = lower_adjoint(decl, chunk=a.chunk)
        for dt in a.dtype.split(","):
            src, io = chunk_source(tp, {"K": 128, "V": 128}, 16, check_config(None), False,
                                   True, False, dt, False, has_dsf=True)
            for arch in a.arch.split(","):
                if arch == "gfx942" and dt == "fp32":
                    continue
                t0 = time.perf_counter()
                for r in aot_compile(src, arch, io=dt, aligned=not a.unaligned):
                    r.update(op=name, dtype=dt, chunk=a.chunk, aligned=not a.unaligned,
                             prologue_backward="kernel" if io.input_grads is not None
                             else "host")
                    rows.append(r)
                    print(f"{name:18} {dt:5} {arch:7} {r['kernel']:22} regs {r['registers']}"
                          f" spill {r['spill_bytes']} shared {r['shared']} mma {r['mma']}")
                print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    save_results("aot_backward", {"shape": {"K": 128, "V": 128, "H": 16},
                                  "aligned": not a.unaligned, "kernels": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
