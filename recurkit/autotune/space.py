"""Config spaces: what can be chosen for one declaration on one device.

A candidate is a backend, a form, a chunk size and that backend's knobs. The space is derived
from the analysis (the forms that are exact for the declaration) and each registered
backend's tuning space; candidates a backend's static check rules out (for Triton on GPU
targets: kernels, compiled ahead of time with no GPU, that exceed shared memory or spill
registers) are dropped before any timing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .. import backends
from ..backends.base import CHUNK_FORMS
from ..lowering.analysis import analyze


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


def _device_type(device: str) -> str:
    return "cuda" if device == "cuda" else "cpu"


def _tuned_backends(backend: str | None) -> list:
    return [backends.get(backend)] if backend is not None else list(backends.ranked())


def default_candidate(program, device: str = "cpu", backend: str | None = None,
                      form: str | None = None, chunk: int | None = None) -> Candidate:
    """The baseline the tuner times first: what the first backend (in rank order) that is
    tuned on ``device`` runs untuned (on CPU the TVM sequential kernel, on a GPU the Triton
    kernels of the first exact form), or ``backend``'s, with ``form`` / ``chunk`` fixed."""
    dev = _device_type(device)
    rec = analyze(program)
    for b in _tuned_backends(backend):
        if backend is None and not any(b.tuning_space(program, f, dev, True)
                                       for f in rec.forms):
            continue
        f, c, k = b.default_candidate(program, form, chunk)
        return Candidate(b.name, f, c, _knobs(**k))
    raise ValueError(f"no backend is tuned on {device!r}")


def config_space(program, device: str = "cpu", effort: str = "full", *,
                 backend: str | None = None, form: str | None = None,
                 chunk: int | None = None, knobs: dict | None = None) -> list[Candidate]:
    """Every candidate for ``program`` on ``device`` ("cpu" or "cuda"), the default first:
    each backend's tuning space (``Backend.tuning_space``) over the exact forms. "quick" keeps
    the knob values that matter most (the form, the chunk size, pipelining). ``backend``,
    ``form``, ``chunk`` and ``knobs`` narrow the space to candidates with those values (given
    knobs are set in every candidate of that backend)."""
    dev = _device_type(device)
    rec = analyze(program)
    if form is not None and form not in rec.forms:
        raise ValueError(f"form {form!r} is not exact for {program.name} (exact forms: "
                         f"{', '.join(rec.forms)})")
    if knobs and backend is None:
        raise ValueError("knobs with autotune: name the backend they configure")
    forms = [form] if form is not None else list(rec.forms)
    quick = effort == "quick"
    fixed = backends.get(backend).check_knobs(knobs) if knobs else {}
    fixed = {k: fixed[k] for k in (knobs or {})}
    if backend is not None and not backends.get(backend).runs_on(dev):
        raise ValueError(f"backend {backend!r} does not run on {device!r}")
    out = [default_candidate(program, device, backend, form, chunk)]
    for f in forms:   # by form, then by backend in rank order
        for b in _tuned_backends(backend):
            if f in b.forms:
                out += [Candidate(b.name, f, c, _knobs(**k))
                        for c, k in b.tuning_space(program, f, dev, quick)]
    if chunk is not None:
        out = [c if c.chunk is None or c.form not in CHUNK_FORMS else
               Candidate(c.backend, c.form, chunk, c.knobs) for c in out]
    if fixed:
        out = [Candidate(c.backend, c.form, c.chunk, _knobs(**{**c.knob_dict, **fixed}))
               for c in out]
    seen, uniq = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            uniq.append(c)
    return uniq


def prune_static(program, cands: list[Candidate], sizes: dict[str, int], H: int,
                 arch: str = "sm_90", dtype: str = "float32"
                 ) -> tuple[list[Candidate], dict[Candidate, str]]:
    """Drop candidates that their backend's static check (``Backend.static_check``: for
    Triton, kernels compiled ahead of time for ``arch`` that exceed the device's shared
    memory or spill registers, with inputs in ``dtype``, a torch dtype's name) rules out.
    Returns (kept, {dropped: why})."""
    kept, dropped = [], {}
    for c in cands:
        why = None if c.backend.startswith("py:") else backends.get(c.backend).static_check(
            program, c.form, c.chunk, c.knob_dict, sizes, H, arch, dtype)
        if why is None:
            kept.append(c)
        else:
            dropped[c] = why
    return kept, dropped
