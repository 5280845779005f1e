"""The prologue's backward as IR: the gradients of a call's tensors from the cotangents the
chunk-form backward computes for the prologue's values, for a renderer that evaluates it per
token where those cotangents are made (the Triton grads kernel), instead of the host running
autograd through the prologue.

The chunk-form backward (``chunk_adjoint``) ends with the cotangent of every prologue value
it reads (``meta["grads"]``: ``read_q``, ``write_a0``, ``log_gate_k``, ...), per token. What
computed those values from the call's tensors (scales, norms, gates, betas, a readout's
post-scale and constant) is the prologue: per-token IR over the declaration's dims. Reverse
mode over it, with the derivative rules of ``vjp``, gives per token the cotangent of every
input as IR whose leaves are

- ``input`` nodes of role ``cotangent`` (attr ``name``: the tile value holding a prologue
  value's cotangent in the grads stage, or the readout ``h`` before its post-scale), and
- an ``input`` node of role ``d_out`` named ``D_O``: the output's cotangent as given (the
  post-scale's cotangent is ``D_O * h``, the constant's ``D_O``),

besides the prologue's own inputs. A token input's gradient is that IR; a per-head
parameter's is its sum over the tokens (the IR gives each token's share).
"""
from __future__ import annotations

from ..ir.node import F32, Node, toposort
from .vjp import DerivativeError, Vjp

#: the output's cotangent as the call gives it (the readout's cotangent ``d_h`` is it times
#: the post-scale)
D_O = "d_o"


def cotangent_leaf(name: str, dims: tuple[str, ...]) -> Node:
    """A leaf of the prologue's backward: the per-token cotangent held in tile value ``name``."""
    return Node("input", (), tuple(dims), F32, (("role", "cotangent"), ("name", name)))


def prologue_vjp(program, prologue: dict[str, Node], grads: dict[str, str],
                 h: str | None, vdim: str) -> tuple[dict[str, Node] | None, str]:
    """(input name -> the IR of its per-token gradient, "") for the inputs of role token or
    param that the prologue values in ``grads`` (role -> tile value of its cotangent), the
    post-scale ``read_post`` and the constant ``out_const`` depend on; (None, why) where a
    derivative rule is missing or the post-scale's cotangent needs ``h`` and there is none."""
    vjp = Vjp(program, suffix="_prologue_grad")
    cot: dict[int, Node] = {}

    def seed(n: Node, g: Node) -> None:
        g = vjp.fit(g, n.dims)
        cot[id(n)] = vjp.add(cot.get(id(n)), g)

    for role, value in grads.items():
        n = prologue[role]
        seed(n, cotangent_leaf(value, n.dims))
    d_o = Node("input", (), (vdim,), F32, (("role", "d_out"), ("index", -1), ("name", D_O)))
    if "read_post" in prologue:
        if h is None:
            return None, "the post-scale's cotangent needs the readout h, which is not kept"
        seed(prologue["read_post"], vjp.op("mul", d_o, cotangent_leaf(h, (vdim,))))
    if "out_const" in prologue:
        seed(prologue["out_const"], d_o)
    roots = [prologue[r] for r in (*grads, "read_post", "out_const") if r in prologue]
    out: dict[str, Node] = {}
    try:
        for n in reversed(toposort(roots)):
            g = cot.get(id(n))
            if g is None:
                continue
            if n.op == "input" and n.role in ("token", "param"):
                out[n.attr("name")] = g
            if not n.args:   # inputs, constants
                continue
            for a, c in zip(n.args, vjp.vjp(n, g)):
                if c is not None:
                    cot[id(a)] = vjp.add(cot.get(id(a)), c)
    except DerivativeError as e:
        return None, str(e)
    return out, ""
