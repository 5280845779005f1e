"""The backend protocol: what every backend offers the layers above it.

A backend is one object (a subclass of ``Backend``), registered by name in
``recurkit.backends``. ``rk.compile``, ``rk.codegen``, ``rk.export``, the custom ops and the
autotuner only talk to backends through these methods; none of them tests a backend's name.
A method a backend does not override says "not offered" (``None``, an empty list, or a clear
error naming the backend), so a new backend implements what it runs and nothing else.

Kinds of declaration: ``"recurrence"`` (a stateful ``@rk.recurrence``; stateless ones where
``stateless``), ``"tiled"`` (an ``@rk.tiled`` op: gathered rows, or rk.Bits codes in the LUT
form). Forms: ``"sequential"``, ``"scan"``, ``"chunk_gated"``, ``"chunk_wy"`` (see
``recurkit.lowering``).
"""
from __future__ import annotations

from typing import Callable

from ..ir.bind import BoundCall
from ..lowering.forms import lower
from ..lowering.tile import TileProgram
from .shared.config import merge_defaults

CHUNK_FORMS = ("chunk_gated", "chunk_wy")


class Backend:
    name: str = ""
    #: the forms of a recurrence it runs
    forms: tuple[str, ...] = ()
    #: the declaration kinds it compiles: "recurrence", "tiled"
    kinds: tuple[str, ...] = ("recurrence",)
    #: device types its kernels take (``torch.device.type``); None: any device torch has
    devices: tuple[str, ...] | None = None
    #: device types where this backend's kernels run in an interpreter (correct, slow): used
    #: there only when asked for by name
    interpreted: tuple[str, ...] = ()
    #: it also runs stateless recurrence declarations
    stateless: bool = False
    #: autograd differentiates what it computes (it runs on torch ops)
    differentiable: bool = False
    #: its gradients are always autograd through its own forward (never the generated
    #: backward): the reference, which the generated backward is tested against
    autograd_only: bool = False
    #: its knob schema: every knob with its default (empty: it takes no knobs)
    knob_defaults: dict = {}
    #: what ``knobs=`` is called in its messages
    knob_word: str = "knob"
    #: the order in which backend="auto" asks backends (``auto_for``) and the autotuner
    #: lists their candidates: lower first
    auto_rank: int = 50

    # --- what it runs ----------------------------------------------------------------------
    def runs_on(self, device_type: str) -> bool:
        return self.devices is None or device_type in self.devices

    def auto_for(self, kind: str, form: str | None, device_type: str) -> bool:
        """Whether backend="auto" takes this backend for a ``kind`` declaration (``form``:
        the one asked for, or None) on ``device_type``. The registry asks the backends in
        its auto order; the first that says yes runs the call."""
        return False

    def check_knobs(self, knobs: dict | None) -> dict:
        """``knobs`` checked and merged with the defaults (a ValueError names a bad one)."""
        if not self.knob_defaults:
            if knobs:
                raise ValueError(f"backend {self.name!r} takes no knobs, got "
                                 f"{', '.join(map(repr, knobs))}")
            return {}
        return merge_defaults(knobs, self.knob_defaults, f"{self.knob_word}")

    def default_chunk(self, program, form: str) -> int | None:
        """The chunk size of the chunk forms when none is given (None: lowering's)."""
        return None

    def default_adjoint_chunk(self, program, form: str) -> int | None:
        """The chunk size of the chunk-form backward when none is given (None: lowering's);
        it need not be the forward's (the backward reads only the call's inputs)."""
        return self.default_chunk(program, form)

    def default_form(self, program) -> str:
        """The form compiled when none is asked for."""
        return lower(program).form

    def prepare(self, program, form: str | None, chunk: int | None
                ) -> tuple[str, TileProgram | None]:
        """(the form compiled, its tile program or None where the kernels need none) for
        ``rk.compile(program, backend=<this>, form=..., chunk=...)``."""
        if program.new_state is None and not self.stateless:
            raise ValueError(f"backend '{self.name}' compiles stateful declarations; "
                             f"{program.name} is stateless")
        from .shared.rotation import frame_of
        fr = frame_of(program) if program.new_state is not None else None
        if fr is not None:   # what the kernels run: the rotation-free declaration
            program = fr.program
        form = form or self.default_form(program)
        if self.forms and form not in self.forms:
            raise ValueError(f"backend '{self.name}' runs the forms "
                             f"{', '.join(self.forms)}; got form={form!r}")
        if form == "sequential":   # the token-walking kernels read no tile program
            return form, None
        if form in CHUNK_FORMS and chunk is None:
            chunk = self.default_chunk(program, form)
        return form, lower(program, form, chunk)

    def runner(self, form: str, tp: TileProgram | None, knobs: dict | None
               ) -> Callable[[BoundCall], tuple]:
        """run(bound call) -> (output, final state) for ``form`` (``tp`` from ``prepare``)."""
        raise NotImplementedError(f"backend '{self.name}' runs no recurrences")

    def run_fn(self, form: str, tp: TileProgram | None, knobs: dict | None
               ) -> Callable[[BoundCall], tuple]:
        """``runner``, for calls of the declaration ``prepare`` was given: where its tile
        program is an expanded declaration's (sub-steps, ``lowering.substeps``), the call
        is expanded around the runner; a call of a declaration that rotates its state
        (``lowering.rotation``) runs as its rotation-free declaration's. What the layers above
        call."""
        from .shared.rotation import frame_of, framed_runner
        run = self.runner(form, tp, knobs)
        ex = tp.meta.get("expansion") if tp is not None else None
        if ex is not None:
            from .shared.substeps import expanded_runner
            run = expanded_runner(run, ex)

        def go(bc: BoundCall):   # a rotating state: the rotation-free declaration's call
            fr = frame_of(bc.program)
            return run(bc) if fr is None else framed_runner(run, fr)(bc)
        return go

    # --- generated source -------------------------------------------------------------------
    def codegen(self, program, tp: TileProgram | None, sizes: dict[str, int], H: int,
                knobs: dict | None) -> str:
        """The generated source of a recurrence's kernels at these dim sizes."""
        raise ValueError(f"backend '{self.name}' generates no source")

    def codegen_tiled(self, plan, sizes: dict[str, int]) -> str:
        """The generated source of a tiled declaration's kernels (``plan``: its TiledPlan or
        LutPlan)."""
        raise ValueError(f"backend '{self.name}' generates no source")

    @property
    def generates_source(self) -> bool:
        return type(self).codegen is not Backend.codegen

    # --- tiled declarations -----------------------------------------------------------------
    def tiled_forward(self, plan, tc):
        raise NotImplementedError(f"backend '{self.name}' runs no tiled declarations")

    def tiled_backward(self, plan, tc, dy, need: frozenset[str]) -> dict:
        """The gradients of (at least) the inputs named in ``need``, by name."""
        raise NotImplementedError(f"backend '{self.name}' runs no tiled declarations")

    def run_packed(self, net, x, words: int | None, cache: dict, scores: bool = False):
        """A hard (bit-packed) logic network's integer class counts [N', classes] for bool
        inputs ``x`` (N' >= N rows, the first N are x's), or with ``scores`` the float32
        scores (count / tau) when the backend computes them (else counts: the caller
        divides). ``cache``: what the backend may keep between calls;
        ``cache["program"]`` is the network's optimised ``GateProgram``. ``words``: int64
        words per block, None to choose."""
        raise NotImplementedError(f"backend '{self.name}' runs no hard logic networks")

    def binds(self, plan, x) -> bool:
        """Whether this backend runs rows ``x`` of ``plan``'s op through a kernel that
        ``bind_weights`` can bind to fixed weights (checked per call: keep it cheap)."""
        return False

    def bind_weights(self, plan, tc) -> Callable:
        """For a layer's hot path: ``f(x)``, the op's result for rows like ``tc``'s (those
        ``binds`` takes), bit for bit, with the weights of ``tc`` bound (checked once)."""
        raise NotImplementedError(f"backend '{self.name}' binds no weights")

    def forget_weights(self, weights) -> None:
        """Drop what ``bind_weights`` derived from ``weights``."""

    # --- gradients --------------------------------------------------------------------------
    def adjoint_kernel(self, device_type: str) -> Callable | None:
        """A compiled kernel of the generated backward (see ``shared.adjoint``) for tensors
        on ``device_type``, or None. It takes a keyword ``checkpoints``: the chunk states
        the op's forward saved (``shared.checkpoints``), which it may use or ignore."""
        return None

    def chunk_adjoint_kernel(self, device_type: str) -> Callable | None:
        """A kernel of the chunk-form backward (``lowering.chunk_adjoint``; see
        ``shared.chunk_backward``) for tensors on ``device_type``, or None."""
        return None

    def scan_adjoint_kernel(self, device_type: str) -> Callable | None:
        """A kernel of the scan form's backward (the reverse scan; see
        ``shared.scan_backward``) for tensors on ``device_type``, or None."""
        return None

    # --- tuning -----------------------------------------------------------------------------
    def default_candidate(self, program, form: str | None = None, chunk: int | None = None
                          ) -> tuple[str, int | None, dict]:
        """(form, chunk, knobs) that ``rk.compile(program, backend=<this>, form=form,
        chunk=chunk)`` runs: the autotuner's baseline."""
        form, tp = self.prepare(program, form, chunk)
        return form, (tp.chunk if tp is not None and form in CHUNK_FORMS else None), {}

    def tuning_space(self, program, form: str, device_type: str, quick: bool
                     ) -> list[tuple[int | None, dict]]:
        """(chunk, knobs) candidates of ``form`` on ``device_type`` for the autotuner, this
        backend's default first; empty where it is not tuned there."""
        return []

    def model_seconds(self, program, form: str, chunk: int | None, knobs: dict,
                      shape: dict, dtype: str, device: str) -> float | None:
        """A modelled time of this candidate on ``device`` (a name of
        ``backends.triton.traffic.DEVICES``) at ``shape`` = {B, T, H, N, sizes}, computed
        without running it; None where the backend has no model for the form. The autotuner
        ranks GPU candidates with it when no GPU is present."""
        return None

    def static_check(self, program, form: str, chunk: int | None, knobs: dict,
                     sizes: dict[str, int], H: int, arch: str, dtype: str = "float32"
                     ) -> str | None:
        """Why this candidate cannot run well on ``arch`` for calls in ``dtype`` (a torch
        dtype's name, as the autotuner's) found without running it (shared memory, spills), or
        None."""
        return None

    def __repr__(self) -> str:
        return f"<recurkit backend {self.name!r}>"
