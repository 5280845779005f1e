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
        from .ops import ALL
        for name, op in ALL.items():
            doc = (op.decl.__doc__ or "").strip().splitlines()[0]
            print(f"{name:<18} {doc}")
        return 0
    return 2  # pragma: no cover


if __name__ == "__main__":
    raise SystemExit(main())
