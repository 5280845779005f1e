"""The sequential kernel's loop nests and column layout (a mixin of ``tvm.sequential._Gen``):
the loops over a value's dims, a node's code as a loop nest, indices into the call's buffers,
the column-blocked layout's plan and, for the GPU rendering, the torch-computed feeds."""
from __future__ import annotations

import torch

from ...ir.node import Node
from .build import vector_lanes
from .fastmath import FAST, fast_steps

STRIP = 32   # the widest blocks a vector state is cut into by default


def _f(v: float) -> str:
    return f"T.float32({float(v)!r})"


class StepCode:
    def _plan_feeds(self) -> None:
        """The GPU kernel's state-free arguments: fed as [B, T, H, *dims] buffers computed by
        torch, except broadcasting products (an outer product k v^T), which are rebuilt from
        their factors in the kernel instead of being stored per token at K x V."""
        def feed(a: Node) -> None:
            if self.dep[id(a)] or a.op == "const" or any(a is f for f in self.feeds):
                return
            if (a.op in self.BINARY or a.op in self.UNARY) and a.dims and all(
                    len(x.dims) < len(a.dims) for x in a.args):
                self.free_inline.add(id(a))
                for x in a.args:
                    feed(x)
                return
            self.feeds.append(a)
        for n in self.step:
            for a in n.args:
                feed(a)
        if self.out_free:
            feed(self.p.output)

    def _column_plan(self) -> tuple[str, int, int] | None:
        """(L, width, blocks) when the kernel runs in column blocks: the state's last dim L
        cut into blocks. Every state-dependent value must then have L and never reduce over
        it (a column of the state evolves by itself), and so must the output. A vector state
        is always cut (by default into the widest blocks of at most ``STRIP`` columns that
        divide L, whole vectors wide where one does; ``_strip_plan`` gives the blocks to
        tasks), a matrix state when the ``columns`` knob asks."""
        sd, w = self.p.state.dims, self.knobs["columns"]
        if not sd or self.out_free or not (w or len(sd) == 1):
            return None
        L = sd[-1]
        if any(n.op in ("rotate", "pairs") or L not in n.dims or L in (n.attr("over") or ())
               for n in self.step):
            return None
        size = self.sizes[L]
        if not w and self._free_reduces_over(L):
            return None   # a state-free sum over L: the kernel makes it when L is whole
        if not w:   # a vector state: the widest divisor of L up to STRIP, whole vectors
            fits = [d for d in range(min(size, STRIP), 0, -1) if size % d == 0]   # widest
            w = next((d for d in fits if d % vector_lanes() == 0), fits[0])
        if size % w or (w >= size and len(sd) > 1):
            return None
        return L, w, size // w

    def _free_reduces_over(self, L: str) -> bool:
        """Whether a state-free value the step reads reduces over L (an l2 norm of a token
        input along the state's dim): column blocks would need it as a torch feed."""
        seen: set[int] = set()
        stack = [a for n in self.step for a in n.args]
        while stack:
            a = stack.pop()
            if id(a) in seen or self.dep[id(a)]:
                continue
            seen.add(id(a))
            if a.op in ("contract", "sum", "max") and L in (a.attr("over") or ()):
                return True
            stack.extend(a.args)
        return False

    def _strip_plan(self, pre: list) -> tuple[int, int] | None:
        """(P, J) for a vector state's column blocks: each sequence's H x blocks cut into P
        tasks of J consecutive blocks, P enough for the threads (at least one task each over
        the call's sequences). A task walks its sequence's tokens once and, per token, its
        blocks in turn: it streams contiguous runs of every row (J x width columns) where a
        task per block would read a few cache lines per row, a page apart."""
        if not self.cb or len(self.p.state.dims) != 1 or pre:
            return None
        total = self.gsizes["__H"] * self.cb[2]
        want = -(-max(1, torch.get_num_threads()) // max(1, self.seqs))
        P = next(d for d in range(min(want, total), total + 1) if total % d == 0)
        return P, total // P

    def strip_blocks(self, ind: int) -> list[str]:
        """The loop over a task's blocks (``strip``), opened at indent ``ind``: the block's
        head, its column offset and its part of the state as ``S``; none without ``strip``."""
        if not self.strip:
            return []
        P, J = self.strip
        w, nb = self.cb[1], self.cb[2]
        pad = "    " * (ind + 1)
        return [f"{'    ' * ind}for j in T.serial({J}):",
                f"{pad}h: T.let = (pp * {J} + j) // {nb}",
                f"{pad}vb: T.let = (pp * {J} + j) % {nb}",
                f"{pad}S = T.decl_buffer(({w},), \"float32\", data=S_all.data, "
                f"elem_offset=j * {w})"]

    def gidx(self, dims, env: dict[str, str]) -> str:
        """Index into a buffer of the call (over the dims' full sizes)."""
        return ", ".join(self.gi(d, env) for d in dims)

    def gi(self, d: str, env: dict[str, str]) -> str:
        """The index along ``d`` into a buffer of the call: in the column-blocked layout,
        a local column plus the block's first."""
        cb = getattr(self, "cb", None)
        if cb and d == cb[0]:
            return f"(vb * {cb[1]} + {env[d]})"
        return env[d]

    def loops(self, dims, body: list[str], ind: int, vector_last: bool = True) -> list[str]:
        out, pad = [], "    " * ind
        dims = [d for d in dims if d != self.tdim]
        vector_last = vector_last and self.tdim is None
        for k, d in enumerate(dims):
            kind = "T.vectorized" if vector_last and k == len(dims) - 1 and \
                self.sizes[d] <= self.knobs["vectorize"] else (
                    "T.unroll" if self.sizes[d] <= self.knobs["unroll"] else "T.serial")
            out.append(f"{pad}for i_{d} in {kind}({self.sizes[d]}):")
            pad += "    "
        return out + [pad + line for line in body]

    def env(self, dims) -> dict[str, str]:
        return {d: ("tx" if d == self.tdim else f"i_{d}") for d in dims}

    def node_code(self, n: Node, ind: int) -> list[str]:
        name = self.names[id(n)]
        if n.op in ("contract", "sum", "max"):
            over = n.attr("over")
            if self.tdim in over:
                raise NotImplementedError(
                    f"tvm gpu kernel: {n.op} over {self.tdim}, the dim spread over threads, "
                    "needs a cross-thread reduction, which this version does not generate")
            init = _f(float("-inf")) if n.op == "max" else _f(0.0)
            code = self.loops(n.dims, [f"{name}[{self.idx(n.dims, self.env(n.dims))}] = {init}"],
                              ind)
            alld = tuple(d for d in self.p.dims if d in n.dims or d in over)
            e = self.env(alld)
            tgt = f"{name}[{self.idx(n.dims, e)}]"
            if n.op == "contract":   # as a product, so invariant factors are hoisted
                val = self._product(n, e)
                upd = f"{tgt} = {tgt} + {val}"
            elif n.op == "sum":
                upd = f"{tgt} = {tgt} + {self.expr(n.args[0], e)}"
            else:
                upd = f"{tgt} = T.max({tgt}, {self.expr(n.args[0], e)})"
            # vectorise the innermost loop only when it is not the reduced one
            vec = bool(alld) and alld[-1] not in over
            return code + self.loops(alld, [upd], ind, vector_last=vec)
        e = self.env(n.dims)
        if self.fast and n.op in FAST:   # exp and kin by vector arithmetic (``fastmath``)
            bufs, steps = fast_steps(n.op, self.expr(n.args[0], e), name, self.idx(n.dims, e))
            return self.scratch_steps(bufs, steps, n.dims, ind)
        inner = self.expr_inline(n, e)
        return self.loops(n.dims, [f"{name}[{self.idx(n.dims, e)}] = {inner}"], ind)

    def scratch_steps(self, bufs: list[str], steps: list[str], dims, ind: int) -> list[str]:
        """``steps``, each a loop nest over ``dims``, with their scratch buffers ``bufs``
        (over ``dims``) asked of the kernel (``fastmath``'s statements)."""
        self.late_allocs += [f"{b} = T.alloc_buffer(({self.local_shape(dims)},), \"float32\""
                             f"{self.scope})" for b in bufs]   # once each: deduplicated there
        return [line for st in steps for line in self.loops(dims, [st], ind)]

    def expr_inline(self, n: Node, env) -> str:
        saved = id(n) in self.mat
        self.mat.discard(id(n))
        try:
            return self.expr(n, env)
        finally:
            if saved:
                self.mat.add(id(n))
