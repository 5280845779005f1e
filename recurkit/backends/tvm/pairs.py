"""rk.rotate and rk.pairs in the TVM loop nests: index expressions that read a value at the
partner of each entry along the rotated dim, and an angle at the entry's pair."""
from __future__ import annotations

from ...ir.node import Node


def paired_expr(gen, n: Node, env: dict[str, str]) -> str:
    """rk.rotate: ``cos * x[k] -+ sin * x[partner of k]``, the angle read at k's pair;
    rk.pairs: x read at k's pair."""
    K, pair, half = n.attr("dim"), n.attr("pair"), gen.sizes[n.attr("dim")] // 2
    if K == gen.tdim:
        raise NotImplementedError(f"tvm gpu kernel: rk.{n.op} along {K}, the dim spread "
                                  "over threads, reads across threads")
    i = env[K]
    inter = n.attr("layout") == "interleaved"
    at = f"({i} // 2)" if inter else f"({i} % {half})"
    if n.op == "pairs":
        return gen.expr(n.args[0], {**{d: v for d, v in env.items() if d != K}, pair: at})
    x, ang = n.args
    partner = f"({i} + 1 - 2 * ({i} % 2))" if inter else f"(({i} + {half}) % {2 * half})"
    first = f"({i} % 2 == 0)" if inter else f"({i} < {half})"
    t = gen.expr(ang, {**env, pair: at} if pair else env)
    return (f"(T.cos({t}) * {gen.expr(x, env)} + T.if_then_else({first}, "
            f"T.float32(-1), T.float32(1)) * T.sin({t}) * "
            f"{gen.expr(x, {**env, K: partner})})")
