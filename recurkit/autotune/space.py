"""Config spaces: what can be chosen for one declaration on one device.

A candidate is a backend, a form, a chunk size and that backend's knobs. The space is derived
from the analysis (the forms that are exact for the declaration) and the backend's knobs; for
GPU targets, candidates whose kernels (compiled ahead of time, no GPU needed) exceed shared
memory or spill registers are dropped before any timing.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from ..lowering.analysis import analyze
from ..lowering.forms import default_chunk


@dataclass(frozen=True)
class Candidate:
    backend: str                       # "tvm" | "torch" | "triton" | "py:module:function"
    form: str
    chunk: int | None = None
    knobs: tuple[tuple[str, object], ...] = field(default=())

    @property
    def knob_dict(self) -> dict:
        return dict(self.knobs)

    def label(self) -> str:
        parts = [self.backend, self.form]
        if self.chunk:
            parts.append(f"chunk={self.chunk}")
        parts += [f"{k}={v}" for k, v in self.knobs]
        return " ".join(parts)

    def to_json(self) -> dict:
        return {"backend": self.backend, "form": self.form, "chunk": self.chunk,
                "knobs": [list(kv) for kv in self.knobs]}

    @staticmethod
    def from_json(d: dict) -> "Candidate":
        return Candidate(d["backend"], d["form"], d.get("chunk"),
                         tuple((k, v) for k, v in d.get("knobs", [])))


def _knobs(**kw) -> tuple[tuple[str, object], ...]:
    return tuple(sorted(kw.items()))


def default_candidate(program, device: str = "cpu") -> Candidate:
    """What ``rk.compile(decl)`` runs without tuning: the TVM sequential kernel on CPU, the
    Triton kernels of the first exact form on a GPU."""
    if device == "cuda":
        rec = analyze(program)
        form = rec.forms[0]
        chunk = min(32, default_chunk(rec)) if form.startswith("chunk") else None
        return Candidate("triton", form, chunk)
    from ..backends.tvm_backend import DEFAULT_KNOBS
    return Candidate("tvm", "sequential", None, _knobs(**DEFAULT_KNOBS))


def config_space(program, device: str = "cpu", effort: str = "full") -> list[Candidate]:
    """Every candidate for ``program`` on ``device`` ("cpu" or "cuda"), the default first.
    "quick" keeps the knob values that matter most (the form, the chunk size, pipelining)."""
    rec = analyze(program)
    out = [default_candidate(program, device)]
    quick = effort == "quick"
    for form in rec.forms:
        if device == "cuda":
            out += _triton_space(form, quick)
        else:
            out += _cpu_space(form, quick)
    seen, uniq = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            uniq.append(c)
    return uniq


def _cpu_space(form: str, quick: bool) -> list[Candidate]:
    if form == "sequential":
        vec = (1024,) if quick else (1024, 0)
        unroll = (0,) if quick else (0, 8)
        return [Candidate("tvm", form, None, _knobs(vectorize=v, unroll=u, parallel=p,
                                                    pipeline=pl, block=b))
                for v, u, p, pl, b in itertools.product(
                    vec, unroll, (True, False) if not quick else (True,), (True, False),
                    (32, 0) if quick else (32, 16, 0))]
    if form == "scan":
        return [Candidate("tvm", form), Candidate("torch", form)]
    chunks = (16, 32, 64) if quick else (16, 32, 64, 128)
    return [Candidate(b, form, c) for b in ("tvm", "torch") for c in chunks]


def _triton_space(form: str, quick: bool) -> list[Candidate]:
    if form in ("sequential", "scan"):
        return [Candidate("triton", form, None, _knobs(block_v=bv, num_warps=w))
                for bv in ((32, 64) if quick else (16, 32, 64, 128)) for w in (2, 4, 8)]
    return [Candidate("triton", form, c, _knobs(num_warps=w, num_stages=s, block_v=bv))
            for c in ((16, 32) if quick else (16, 32, 64))
            for w in ((4, 8) if quick else (4, 8, 16))
            for s in ((2,) if quick else (1, 2, 3))
            for bv in ((64,) if quick else (32, 64))]


def prune_static(program, cands: list[Candidate], sizes: dict[str, int], H: int,
                 arch: str = "sm_90") -> tuple[list[Candidate], dict[Candidate, str]]:
    """Drop Triton candidates whose kernels, compiled ahead of time for ``arch``, exceed the
    device's shared memory or spill registers. Returns (kept, {dropped: why})."""
    from ..backends import triton_backend as tb
    from ..lowering.forms import lower
    kept, dropped = [], {}
    for c in cands:
        if c.backend != "triton":
            kept.append(c)
            continue
        cfg = tb.check_config(c.knob_dict)
        try:
            tp = None if c.form == "sequential" else lower(program, c.form, c.chunk)
            src = tb.module_source(program, tp, sizes, H, cfg)
            report = tb.aot_compile(src, arch, cfg)
        except Exception as e:  # noqa: BLE001 - a candidate that does not compile is dropped
            dropped[c] = f"does not compile for {arch}: {type(e).__name__}: {e}"[:300]
            continue
        bad = [r for r in report if r["shared"] > tb.SHARED_LIMIT[arch] or
               (r["spill_bytes"] or 0) > 0]
        if bad:
            r = bad[0]
            dropped[c] = (f"{r['kernel']}: {r['shared']} B shared (limit "
                          f"{tb.SHARED_LIMIT[arch]}), {r['spill_bytes']} B spilled")
        else:
            kept.append(c)
    return kept, dropped
