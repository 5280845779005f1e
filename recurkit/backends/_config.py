"""Backend configuration dicts: defaults merged with what the user gave, unknown keys named."""
from __future__ import annotations


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
