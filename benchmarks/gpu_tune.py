"""Tune the Triton built-ins on this GPU at the GPU run protocol's shape.

    python benchmarks/gpu_tune.py [--out tuned.json] [--effort quick] [--package]

For Gated DeltaNet, GLA and KDA (bf16, K = V = 128, B1 T8192 H16; ``--all-shapes``: also B1
T8192 H32 and B8 T2048 H16) runs ``recurkit.autotune.tune`` within the Triton backend at the
default chunk on CUDA tensors: kernels that do not compile, spill or exceed shared memory
for this GPU are dropped before timing; each candidate is checked against the reference in
fp32 and in bf16, then timed in bf16 in a subprocess. Writes the winners, with the default's
time beside the winner's, as JSON after each op (a time limit that stops the run keeps what
is done). The winners also land in the tuning cache ($RECURKIT_CACHE_DIR). The JSON is in
the format of ``recurkit.backends.triton.configs``: with ``--package`` it is also merged into
``recurkit/backends/triton/configs/<device>.json``, the knobs shipped with the package and
used by default on a GPU of this model for the default chunk (commit that file).
Needs a CUDA GPU; says so and exits without one.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

import recurkit as rk

SHAPES = [(1, 8192, 16), (1, 8192, 32), (8, 2048, 16)]   # the first: the default run
OPS = ("gated_delta_rule", "gla", "kda")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tuned.json")
    ap.add_argument("--effort", default="quick", choices=("quick", "full"))
    ap.add_argument("--all-shapes", action="store_true")
    ap.add_argument("--package", action="store_true",
                    help="merge the winners into recurkit/backends/triton/configs/")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_tune.py: no CUDA device here; run it on a machine with a GPU")
        return 0
    from recurkit.autotune import tune
    from recurkit.backends.triton import runtime
    name = torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    cap = f"sm_{major}{minor}"
    arch = cap if cap in runtime.TARGETS else "sm_90" if major >= 9 else "sm_80"
    if arch != cap:
        print(f"static checks compile for {arch} (no ahead-of-time target for {cap})")
    rows = []
    for op in OPS:
        program = getattr(rk.ops, op).decl.program
        for B, T, H in (SHAPES if args.all_shapes else SHAPES[:1]):
            shape = {"B": B, "T": T, "H": H, "N": B, "sizes": {"K": 128, "V": 128}}
            try:
                res = tune(program, shape, device="cuda", effort=args.effort,
                           dtype="bfloat16", backend="triton", arch=arch, progress=False,
                           chunk=runtime.default_chunk(program))
            except Exception as e:  # noqa: BLE001 - report and go on to the next shape
                print(f"{op} B{B} T{T} H{H}: tuning failed: {type(e).__name__}: {e}")
                continue
            best = res.best
            row = {"program": program.content_hash(), "name": op, "B": B, "T": T, "H": H,
                   "form": best.form, "chunk": best.chunk, "sizes": shape["sizes"],
                   "dtype": "bfloat16", "knobs": dict(best.knobs), "ms": res.seconds * 1e3,
                   "default_ms": (res.default_seconds or float("nan")) * 1e3,
                   "tried": len(res.tried), "dropped": len(res.dropped)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            write(args, name, cap, rows)
    return 0


def write(args, name: str, cap: str, rows: list) -> None:
    doc = {"device": name, "capability": cap, "torch": torch.__version__, "entries": rows}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    if args.package:
        from recurkit.backends.triton import configs
        path = os.path.join(os.path.dirname(configs.__file__), configs.slug(name) + ".json")
        old = json.load(open(path)).get("entries", []) if os.path.exists(path) else []
        key = configs._key
        # one entry per (declaration, form, chunk, sizes, dtype): the winner at the shape with
        # the most tokens x heads (the training shape), new rows over old at equal size
        merged = {}
        for e in sorted(old + rows, key=lambda e: e["B"] * e["T"] * e["H"]):
            merged[key(e)] = e
        doc["entries"] = sorted(merged.values(), key=lambda e: (e["name"], e["B"], e["T"]))
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
