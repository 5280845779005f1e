"""The ``recurkit`` command line."""
from __future__ import annotations

import argparse
import importlib
import sys


def _load(target: str):
    """``pkg.module:name`` -> the declaration (or built-in op) it names."""
    if ":" not in target:
        raise SystemExit(f"recurkit: expected MODULE:NAME (e.g. recurkit.ops:gla), got {target!r}")
    mod, name = target.split(":", 1)
    sys.path.insert(0, "")
    obj = importlib.import_module(mod)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recurkit", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("demo", help="declare Gated DeltaNet, run it, check it against plain torch")
    show = sub.add_parser("show", help="print a declaration's IR")
    show.add_argument("target", help="MODULE:NAME, e.g. recurkit.ops:gated_delta_rule")
    show.add_argument("--json", action="store_true", help="print the IR as JSON")
    sub.add_parser("ops", help="list the built-in ops")
    tune = sub.add_parser("tune", help="autotune a declaration at a shape on this machine")
    tune.add_argument("target", help="MODULE:NAME, e.g. recurkit.ops:gated_delta_rule")
    tune.add_argument("--shape", required=True,
                      help="sizes as B=1,T=4096,H=4,K=128,V=128 (every dim of the declaration)")
    tune.add_argument("--effort", choices=["quick", "full"], default="quick")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--retune", action="store_true", help="ignore a cached result")
    cache = sub.add_parser("cache", help="the tuning cache")
    cache.add_argument("action", choices=["list", "clear"])
    args = parser.parse_args(argv)

    if args.cmd == "demo":
        from .demo import main as demo
        return demo()
    if args.cmd == "show":
        from .compiler import as_program
        prog = as_program(_load(args.target))
        print(prog.to_json() if args.json else prog)
        print(f"content hash {prog.content_hash()}")
        return 0
    if args.cmd == "ops":
        from .ops import ALL, TILED
        print("recurrences (rk.ops.NAME: FLA's call conventions; .decl for rk.compile):")
        for name, op in ALL.items():
            print(f"  {name:<18} {_first_line(op.decl.__doc__)}")
        print("tiled declarations (rk.compile(rk.ops.NAME)):")
        for name, decl in TILED.items():
            print(f"  {name:<18} {_first_line(decl.__doc__)}")
        return 0
    if args.cmd == "tune":
        return _tune(args)
    if args.cmd == "cache":
        from .autotune import Candidate, TuneCache
        c = TuneCache()
        if args.action == "clear":
            print(f"removed {c.clear()} tuning results from {c.path}")
            return 0
        entries = c.entries()
        print(f"{len(entries)} tuning results in {c.path}")
        for key, e in sorted(entries.items(), key=lambda kv: kv[1].get("program", "")):
            best = Candidate.from_json(e["best"]).label()
            d = e.get("default_seconds")
            speed = f", {d / e['seconds']:.2f}x the default" if d else ""
            print(f"  {e.get('program', '?'):<18} {e.get('device', '?')} {e.get('bucket', '?')}: "
                  f"{best} ({e['seconds'] * 1e3:.2f} ms{speed})")
        return 0
    return 2  # pragma: no cover


def _first_line(doc: str | None) -> str:
    lines = (doc or "").strip().splitlines()
    return lines[0] if lines else ""


def _tune(args) -> int:
    from .autotune import tune
    from .compiler import as_program
    prog = as_program(_load(args.target))
    try:
        sizes = dict((k.strip(), int(v)) for k, v in (kv.split("=") for kv in
                                                       args.shape.split(",")))
    except ValueError:
        raise SystemExit(f"recurkit tune: --shape must look like B=1,T=4096,H=4,K=128; got "
                         f"{args.shape!r}") from None
    lead = {k: sizes.pop(k, d) for k, d in (("B", 1), ("T", None), ("H", None))}
    missing = [d for d in ("T", "H") if lead[d] is None] + [d for d in prog.dims
                                                             if d not in sizes]
    extra = [d for d in sizes if d not in prog.dims]
    if missing or extra:
        raise SystemExit(f"recurkit tune: --shape needs T, H and {', '.join(prog.dims)}"
                         + (f"; missing {', '.join(missing)}" if missing else "")
                         + (f"; {', '.join(extra)} not a dim of {prog.name}" if extra else ""))
    shape = {"B": lead["B"], "T": lead["T"], "H": lead["H"], "N": lead["B"], "sizes": sizes}
    res = tune(prog, shape, effort=args.effort, seed=args.seed, use_cache=not args.retune)
    src = "cached" if res.from_cache else f"tuned in {res.wall:.1f} s, {len(res.tried)} tried"
    print(f"{prog.name}: best {res.best.label()}: {res.seconds * 1e3:.2f} ms ({src})")
    if res.default_seconds:
        print(f"  default {res.default_seconds * 1e3:.2f} ms -> "
              f"{res.default_seconds / res.seconds:.2f}x")
    for c, why in res.failures():
        print(f"  failed: {c.label()}: {why}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
