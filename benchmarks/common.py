"""Shared helpers for the benchmark scripts: machine description and robust timing."""
from __future__ import annotations

import os
import platform
import statistics
import time

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    return (f"{cpu_model()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


QUIET_S = 0.02   # idle time before each timed call


def bench(fns: dict, repeats: int = 7, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call; the candidates are interleaved so that load on the machine
    affects them alike. Each timed call starts after QUIET_S of idle time, so that no
    candidate shares the cores with the threads of the one before, still spinning in their
    thread pool's wait loop (OpenMP's for torch, TVM's own for TVM kernels)."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(repeats):
        for n, f in fns.items():
            time.sleep(QUIET_S)
            t = time.perf_counter()
            f()
            times[n].append(time.perf_counter() - t)
    return {n: statistics.median(ts) for n, ts in times.items()}


def bench_back_to_back(fns: dict, repeats: int = 7, calls: int = 10) -> dict[str, float]:
    """Median seconds per call when each candidate is called ``calls`` times in a row (a
    decode loop's pattern: caches, thread pools and branch predictors warm from the call
    before): per round and candidate, QUIET_S of idle, one untimed call, then ``calls`` timed
    back to back; the candidates interleaved as in ``bench``."""
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(repeats):
        for n, f in fns.items():
            time.sleep(QUIET_S)
            f()
            t = time.perf_counter()
            for _ in range(calls):
                f()
            times[n].append((time.perf_counter() - t) / calls)
    return {n: statistics.median(ts) for n, ts in times.items()}


def add_shape_args(ap, repeats: int) -> None:
    """The shape options every benchmark takes: --T, --H, --D (K = V) and --repeats."""
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=repeats)


def gdn_inputs(B: int, T: int, H: int, K: int) -> list[torch.Tensor]:
    """Gated DeltaNet inputs (q, unit-norm k, v, log-sigmoid gate g, beta), seeded."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    return [torch.randn(B, T, H, K), F.normalize(torch.randn(B, T, H, K), dim=-1),
            torch.randn(B, T, H, K), F.logsigmoid(torch.randn(B, T, H)), torch.rand(B, T, H)]


def cpu_features() -> list[str]:
    """The vector features that decide which kernels run (from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [x for x in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw",
                                        "avx512_vnni", "avx512_vbmi", "amx_tile") if x in have]
    except OSError:
        pass
    return []


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def save_results(name: str, payload: dict) -> str:
    """Write ``payload`` with the date, machine and command to benchmarks/results/<name>.json
    (what ``benchmarks/plot.py`` renders and the docs show); returns the path."""
    import datetime
    import json
    import sys
    doc = {"benchmark": name,
           "date": datetime.date.today().isoformat(),
           "machine": {"cpu": cpu_model(), "features": cpu_features(),
                       "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "python": platform.python_version()},
           "command": "python " + " ".join([os.path.relpath(os.path.abspath(sys.argv[0]),
                                                            os.path.dirname(RESULTS) + "/..")]
                                           + sys.argv[1:]),
           **payload}
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"\nresults written to {os.path.relpath(path)}")
    return path


def fla_naive_gdn():
    """FLA's ``naive_chunk_gated_delta_rule`` (the peer of the GDN benchmarks), or None with
    the reason printed when FLA is not installed (``pip install --no-deps fla-core einops``)."""
    import warnings
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule
        return naive_chunk_gated_delta_rule
    except Exception as e:  # noqa: BLE001 - report and go on without it
        print(f"(FLA's naive code not available: {type(e).__name__}: {e})")
        return None
