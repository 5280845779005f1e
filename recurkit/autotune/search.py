"""The search: candidates in, the fastest verified one out, remembered per device and shape.

Small spaces are tried exhaustively; large ones by a seeded evolutionary search (keep the best
few, mutate one choice at a time) until the space or the time budget runs out. Every candidate
is measured in the worker process (verified first); failures are recorded and never chosen.
"""
from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, field

import torch

from .. import backends
from .cache import TuneCache, make_key, shape_bucket
from .space import Candidate, config_space, prune_static
from .worker import Worker, measure

EFFORT = {  # time budget (s), repeats per timing, exhaustive up to this many candidates
    "quick": {"budget": 45.0, "repeats": 3, "exhaustive": 16, "timeout": 60.0},
    "full": {"budget": 600.0, "repeats": 7, "exhaustive": 64, "timeout": 180.0},
}


@dataclass
class TuneResult:
    best: Candidate
    seconds: float
    default_seconds: float | None
    tried: list[tuple[Candidate, dict]] = field(default_factory=list)
    dropped: dict = field(default_factory=dict)
    wall: float = 0.0
    from_cache: bool = False

    def failures(self) -> list[tuple[Candidate, str]]:
        return [(c, r["why"]) for c, r in self.tried if not r.get("ok")]


class Progress:
    """One status line on stderr: candidates tried and the best so far."""

    def __init__(self, name: str, total: int, stream=None, enabled: bool = True):
        self.name, self.total, self.n = name, total, 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.best = None

    def update(self, cand: Candidate, res: dict) -> None:
        self.n += 1
        if res.get("ok") and (self.best is None or res["seconds"] < self.best[1]):
            self.best = (cand, res["seconds"])
        if self.enabled:
            best = (f"best {self.best[1] * 1e3:.2f} ms ({self.best[0].label()})" if self.best
                    else "no valid candidate yet")
            status = f"{res['seconds'] * 1e3:.2f} ms" if res.get("ok") else "failed"
            self.stream.write(f"\r[recurkit tune {self.name}] {self.n}/{self.total} tried, "
                              f"last {status}, {best}\x1b[K")
            self.stream.flush()

    def done(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def _neighbours(c: Candidate, space: list[Candidate]) -> list[Candidate]:
    """Candidates that differ from ``c`` in exactly one choice."""
    def parts(x):
        return {"backend": x.backend, "form": x.form, "chunk": x.chunk, **x.knob_dict}
    pc = parts(c)
    return [x for x in space if x != c and sum(
        parts(x).get(k) != v for k, v in pc.items()) + len(set(parts(x)) - set(pc)) == 1]


def tune(program, shape: dict, *, device: str = "cpu", effort: str = "quick",
         seed: int = 0, cache: TuneCache | None = None, dtype: str = "float32",
         candidates: list[Candidate] | None = None, progress: bool = True,
         isolate: bool = True, use_cache: bool = True, arch: str = "sm_90",
         timeout: float | None = None, backend: str | None = None, form: str | None = None,
         chunk: int | None = None, knobs: dict | None = None) -> TuneResult:
    """Tune ``program`` at ``shape`` = {"B", "T", "H", "N", "sizes": {dim: size}}.

    A cached winner for this device, IR, dtype and shape bucket is returned without timing
    anything. ``candidates`` replaces the derived space (the first one is the default);
    ``isolate=False`` measures in this process (no protection from crashes); ``timeout``
    (seconds) overrides the effort's limit per candidate. ``backend``, ``form``, ``chunk``
    and ``knobs`` narrow the derived space (see ``config_space``); a narrowed space has cache
    entries of its own."""
    if effort not in EFFORT:
        raise ValueError(f"effort must be one of {', '.join(EFFORT)}, got {effort!r}")
    cfg = dict(EFFORT[effort])
    if timeout is not None:
        cfg["timeout"] = timeout
    modelled = device == "cuda" and not torch.cuda.is_available()   # no GPU to time on
    cache = cache or TuneCache()
    family = "gpu" if device == "cuda" else "cpu"
    bucket = shape_bucket(shape["sizes"], shape["B"], shape["T"], shape["H"], shape["N"])
    narrow = {k: v for k, v in (("backend", backend), ("form", form), ("chunk", chunk),
                                ("knobs", sorted((knobs or {}).items()))) if v}
    key = None if modelled else make_key(program.content_hash(), family, dtype, bucket, device,
                                         space=repr(sorted(narrow.items())) if narrow else "")
    shape = {**shape, "device": device, "dtype": dtype}
    t0 = time.perf_counter()
    if use_cache and not modelled:
        hit = cache.get(key)
        if hit is not None:
            return TuneResult(Candidate.from_json(hit["best"]), hit["seconds"],
                              hit.get("default_seconds"), wall=time.perf_counter() - t0,
                              from_cache=True)
    space = list(candidates) if candidates is not None else config_space(
        program, device, effort, backend=backend, form=form, chunk=chunk, knobs=knobs)
    dropped: dict = {}
    if device == "cuda":
        space, dropped = prune_static(program, space, shape["sizes"], shape["H"], arch, dtype)
    if modelled:
        return _modelled(program, space, dropped, shape, dtype, arch, t0)
    rng = random.Random(seed)
    exhaustive = len(space) <= cfg["exhaustive"]
    limit = len(space) if exhaustive else cfg["exhaustive"]
    queue = list(space) if exhaustive else \
        space[:1] + rng.sample(space[1:], min(3, len(space) - 1))
    bar = Progress(program.name, limit, enabled=progress)
    worker = Worker() if isolate else None
    results: dict[Candidate, dict] = {}   # in the order tried
    try:
        while len(results) < limit:
            if results and time.perf_counter() - t0 > cfg["budget"]:
                break
            if not queue:   # evolve: a one-choice change of one of the best three
                good = sorted((r["seconds"], i, c) for i, (c, r) in enumerate(results.items())
                              if r.get("ok"))
                pool = [n for _, _, c in good[:3] for n in _neighbours(c, space)
                        if n not in results] or [c for c in space if c not in results]
                if not pool:
                    break
                queue = [rng.choice(pool)]
            cand = queue.pop(0)
            if cand in results:
                continue
            if worker is not None:
                res = worker.run(program, cand, shape, cfg["repeats"], cfg["timeout"])
            else:
                try:
                    res = measure(program, cand, shape, cfg["repeats"])
                except Exception as e:  # noqa: BLE001 - recorded as this candidate's failure
                    res = {"ok": False, "why": f"{type(e).__name__}: {e}"[:400]}
            results[cand] = res
            bar.update(cand, res)
    finally:
        bar.done()
        if worker is not None:
            worker.close()
    tried = list(results.items())
    ok = [(r["seconds"], i, c) for i, (c, r) in enumerate(tried) if r.get("ok")]
    if not ok:
        raise RuntimeError(f"autotune {program.name}: every candidate failed; first: "
                           f"{tried[0][0].label()}: {tried[0][1]['why']}" if tried else
                           f"autotune {program.name}: no candidate left to try")
    secs, _, best = min(ok)
    default = results.get(space[0]) if space else None
    d_secs = default["seconds"] if default and default.get("ok") else None
    cache.put(key, {"best": best.to_json(), "seconds": secs, "default_seconds": d_secs,
                    "program": program.name, "bucket": bucket, "effort": effort,
                    "device": family})
    return TuneResult(best, secs, d_secs, tried, dropped, time.perf_counter() - t0)


MODEL_DEVICE = {"sm_90": "h100", "sm_80": "h100"}   # the modelled device for an arch


def _modelled(program, space, dropped, shape, dtype, arch, t0) -> TuneResult:
    """The candidate with the least modelled time (``Backend.model_seconds``) among those the
    static check kept; candidates without a model are dropped. Not cached: a measurement on a
    GPU replaces it."""
    device = MODEL_DEVICE.get(arch, "h100")
    tried = []
    for c in space:
        if c.backend.startswith("py:"):
            continue
        try:
            secs = backends.get(c.backend).model_seconds(program, c.form, c.chunk,
                                                         c.knob_dict, shape, dtype, device)
        except Exception as e:  # noqa: BLE001 - a candidate the model cannot price is dropped
            dropped[c] = f"traffic model failed: {type(e).__name__}: {e}"[:300]
            continue
        if secs is None:
            dropped[c] = "no traffic model for this form (token loops are latency-bound)"
        else:
            tried.append((c, {"ok": True, "seconds": secs, "modelled": device}))
    if not tried:
        raise RuntimeError(f"autotune {program.name}: no GPU here and no candidate the "
                           "traffic model ranks")
    secs, _, best = min((r["seconds"], i, c) for i, (c, r) in enumerate(tried))
    first = tried[0][1]["seconds"] if space and tried[0][0] == space[0] else None
    return TuneResult(best, secs, first, tried, dropped, time.perf_counter() - t0)
