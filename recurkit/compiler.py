"""``rk.compile``: a declaration in, an op with the declaration's call signature out."""
from __future__ import annotations

import contextlib
import contextvars
import hashlib

import torch

from . import backends
from .backends import AUTO
from .backends.shared.adjoint import check_backward
from .custom_op import register
from .ir import CallError, Program, as_program, bind_call
from .ir.bind import signature_names

DEVICE_WORDS = {"cpu": "CPU", "cuda": "CUDA"}
# tuned runners and winners by config digest: ops compiled with the same config share one
# custom op (whose kernel is the first one's forward), so they share what it tuned too
_TUNED: dict[str, dict] = {}


def resolve_backend(backend: str) -> str:
    if backend == AUTO:
        return backend
    return backends.get(backend).name   # a ValueError lists the choices


def _device_error(b, device) -> CallError:
    where = " or ".join(DEVICE_WORDS.get(d, d) for d in b.devices)
    return CallError(f"backend '{b.name}' runs on {where} tensors, got device {device}")


class CompiledOp:
    """A compiled declaration. Call it like the declaration's inputs, in order or by name:

    ``op(*inputs, initial_state=None, output_final_state=False, cu_seqlens=None)``
    returns ``(output [B, T, H, *out_dims], final_state [N, H, *state_dims] or None)``.
    """

    def __init__(self, program: Program, backend: str, form: str | None = None,
                 chunk: int | None = None, knobs: dict | None = None,
                 autotune: bool | str = False, backward: str = "auto"):
        self.program, self.backend = program, backend
        self.backward = check_backward(backward)
        self.knobs = None
        self.autotune = _effort(autotune)
        self._op = None
        self._digest_value = None
        self._asked = (form, chunk)
        self._auto_runs: dict[str, object] = {}
        self.tile_program = None
        if self.autotune:   # tuned within what was fixed: the backend, form, chunk, knobs
            self._space = {"backend": None if backend == AUTO else backend, "form": form,
                           "chunk": chunk, "knobs": dict(knobs) if knobs else None}
        if backend == AUTO:
            if knobs is not None:
                what = "knobs with autotune: name the backend they configure" if \
                    self.autotune else "knobs= configures one backend: name it"
                raise ValueError(f"{what} (backends with knobs: "
                                 f"{', '.join(backends.with_knobs())})")
            fallback = backends.choose("recurrence", form, "cpu", grad=True)
            self._fallback = fallback.name   # what runs where no kernel backend takes a call
            self.form, self.tile_program = fallback.prepare(program, form, chunk)
        else:
            b = self._backend = backends.get(backend)
            if knobs is not None:
                if not b.knob_defaults:
                    raise ValueError(f"knobs= configures the backends with knobs "
                                     f"({', '.join(backends.with_knobs())}); backend "
                                     f"{backend!r} takes none")
                self.knobs = b.check_knobs(knobs)
            self.form, self.tile_program = b.prepare(program, form, chunk)
            self._run = b.run_fn(self.form, self.tile_program, self.knobs)
        self.__name__ = program.name
        self.__doc__ = (f"{program.name}({', '.join(signature_names(program))}) "
                        f"[backend={backend}, form={self.form}]")

    def __call__(self, *args, **kwargs):
        """Stateful declarations run through this op's torch custom op (see ``torch_op``), so
        that autograd and ``torch.compile`` see one opaque op; stateless ones run directly.
        ``cp_group``: the sequence split along T over a process group's ranks (``context``)."""
        group = kwargs.pop("cp_group", None)
        if group is not None:
            from .context import run_context_parallel
            return run_context_parallel(self, args, kwargs, group)
        bc = bind_call(self.program, args, kwargs, repeat=self.program.new_state is None)
        if self.backend != AUTO and not self._backend.runs_on(bc.device.type):
            raise _device_error(self._backend, bc.device)
        if self.program.new_state is None:
            return self._run_bound(bc)
        return self.torch_op(*args, **kwargs)

    def forward(self, **kw):
        """``(output, final_state)`` for keyword inputs, computed here (not through the custom
        op): the op's kernel, and, for the torch and reference backends, its gradient path."""
        return self._run_bound(bind_call(self.program, (), {**kw, "output_final_state": True}))

    @property
    def torch_op(self):
        """The torch custom op ``torch.ops.recurkit_jit.<name>_<config hash>`` this op calls:
        its kernel is this op's forward; its backward is the generated adjoint (see
        ``compile``'s ``backward``) or recomputes the forward with the torch tile program (the
        reference, for backend='reference') under autograd."""
        if self._op is None:
            digest = self._digest()
            b = None if self.backend == AUTO else self._backend
            if b is not None and b.differentiable:
                grad = self
            elif b is None:   # auto: its differentiable fallback, lowered as asked
                grad = CompiledOp(self.program, self._fallback, *self._asked)
            else:
                grad = CompiledOp(self.program,
                                  backends.choose("recurrence", None, "cpu", grad=True).name)
            adjoint = None if b is not None and b.autograd_only else backends.adjoint_runner(
                self.program, self.backward, self.form, self._asked[1], self.backend,
                self.knobs)
            self._op = register(self.program, f"recurkit_jit::{self.program.name}_{digest}",
                                self.forward, grad.forward, adjoint)
        return self._op

    def _digest(self) -> str:
        """A hash of everything that changes what this op runs (its custom op's name)."""
        if self._digest_value is not None:
            return self._digest_value
        cfg = repr((self.program.content_hash(), self.backend, self.form,
                    self.tile_program.chunk if self.tile_program is not None else None,
                    sorted((self.knobs or {}).items()), self.autotune, self.backward,
                    self._asked, sorted(self._space.items()) if self.autotune else None))
        self._digest_value = hashlib.sha1(cfg.encode()).hexdigest()[:12]
        return self._digest_value

    @property
    def tuned_candidate(self):
        """The candidate the last tuned call ran (None before any)."""
        return _TUNED.get(self._digest(), {}).get("best")

    def _run_bound(self, bc):
        if self.autotune and self._tunable(bc):
            return self._tuned_runner(bc)(bc)
        if self.backend == AUTO:
            return self._auto_runner(bc)(bc)
        if not self._backend.runs_on(bc.device.type):
            raise _device_error(self._backend, bc.device)
        return self._run(bc)

    def _auto_runner(self, bc):
        """backend="auto": the runner of the backend auto takes for this call's device (a
        differentiable one where the call is not a kernel's: under autograd, stateless)."""
        b = backends.choose("recurrence", self._asked[0], bc.device.type,
                            grad=not self._tunable(bc))
        run = self._auto_runs.get(b.name)
        if run is None:
            if b.name == self._fallback:
                form, tp = self.form, self.tile_program   # lowered at compile time
            else:
                form, tp = b.prepare(self.program, *self._asked)
            run = self._auto_runs[b.name] = b.run_fn(form, tp, None)
        return run

    def _tuned_runner(self, bc):
        """The tuned candidate for this call's device, dtype and shape bucket: from the
        tuning cache, or tuned now (with a progress line) and stored."""
        from .autotune import tune
        from .autotune.cache import shape_bucket
        from .autotune.worker import build_bound
        shape = {"B": bc.B, "T": bc.T, "H": bc.H, "N": bc.N, "sizes": dict(bc.sizes)}
        dtype = str(next(iter(bc.tensors.values())).dtype).replace("torch.", "")
        device = "cuda" if bc.device.type == "cuda" else "cpu"
        key = (device, dtype, shape_bucket(bc.sizes, bc.B, bc.T, bc.H, bc.N))
        tuned = _TUNED.setdefault(self._digest(), {})
        hit = tuned.get(key)
        group = TUNE_GROUP.get()
        if group is not None:   # one rank tunes, the others receive its winner
            best = _shared_winner(group, hit, bc.device, lambda: tune(
                self.program, shape, effort=self.autotune, dtype=dtype, device=device,
                **self._space).best)
            if best is not None:
                hit = tuned[key] = (best, build_bound(self.program, best))
        if hit is None:
            res = tune(self.program, shape, effort=self.autotune, dtype=dtype, device=device,
                       **self._space)
            hit = tuned[key] = (res.best, build_bound(self.program, res.best))
        tuned["best"] = hit[0]
        return hit[1]

    def _tunable(self, bc) -> bool:
        """autotune: stateful calls on CPU or CUDA, computed without autograd (as the custom
        op's kernel always is; its backward recomputes with the torch backend); others run
        as backend='auto' would."""
        if bc.device.type not in ("cpu", "cuda") or self.program.new_state is None:
            return False
        given = getattr(bc.tensors, "given", bc.tensors)   # grouped inputs not repeated
        tensors = list(given.values()) + ([bc.initial_state] if bc.initial_state
                                          is not None else [])
        return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))

    def __repr__(self) -> str:
        if self.backend == AUTO:
            fb = backends.choose("recurrence", self._asked[0], "cpu", grad=True)
            cpu = fb if self.program.new_state is None else \
                backends.choose("recurrence", self._asked[0], "cpu")
            chunk = f" chunk={self.tile_program.chunk}" if self.tile_program.chunk else ""
            first = "" if cpu is fb else \
                f"{cpu.name} {cpu.prepare(self.program, *self._asked)[0]} on CPU, else "
            return f"<rk.compile {self.program.name} backend=auto: {first}{fb.name} " \
                   f"{self.form}{chunk}>"
        chunk = f" chunk={self.tile_program.chunk}" if self.tile_program is not None and \
            self.tile_program.chunk else ""
        return f"<rk.compile {self.program.name} backend={self.backend} form={self.form}{chunk}>"


# the process group whose ranks tune together (set by context-parallel calls, or by
# ``tuning_group``): the first rank tunes, the others receive its winner
TUNE_GROUP: contextvars.ContextVar = contextvars.ContextVar("tune_group", default=None)


@contextlib.contextmanager
def tuning_group(group):
    """Within this block, autotuned ops called on every rank of ``group`` in step (as under
    DDP) tune on the group's first rank only: the others receive its winner (one all-reduce
    of a flag per tuned call; a broadcast when a rank has not tuned that call yet)."""
    token = TUNE_GROUP.set(group)
    try:
        yield
    finally:
        TUNE_GROUP.reset(token)


def _shared_winner(group, hit, device, tune_here):
    """The candidate for a tuned call on every rank of ``group``: None where every rank
    already has one; else the first rank's (its own, or tuned now), broadcast."""
    import torch.distributed as dist
    if dist.get_world_size(group) == 1:
        return None
    dev = device if dist.get_backend(group) != "gloo" else torch.device("cpu")
    miss = torch.tensor([0 if hit is not None else 1], device=dev)
    dist.all_reduce(miss, group=group)
    if not int(miss.item()):
        return None
    box = [None]
    if dist.get_rank(group) == 0:
        try:
            box[0] = hit[0] if hit is not None else tune_here()
        except Exception as e:   # noqa: BLE001 - said to every rank, then raised
            box[0] = e
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    if isinstance(box[0], Exception):
        raise RuntimeError(f"autotuning on the group's first rank failed: {box[0]!r}") \
            from (box[0] if dist.get_rank(group) == 0 else None)
    return box[0]


def _effort(autotune) -> str | None:
    if autotune is False or autotune is None:
        return None
    if autotune is True:
        return "quick"
    if autotune in ("quick", "full"):
        return autotune
    raise ValueError(f"autotune must be True, False, 'quick' or 'full', got {autotune!r}")


def compile(decl, backend: str = "auto", *, form: str | None = None,  # noqa: A001
            chunk: int | None = None, knobs: dict | None = None,
            autotune: bool | str = False, backward: str = "auto") -> CompiledOp:
    """Compile a declaration. (A tiled declaration, ``@rk.tiled``, compiles to a
    ``recurkit.tiled_op.TiledTorchOp``: forward and generated backward kernels as custom ops,
    backend "auto" (TVM on CPU, Triton on CUDA), "tvm", "triton" or "torch".)

    backend: "auto" (per call: "tvm" for CPU tensors, else "torch"; gradients recompute the
    forward with "torch"),
    "torch" (tile programs run with batched torch ops),
    "tvm" (compiled CPU kernels; the sequential form unless ``form`` says otherwise),
    "triton" (generated Triton kernels: on the GPU for CUDA tensors, in Triton's interpreter
    for CPU tensors; the first exact form by default) or "reference" (the step-by-step
    interpreter). form: "chunk_gated", "chunk_wy", "scan" or
    "sequential" (default: the first exact form, see ``rk.analyze``); chunk: 16, 32, 64, 128
    (default: 64, or 16 with per-channel gates; at most 32 for "triton"). knobs: for "tvm"
    the sequential kernel's schedule (``vectorize``, ``unroll``, ``parallel``, ``pipeline``;
    see ``recurkit.backends.tvm.sequential.DEFAULT_KNOBS``), for "triton" the launch config
    (``num_warps``, ``num_stages``, ``block_v``, ``precision``, ``intermediates``; see
    ``recurkit.backends.triton.runtime.DEFAULT_CONFIG``). autotune: True (= "quick") or
    "full": on the first call (CPU or CUDA) of each shape bucket, measure the
    candidates (forms, chunk sizes, backends, knobs; within ``backend``, ``form``, ``chunk``
    and ``knobs`` where they are given), each verified against the reference, keep the
    fastest in the tuning cache and run it; later calls and processes reuse it.
    backward (gradients of stateful declarations): "auto" (on CUDA, the chunk-form backward
    as Triton kernels; on CPU the sequential adjoint as one TVM kernel, or for
    backend="triton" the chunk-form backward in Triton's interpreter; the forward recomputed
    under autograd where neither applies), "chunk" (the chunk-form backward on any device:
    torch ops on CPU), "adjoint" (the sequential adjoint everywhere: off the CPU, a torch
    step loop, slow) or "autograd" (always the recompute). See docs/torch.md.
    """
    p = as_program(decl)
    if p.is_tiled:
        if form or chunk or knobs or autotune:
            raise ValueError(f"{p.name} is a tiled declaration: form, chunk, knobs and "
                             "autotune apply to recurrences")
        from .tiled_op import compile_tiled
        return compile_tiled(p, resolve_backend(backend))
    backend = resolve_backend(backend)
    if backend == AUTO and form is not None and not autotune:
        # a form asked of "auto": the backend auto takes for that form on a CPU (the TVM
        # kernel for "sequential", else the torch backend), fixed here
        backend = backends.choose("recurrence", form, "cpu").name
    return CompiledOp(p, backend, form, chunk, knobs, autotune, backward)


def codegen(decl, backend: str = "triton", *, form: str | None = None,
            chunk: int | None = None, sizes: dict[str, int] | None = None, H: int = 4,
            knobs: dict | None = None) -> str:
    """The source the backend generates for ``decl`` at the given dim sizes (default 64 for
    every dim) and head count: a Triton module (kernels and their ``launch`` function) for
    "triton", TVMScript (one function per kernel) for "tvm". For a tiled declaration: the
    forward and backward kernels (forward, rows, columns, inverse); for one with rk.Bits codes
    (the LUT form), what this CPU runs below ``backends.tvm.lut.dense_from()`` samples (TVM: the shuffle kernels
    on an AVX2 CPU, else the byte table and look-up kernels) or the module holding the table,
    look-up and decode-and-dot kernels (Triton).
    ``sizes`` of packed dims count positions (multiples of 8)."""
    p = as_program(decl)
    if backend not in backends.with_source():
        raise ValueError(f"codegen shows generated source for "
                         f"{' or '.join(map(repr, sorted(backends.with_source())))}, got "
                         f"{backend!r}")
    b = backends.get(backend)
    sizes = {**{d: 64 for d in p.dims}, **(sizes or {})}
    unknown = set(sizes) - set(p.dims)
    if unknown:
        raise ValueError(f"sizes names dims {sorted(unknown)} that {p.name} does not have "
                         f"(its dims: {', '.join(p.dims)})")
    if p.is_tiled:
        from .lowering.lut import has_bits, lower_lut
        from .lowering.tiled import lower_tiled
        return b.codegen_tiled(lower_lut(p) if has_bits(p) else lower_tiled(p), sizes)
    if p.new_state is None:
        raise ValueError(f"{p.name} is stateless: nothing to generate")
    op = CompiledOp(p, backend, form, chunk, knobs)
    tp = op.tile_program
    from .backends.shared.rotation import frame_of
    if frame_of(p) is not None:   # a rotating state: its rotation-free declaration's kernels
        p = frame_of(p).program
    if tp is not None and tp.meta.get("expansion") is not None:   # sub-steps: the
        p = tp.meta["expansion"].program                           # expanded declaration's
        sizes = {d: v for d, v in sizes.items() if d in p.dims}
    return b.codegen(p, tp, sizes, H, op.knobs)
