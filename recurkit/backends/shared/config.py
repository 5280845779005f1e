"""Backend configuration: knob dicts (defaults merged with what the user gave, unknown keys
named) and where compiled kernels and tuning results are cached."""
from __future__ import annotations

import os


def cache_root() -> str:
    """$RECURKIT_CACHE_DIR, else ~/.cache/recurkit (or $XDG_CACHE_HOME/recurkit)."""
    return os.environ.get("RECURKIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "recurkit")


def merge_defaults(given: dict | None, defaults: dict, what: str) -> dict:
    """``defaults`` updated with ``given``; a key ``defaults`` lacks is refused, listing the
    keys there are (``what`` names them in the message, e.g. "TVM knob")."""
    if given is None:
        return dict(defaults)
    bad = [k for k in given if k not in defaults]
    if bad:
        raise ValueError(f"unknown {what} {bad[0]!r}; the keys are "
                         f"{', '.join(f'{k} (default {v!r})' for k, v in defaults.items())}")
    return {**defaults, **given}
