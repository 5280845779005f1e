"""Context parallelism on this CPU: Gated DeltaNet at T = 32768 on 1 process against the
same sequence split over 2 gloo ranks (``op(..., cp_group=group)``), one thread each,
forward and forward + backward, wall time per call (the slowest rank's) and the bytes each
rank sends, in one run. The output and final state are checked against the one process.

    python benchmarks/context_parallel_cpu.py [--T 32768] [--H 4] [--D 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from common import add_shape_args, cpu_features, gdn_inputs, machine, save_results  # noqa: E402

import recurkit as rk  # noqa: E402


def _run(rank, world, path, args, out):
    import torch.distributed as dist
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank,
                               world_size=world, timeout=datetime.timedelta(seconds=600))
    T, H, D = args.T, args.H, args.D
    xs = gdn_inputs(1, T, H, D)
    t0, t1 = rank * T // world, (rank + 1) * T // world
    part = [x[:, t0:t1].contiguous() for x in xs]
    op = rk.compile(rk.ops.gated_delta_rule.decl)
    kw = {"output_final_state": True}
    if world > 1:
        kw["cp_group"] = dist.group.WORLD
    times = {}
    for mode in ("forward", "forward + backward"):
        best = float("inf")
        for _ in range(args.repeats + 1):
            leaves = [x.clone().requires_grad_(mode != "forward") for x in part]
            if world > 1:
                dist.barrier()
            start = time.perf_counter()
            with torch.set_grad_enabled(mode != "forward"):
                o, S = op(*leaves, **kw)
                if mode != "forward":
                    (o.float().square().sum() + S.square().sum()).backward()
            if world > 1:
                dist.barrier()
            best = min(best, time.perf_counter() - start)
        times[mode] = best
    with torch.no_grad():   # every rank: a cp call is collective
        o, S = op(*part, **kw)
    if rank == 0:
        torch.save({"times": times, "o": o, "S": S}, out)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser()
    add_shape_args(ap, repeats=3)
    ap.set_defaults(T=32768, D=64, H=4)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    print(f"vector features: {' '.join(cpu_features())}")
    print(f"Gated DeltaNet, B=1 T={args.T} H={args.H} K=V={args.D}, fp32, 1 thread per "
          "process, backend auto\n")
    res = {}
    with tempfile.TemporaryDirectory() as d:
        for world in (1, 2):
            out = os.path.join(d, f"r{world}.pt")
            mp.spawn(_run, args=(world, os.path.join(d, f"rdv{world}"), args, out),
                     nprocs=world)
            res[world] = torch.load(out)
    one, two = res[1], res[2]
    T2 = args.T // 2
    err = ((two["o"] - one["o"][:, :T2]).abs().max() / one["o"].abs().max()).item()
    errS = ((two["S"] - one["S"]).abs().max() / one["S"].abs().max()).item()
    assert err < 1e-4 and errS < 1e-4, (err, errS)
    K = V = args.D
    sent = 1 * args.H * (K * V + K * K + V) * 4   # one segment: its state and its map
    rows = {}
    for mode in one["times"]:
        a, b = one["times"][mode], two["times"][mode]
        print(f"  {mode:20s} 1 process {a * 1e3:9.1f} ms   2 ranks {b * 1e3:9.1f} ms   "
              f"{a / b:4.2f}x")
        rows[mode] = {"1 process ms": a * 1e3, "2 ranks ms": b * 1e3, "speedup": a / b}
    print(f"  all-gather: {sent} bytes sent per rank per call (state and map, fp32); "
          f"max rel. error vs 1 process: output {err:.1e}, final state {errS:.1e}")
    print(save_results("context_parallel_cpu", {
        "shape": {"B": 1, "T": args.T, "H": args.H, "K": K, "V": V},
        "results": rows, "bytes_sent_per_rank": sent}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
