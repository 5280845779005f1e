"""``rk.export``: a declaration as a named torch custom op (``torch.ops.<ns>.<name>``); see
``recurkit.custom_op`` for the op's schema, fake impl and backward."""
from __future__ import annotations

from . import backends
from .compiler import CompiledOp, resolve_backend
from .custom_op import TorchOp, register
from .ir import as_program


def export(decl, qualname: str, backend: str = "auto", backward: str = "auto") -> TorchOp:
    """Register ``decl`` as the torch custom op ``qualname`` ("namespace::name") and return a
    callable with the declaration's signature. ``torch.ops.namespace.name`` takes the tensor
    inputs, the scalars (None for their defaults), ``initial_state`` and ``cu_seqlens`` and
    returns ``(output, final_state)``; a tiled declaration's op takes its rows, indices and
    weights and returns the output (its backward is ``torch.ops.namespace.name_backward``).
    Either works with autograd, ``torch.compile`` (no graph
    breaks) and ``torch.library.opcheck``. ``backward`` chooses how a recurrence's gradients
    are computed, as in ``rk.compile``."""
    if not isinstance(qualname, str) or qualname.count("::") != 1 or not all(
            part.isidentifier() for part in qualname.split("::")):
        raise ValueError(f"export name must look like 'namespace::name', got {qualname!r}")
    p = as_program(decl)
    if p.is_tiled:
        from .tiled_op import register_tiled
        return register_tiled(p, qualname, backend)
    if p.new_state is None:
        raise ValueError(f"{p.name} is stateless: export takes recurrences")
    fwd = CompiledOp(p, resolve_backend(backend))
    grad = CompiledOp(p, backends.choose("recurrence", None, "cpu", grad=True).name)
    return register(p, qualname, fwd.forward, grad.forward, backends.adjoint_runner(
        p, backward, fwd.form, None, fwd.backend))
