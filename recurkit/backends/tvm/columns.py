"""The backward kernel's walk in column blocks (a mixin of ``tvm.adjoint._AdjGen``).

Where the step acts on one side of the state only (``lowering.columns``: Gated DeltaNet's
columns each evolve on their own, given the tokens), the kernel walks the whole sequence once
per block of columns of the state's last dim L instead of once over the whole state: the
block's column sums (``k^T dS``, ``k^T S``) accumulate in vector registers rather than in
memory, and the scratch of recomputed states is a block's. Sums over the columns (``dk``,
``dq``, the gates' cotangents) are the blocks' shares, added up in their outputs, which
start at zero.

Inside the kernel ``self.sizes[L]`` is the block's width and ``self.full[L]`` the dim's;
buffers over the whole dim (inputs, outputs, checkpoints) are indexed at the block's offset
``vb * width`` (``gidx``), the kernel's own ones (state blocks, scratch) from zero (``lidx``).
"""
from __future__ import annotations

from ...ir.node import Node
from ...lowering.columns import column_kinds


class ColumnBlocks:
    """Column blocks of the walk (see the module docstring); the host sets ``self.L`` and
    ``self.kinds`` from ``_column_blocks``."""

    L: str | None = None
    kinds: dict[int, str] = {}

    def _column_blocks(self, block: int) -> tuple[str | None, dict[int, str]]:
        """(L, kinds): the walk runs on blocks of ``block`` columns of the state's last dim L
        where the step separates along L (``lowering.columns``) and L has more than one
        block; ``self.sizes[L]`` is then the block's width, ``self.full[L]`` the dim's."""
        sd = self.state.dims
        if not sd or block <= 0:
            return None, {}
        L = sd[-1]
        if self.full[L] <= block or self.full[L] % block:
            return None, {}
        leaves = {id(self.state): "col", id(self.adj.d_new): "col"}
        if self.adj.d_out is not None:
            leaves[id(self.adj.d_out)] = "col" if L in self.adj.d_out.dims else "inv"
        roots = [self.p.new_state] + self.adj.roots()
        kinds = column_kinds(roots, L, leaves, {id(f) for f in self.feeds})
        if kinds is None or any(kinds.get(id(n)) != "col" for n in (
                self.p.new_state, self.adj.d_state) if n is not None):
            return None, {}
        self.sizes[L] = block
        return L, kinds

    def block_shape(self, shape) -> tuple[int, ...]:
        """The state's ``shape`` cut to one column block (the scratch's states)."""
        if self.L is None:
            return tuple(shape)
        return (*shape[:-1], self.sizes[self.L])

    def added(self) -> list[bool]:
        """Per feed: whether the kernel adds its cotangent up over the column blocks (the
        output must start at zero)."""
        return [self.partial(d) for d in self.adj.d_feeds]

    def partial(self, n: Node | None) -> bool:
        """A value each column block adds its share of (a sum over the blocked dim)."""
        return n is not None and self.kinds.get(id(n)) == "part"

    def genv(self, env: dict[str, str]) -> dict[str, str]:
        """``env`` indexing a whole buffer: the blocked dim offset by the block's start."""
        if self.L is None or self.L not in env:
            return env
        return {**env, self.L: f"(vb * {self.sizes[self.L]} + {env[self.L]})"}

    def gidx(self, dims, env: dict[str, str]) -> str:
        return super().gidx(dims, self.genv(env))

    def lidx(self, dims, env: dict[str, str]) -> str:
        """Index into a per-block buffer (the scratch, partial sums): from zero."""
        return super().gidx(dims, env)
