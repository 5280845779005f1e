"""Tuned Triton configs shipped per GPU model, used by default on a matching device.

A file ``<device slug>.json`` here (or ``$RECURKIT_TRITON_CONFIGS``, a file of the same
format, read first) holds

    {"device": "NVIDIA H100 80GB HBM3", "capability": "sm_90",
     "entries": [{"program": <content hash>, "name": ..., "form": ..., "chunk": ...,
                  "sizes": {dim: size}, "dtype": "bfloat16", "knobs": {...}}, ...]}

A compiled op with the Triton backend and no ``knobs=`` of its own runs a CUDA call with the
knobs of the entry for its declaration (by content hash, so an edited declaration matches
nothing), form, chunk, dim sizes and dtype on a device of that name and capability; anything
else runs the defaults. ``knobs=`` and ``autotune=`` override it.
"""
from __future__ import annotations

import json
import os
import re
import threading
import warnings
from functools import lru_cache

_LOCK = threading.Lock()


def slug(device_name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


@lru_cache(maxsize=None)
def _file(path: str) -> tuple:
    """The entries of one config file (empty when missing or unreadable: defaults then)."""
    try:
        with open(path) as f:
            data = json.load(f)
        return (data.get("device"), data.get("capability"), tuple(data.get("entries", ())))
    except (OSError, ValueError, AttributeError):
        return (None, None, ())


def _key(e: dict) -> tuple:
    return (e.get("program"), e.get("form"), e.get("chunk"),
            tuple(sorted((e.get("sizes") or {}).items())), e.get("dtype"))


def lookup(program, form: str, chunk: int | None, sizes: dict, dtype: str,
           device_name: str, capability: str) -> dict | None:
    """The shipped knobs for this declaration and call on this device, or None."""
    want = (program.content_hash(), form, chunk, tuple(sorted(sizes.items())), dtype)
    paths = [os.environ.get("RECURKIT_TRITON_CONFIGS", ""),
             os.path.join(os.path.dirname(__file__), slug(device_name) + ".json")]
    for path in paths:
        if not path:
            continue
        name, cap, entries = _file(path)
        if name not in (None, device_name) or cap not in (None, capability):
            continue
        for e in entries:
            if _key(e) == want:
                from ..runtime import check_config
                knobs = dict(e.get("knobs") or {})
                try:   # an entry this version cannot use (unknown or bad knobs): skipped
                    check_config(knobs)
                except (ValueError, TypeError) as err:
                    warnings.warn(f"{path}: entry for {e.get('name')} ignored: {err}")
                    continue
                return knobs
    return None


_SEEN: dict = {}


def for_call(program, tp, bc) -> dict | None:
    """The shipped knobs for bound call ``bc`` (a CUDA call) lowered to ``tp``, memoized per
    device, sizes and dtype."""
    import torch
    dev = bc.device
    dtype = str(bc.out_dtype).replace("torch.", "")   # the first input's (no grouped copy)
    form = tp.form if tp is not None else "sequential"
    chunk = tp.chunk if tp is not None else None
    k = (program.content_hash(), form, chunk, str(dev), tuple(sorted(bc.sizes.items())), dtype,
         os.environ.get("RECURKIT_TRITON_CONFIGS", ""))
    with _LOCK:
        if k in _SEEN:
            return _SEEN[k]
    name = torch.cuda.get_device_name(dev)
    cap = "sm_%d%d" % torch.cuda.get_device_capability(dev)
    knobs = lookup(program, form, chunk, dict(bc.sizes), dtype, name, cap)
    with _LOCK:
        _SEEN[k] = knobs
    return knobs
