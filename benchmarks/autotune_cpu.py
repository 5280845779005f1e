"""Autotuning on this CPU: default config vs "quick" vs "full", tuning wall time, cache hits.

    python benchmarks/autotune_cpu.py

For Gated DeltaNet and KDA forward (B=1, T=4096, H=4, K=V=128, fp32) prints, in one run: the
default candidate's time (what rk.compile runs untuned: the TVM sequential kernel), the best
found by effort "quick" and by "full" with their wall times, how close quick gets to full, and
the cost of a cache hit. Bars (issue 6): quick <= 60 s, and within 10% of full or >= 1.3x the
default; a cache hit < 50 ms. Tuning results go to a private cache directory.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

from common import bench, cpu_features, machine, save_results  # noqa: E402

import recurkit as rk  # noqa: E402
from recurkit.autotune import TuneCache, default_candidate, tune  # noqa: E402
from recurkit.autotune.worker import build, make_inputs  # noqa: E402

SHAPE = {"B": 1, "T": 4096, "H": 4, "N": 1, "sizes": {"K": 128, "V": 128}}


def main() -> int:
    print(f"machine: {machine()}")
    print(f"vector features: {' '.join(cpu_features())}")
    print("shape: B=1, T=4096, H=4, K=V=128, fp32, forward")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        os.environ["RECURKIT_CACHE_DIR"] = d
        for name in ("gated_delta_rule", "kda"):
            p = getattr(rk.ops, name).decl.program
            res = {}
            for effort in ("quick", "full"):
                r = tune(p, SHAPE, effort=effort, cache=TuneCache(os.path.join(
                    d, f"{effort}.json")), progress=False)
                res[effort] = r
                fails = len(r.failures())
                print(f"{name:17} {effort:5}: best {r.best.label()} {r.seconds * 1e3:8.2f} ms, "
                      f"default {r.default_seconds * 1e3:8.2f} ms "
                      f"({r.default_seconds / r.seconds:.2f}x), tuned in {r.wall:5.1f} s, "
                      f"{len(r.tried)} tried, {fails} failed", flush=True)
            q, f = res["quick"], res["full"]
            # the tuners' own timings come from separate runs (noise here is up to 2x between
            # runs): time the default and both winners side by side, interleaved
            xs = make_inputs(p, SHAPE["B"], SHAPE["T"], SHAPE["H"], SHAPE["sizes"], seed=3)
            fns = {n: build(p, c) for n, c in (("default", default_candidate(p)),
                                                ("quick", q.best), ("full", f.best))}
            side = bench({n: (lambda fn=fn: fn(**xs)) for n, fn in fns.items()}, repeats=7)
            print(f"{name:17} side by side: default {side['default'] * 1e3:.2f} ms, quick "
                  f"{side['quick'] * 1e3:.2f} ms, full {side['full'] * 1e3:.2f} ms", flush=True)
            t = time.perf_counter()
            hit = tune(p, SHAPE, effort="quick", cache=TuneCache(os.path.join(d, "quick.json")),
                       progress=False)
            hit_ms = (time.perf_counter() - t) * 1e3
            assert hit.from_cache
            gap = side["quick"] / side["full"] - 1
            speed = side["default"] / side["quick"]
            ok = q.wall <= 60 and (gap <= 0.10 or speed >= 1.3) and hit_ms < 50
            print(f"{name:17} quick is {gap * 100:+.1f}% vs full, {speed:.2f}x the default; "
                  f"quick wall {q.wall:.1f} s; cache hit {hit_ms:.1f} ms -> bars "
                  f"{'met' if ok else 'MISSED'}", flush=True)
            rows.append({"op": name, "cache_hit_ms": hit_ms,
                         "side_by_side_ms": {n: v * 1e3 for n, v in side.items()},
                         **{e: {"best": r.best.label(), "tuned_s": r.wall,
                                "tried": len(r.tried), "failed": len(r.failures())}
                            for e, r in res.items()}})
    save_results("autotune_cpu", {"shape": {"B": 1, "T": 4096, "H": 4, "K": 128, "V": 128},
                                  "dtype": "float32", "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
