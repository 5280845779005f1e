"""``rk.compile``: a declaration in, an op with the declaration's call signature out."""
from __future__ import annotations

import hashlib

import torch

from .backends.dispatch import runner
from .backends.torch_backend import run_tile
from .backends.triton_backend import check_config
from .backends.triton_backend import default_chunk as triton_default_chunk
from .backends.tvm_backend import check_knobs, run_tvm_sequential
from .ir import CallError, Program, Recurrence, bind_call
from .backends.adjoint_host import adjoint_runner, check_backward
from .custom_op import register
from .ir.bind import signature_names
from .lowering.forms import lower

BACKENDS = ("reference", "torch", "tvm", "triton")
PLANNED: tuple[str, ...] = ()


def as_program(decl) -> Program:
    if isinstance(decl, Recurrence):
        return decl.program
    if isinstance(decl, Program):
        return decl
    inner = getattr(decl, "decl", None)  # a built-in op exposes its declaration
    if isinstance(inner, Recurrence):
        return inner.program
    raise TypeError(f"expected an @rk.recurrence declaration, got {type(decl).__name__}")


def resolve_backend(backend: str) -> str:
    if backend in BACKENDS or backend == "auto":
        return backend
    if backend in PLANNED:
        raise NotImplementedError(
            f"backend '{backend}' is not available in this version of recurkit; available: "
            f"{', '.join(['auto', *BACKENDS])}")
    raise ValueError(f"unknown backend {backend!r}; choose one of "
                     f"{', '.join(['auto', *BACKENDS, *PLANNED])}")


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
        self._tuned: dict[tuple, object] = {}
        self._op = None
        if self.autotune and (backend != "auto" or form or chunk or knobs):
            raise ValueError("autotune chooses the backend, form, chunk and knobs itself: "
                             "leave backend='auto' and form/chunk/knobs unset")
        if knobs is not None:
            if backend not in ("tvm", "triton"):
                raise ValueError(f"knobs= configures the TVM and Triton backends; backend is "
                                 f"{backend!r}")
            self.knobs = check_knobs(knobs) if backend == "tvm" else check_config(knobs)
        self.tile_program = None
        if backend == "auto" and form is not None:
            backend = self.backend = "tvm" if form == "sequential" else "torch"
        if backend in ("torch", "auto"):
            self.tile_program = lower(program, form, chunk)
            self.form = self.tile_program.form
        elif backend in ("tvm", "triton"):
            if program.new_state is None:
                raise ValueError(f"backend '{backend}' compiles stateful declarations; "
                                 f"{program.name} is stateless")
            if backend == "triton" and form is None:
                form = lower(program).form   # the first exact form, as for "torch"
            if form in ("chunk_gated", "chunk_wy") and backend == "triton":
                self.tile_program = lower(program, form, chunk or triton_default_chunk(program))
            elif form in ("chunk_gated", "chunk_wy", "scan"):
                self.tile_program = lower(program, form, chunk)
            self.form = form or "sequential"
        else:
            if form not in (None, "sequential"):
                raise ValueError(f"backend 'reference' runs the step itself; form={form!r} "
                                 "needs backend='torch'")
            self.form = "reference"
        if backend != "auto":
            self._run = runner(backend, self.form, self.tile_program, self.knobs)
        self.__name__ = program.name
        self.__doc__ = (f"{program.name}({', '.join(signature_names(program))}) "
                        f"[backend={backend}, form={self.form}]")

    def __call__(self, *args, **kwargs):
        """Stateful declarations run through this op's torch custom op (see ``torch_op``), so
        that autograd and ``torch.compile`` see one opaque op; stateless ones run directly."""
        bc = bind_call(self.program, args, kwargs)
        if self.backend == "tvm" and bc.device.type != "cpu":
            raise CallError(f"backend 'tvm' runs on CPU tensors, got device {bc.device}")
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
            cfg = repr((self.program.content_hash(), self.backend, self.form,
                        self.tile_program.chunk if self.tile_program is not None else None,
                        sorted((self.knobs or {}).items()), self.autotune, self.backward))
            digest = hashlib.sha1(cfg.encode()).hexdigest()[:12]
            if self.backend in ("torch", "reference"):
                grad = self
            else:
                grad = CompiledOp(self.program, "torch")
            adjoint = None if self.backend == "reference" else adjoint_runner(
                self.program, self.backward)
            self._op = register(self.program, f"recurkit_jit::{self.program.name}_{digest}",
                                self.forward, grad.forward, adjoint)
        return self._op

    def _run_bound(self, bc):
        if self.autotune and self._tunable(bc):
            return self._tuned_runner(bc)(bc)
        if self.backend == "auto":
            return (run_tvm_sequential if self._tvm_fits(bc) else
                    lambda b: run_tile(self.tile_program, b))(bc)
        if self.backend == "tvm" and bc.device.type != "cpu":
            raise CallError(f"backend 'tvm' runs on CPU tensors, got device {bc.device}")
        return self._run(bc)

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
        run = self._tuned.get(key)
        if run is None:
            res = tune(self.program, shape, effort=self.autotune, dtype=dtype, device=device)
            self.tuned_candidate = res.best
            run = self._tuned[key] = build_bound(self.program, res.best)
        return run

    def _tunable(self, bc) -> bool:
        """autotune: stateful calls on CPU or CUDA, computed without autograd (as the custom
        op's kernel always is; its backward recomputes with the torch backend); others run
        as backend='auto' would."""
        if bc.device.type not in ("cpu", "cuda") or self.program.new_state is None:
            return False
        tensors = list(bc.tensors.values()) + ([bc.initial_state] if bc.initial_state
                                               is not None else [])
        return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))

    def _tvm_fits(self, bc) -> bool:
        """auto: the compiled TVM kernel for stateful CPU calls computed without autograd
        (the custom op's kernel); the torch backend, which autograd differentiates, when
        called for gradients directly (``forward`` under autograd)."""
        return bc.device.type == "cpu" and self._tunable(bc)

    def __repr__(self) -> str:
        if self.backend == "auto":
            return (f"<rk.compile {self.program.name} backend=auto: tvm sequential on CPU, "
                    f"else torch {self.form} chunk={self.tile_program.chunk}>")
        chunk = f" chunk={self.tile_program.chunk}" if self.tile_program is not None and \
            self.tile_program.chunk else ""
        return f"<rk.compile {self.program.name} backend={self.backend} form={self.form}{chunk}>"


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
    see ``recurkit.backends.tvm_backend.DEFAULT_KNOBS``), for "triton" the launch config
    (``num_warps``, ``num_stages``, ``block_v``, ``precision``; see
    ``recurkit.backends.triton_backend.DEFAULT_CONFIG``). autotune: True (= "quick") or
    "full": on the first call (CPU or CUDA) of each shape bucket, measure the
    candidates (forms, chunk sizes, backends, knobs), each verified against the reference,
    keep the fastest in the tuning cache and run it; later calls and processes reuse it.
    backward (gradients of stateful declarations): "auto" (the generated adjoint, a compiled
    TVM kernel, for CPU tensors; elsewhere the forward recomputed with the torch backend under
    autograd), "adjoint" (the generated adjoint everywhere: off the CPU, a torch step loop,
    slow) or "autograd" (always the recompute).
    """
    p = as_program(decl)
    if p.is_tiled:
        if form or chunk or knobs or autotune:
            raise ValueError(f"{p.name} is a tiled declaration: form, chunk, knobs and "
                             "autotune apply to recurrences")
        from .tiled_op import compile_tiled
        return compile_tiled(p, resolve_backend(backend) if backend != "reference"
                             else "torch")
    return CompiledOp(p, resolve_backend(backend), form, chunk, knobs, autotune, backward)


def codegen(decl, backend: str = "triton", *, form: str | None = None,
            chunk: int | None = None, sizes: dict[str, int] | None = None, H: int = 4,
            knobs: dict | None = None) -> str:
    """The source the backend generates for ``decl`` at the given dim sizes (default 64 for
    every dim) and head count: a Triton module (kernels and their ``launch`` function) for
    "triton", TVMScript (one function per kernel) for "tvm". For a tiled declaration: the
    forward and backward kernels (forward, rows, columns, inverse); for one with rk.Bits codes
    (the LUT form), what this CPU runs below ``tvm_lut.dense_from()`` samples (TVM: the shuffle kernels
    on an AVX2 CPU, else the byte table and look-up kernels) or the module holding the table,
    look-up and decode-and-dot kernels (Triton).
    ``sizes`` of packed dims count positions (multiples of 8)."""
    p = as_program(decl)
    if backend not in ("triton", "tvm"):
        raise ValueError(f"codegen shows generated source for 'triton' or 'tvm', got "
                         f"{backend!r}")
    sizes = {**{d: 64 for d in p.dims}, **(sizes or {})}
    unknown = set(sizes) - set(p.dims)
    if unknown:
        raise ValueError(f"sizes names dims {sorted(unknown)} that {p.name} does not have "
                         f"(its dims: {', '.join(p.dims)})")
    if p.is_tiled:
        from .lowering.lut import has_bits, lower_lut
        if has_bits(p):   # the LUT form: tables + look-ups (TVM); Triton's module has both ways
            plan = lower_lut(p)
            if backend == "triton":
                from .backends.triton_lut import KERNEL_SOURCE
                return KERNEL_SOURCE
            from .backends import tvm_lut
            if tvm_lut.has_avx2():   # what this CPU runs for small batches
                from .backends.tvm_lut_shuffle import shuffle_source
                return shuffle_source(plan, sizes)
            return tvm_lut.tables_source(plan, sizes) + "\n\n" + tvm_lut.lookup_source(
                plan, sizes)
        from .lowering.tiled import lower_tiled
        plan = lower_tiled(p)
        if backend == "triton":
            from .backends.triton_tiled import module_source as tiled_module
            return tiled_module(plan, sizes)
        from .backends.tvm_tiled import (INVERSE_SOURCE, columns_source, forward_source,
                                         rows_source)
        return "\n\n".join(f(plan, sizes) for f in (forward_source, rows_source,
                                                     columns_source)) + "\n\n" + INVERSE_SOURCE
    if p.new_state is None:
        raise ValueError(f"{p.name} is stateless: nothing to generate")
    op = CompiledOp(p, backend, form, chunk, knobs)
    tp = op.tile_program
    if backend == "triton":
        from .backends.triton_backend import module_source
        return module_source(p, tp, sizes, H, op.knobs)
    from .backends.tvm_backend import sequential_source
    from .backends.tvm_tile import _scan_source, stage_sources
    if tp is None:
        return sequential_source(p, sizes, H, knobs=op.knobs)
    if tp.form == "scan":
        return _scan_source(sizes[p.state.dims[0]], H, "scan_sign" in tp.prologue)
    return "\n\n".join(stage_sources(tp, sizes, H))
