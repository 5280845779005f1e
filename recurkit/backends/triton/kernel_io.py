"""What a chunk kernel reads and writes, with a record of it for the traffic model
(``chunk_module.model_traffic``): loads and stores of register blocks, and ``tl.dot`` work."""
from __future__ import annotations


class KernelIO:
    """Mixin of the chunk stage generator (``chunk._StageGen``): uses its ``st``, ``split``,
    ``nsplit``, ``kctx``, ``size``, ``offset``, ``inputs``, ``io``, ``ptrs``, ``emit``,
    ``prologue_value``, ``var``/``axes``, ``used``, ``accesses``, ``dots``, ``reread``, ``L``."""

    # --- what the kernel moves, for the traffic model (``chunk_module.model_traffic``) -------
    def per_chunk(self, ind: int) -> bool:
        return self.st.kind == "chunk" or ind >= 2

    def note(self, kind: str, ptr: str, axes: tuple[str, ...], ind: int,
             by_token: bool = False, times: int = 1) -> None:
        """A load or store of a block over ``axes`` (all of each axis over the kernel's
        programs; a split axis' blocks together cover it once), ``times`` per (sequence,
        head) (a state per segment)."""
        copies = self.nsplit() if kind == "r" and self.split and self.split not in axes else 1
        copies *= times
        rec = (kind, ptr, tuple(a.rstrip("'") for a in axes), self.per_chunk(ind), by_token,
               copies)
        if not (kind == "r" and self.reread and rec in self.accesses):
            self.accesses.append(rec)

    def note_dot(self, M: int, N: int, K: int, ind: int) -> None:
        rep = -(-self.size(self.kctx[0]) // self.kctx[1]) if self.kctx else 1
        self.dots.append((2 * M * N * K * rep * self.nsplit(), self.per_chunk(ind)))

    def read(self, name: str, ind: int) -> None:
        """A stage input: a prologue value computed here, or a buffer of an earlier stage."""
        if name in self.io.values:
            self.prologue_value(name, ind)
        elif name in self.ptrs:
            self.load(name, *self.ptrs[name], ind)

    def load(self, name: str, ptr: str, lead: str, ind: int, only: str | None = None,
             times: int = 1) -> None:
        """``name`` read from ``ptr`` (row ``lead``); ``only``: a condition on the program
        (a scalar) under which it is read, else it is zeros."""
        axes = self.inputs[name]
        off, m, numel = self.offset(axes)
        if only:
            cond = f"(({off}) * 0 + {only})"   # a block-shaped mask
            m = f"({m}) & {cond}" if m else cond
        mk = f", mask={m}, other=0.0" if m else ""
        self.used.add(ptr)
        self.note("r", ptr, axes, ind, times=times)
        self.emit(name, axes, f"tl.load({ptr} + ({lead}) * {numel} + {off}{mk})"
                  ".to(tl.float32)", ind)

    def store(self, name: str, ptr: str, lead: str, ind: int, only: str | None = None,
              times: int = 1) -> None:
        axes = self.axes[name]
        off, m, numel = self.offset(axes)
        conds = [only] if only else []
        if self.split and self.split not in axes:   # computed alike by every column block
            conds.insert(0, "pv == 0")
        for x in conds:   # ``x``: "<scalar> <comparison> <int>", made block-shaped
            m = f"({m}) & (({off}) * 0 + {x})" if m else f"(({off}) * 0 + {x})"
        mk = f", mask={m}" if m else ""
        self.used.add(ptr)
        self.note("w", ptr, axes, ind, times=times)
        self.L.append("    " * ind + f"tl.store({ptr} + ({lead}) * {numel} + {off}, "
                      f"{self.var[name]}.to({ptr}.dtype.element_ty){mk})")
