"""The tuning database: one JSON file, safe with several processes writing at once.

Keys combine the device fingerprint (CPU model and vector features, or GPU name and compute
capability), the declaration's IR hash, the backend family, the input dtype, a shape bucket
(T rounded up to a power of two; the other sizes exact) and library versions. Writers take an
exclusive lock on a side file, re-read, merge and replace the file atomically, so readers never
see half a file and concurrent writers lose nothing. A file that cannot be parsed is reported
and rebuilt; only verified winners are ever stored.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import threading
import time
import warnings

import torch

from .._version import __version__
from ..backends.shared.config import cache_root

DB_VERSION = 1


def db_path() -> str:
    return os.path.join(cache_root(), "autotune", "tuning.json")


def fingerprint(device: torch.device | str = "cpu") -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        cap = torch.cuda.get_device_capability(dev)
        return f"cuda:{torch.cuda.get_device_name(dev)}:sm_{cap[0]}{cap[1]}"
    model, flags = "unknown CPU", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    have = set(line.split(":", 1)[1].split())
                    flags = ",".join(x for x in ("avx2", "fma", "avx512f", "avx512bw", "amx_tile")
                                     if x in have)
    except OSError:
        pass
    return f"cpu:{model}:{flags}:{torch.get_num_threads()}t"


def shape_bucket(sizes: dict[str, int], B: int, T: int, H: int, N: int) -> str:
    tb = 1 << max(0, T - 1).bit_length()
    dims = ",".join(f"{k}={v}" for k, v in sorted(sizes.items()))
    return f"N={N},B={B},T<={tb},H={H},{dims}"


def make_key(ir_hash: str, family: str, dtype: str, bucket: str, device="cpu",
             space: str = "") -> str:
    """The entry's key; ``space`` describes a narrowed candidate space (empty: the whole)."""
    import triton
    import tvm

    versions = f"recurkit {__version__}|torch {torch.__version__}|tvm {tvm.__version__}|" \
               f"triton {triton.__version__}|db {DB_VERSION}"
    text = "|".join([fingerprint(device), ir_hash, family, dtype, bucket, versions]
                    + ([space] if space else []))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class TuneCache:
    """``get(key)`` -> entry dict or None; ``put(key, entry)``; ``entries()``; ``clear()``."""

    _lock = threading.Lock()

    def __init__(self, path: str | None = None):
        self.path = path or db_path()

    @contextlib.contextmanager
    def _exclusive(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with self._lock, open(self.path + ".lock", "a") as lk:
            fcntl.flock(lk, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lk, fcntl.LOCK_UN)

    def _read(self) -> dict:
        """The entries (call with the lock held); a file that cannot be parsed is reported and
        rewritten empty."""
        try:
            with open(self.path) as f:
                data = json.load(f)
            if not isinstance(data, dict) or data.get("version") != DB_VERSION or \
                    not isinstance(data.get("entries"), dict):
                raise ValueError("not a recurkit tuning database of this version")
            return data["entries"]
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:   # json.JSONDecodeError is a ValueError
            warnings.warn(f"recurkit: the tuning cache {self.path} is unreadable ({e}); "
                          "rebuilding it", RuntimeWarning, stacklevel=3)
            self._write({})
            return {}

    def _write(self, entries: dict) -> None:
        tmp = f"{self.path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"version": DB_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def get(self, key: str) -> dict | None:
        if not os.path.exists(self.path):
            return None
        with self._exclusive():
            return self._read().get(key)

    def put(self, key: str, entry: dict) -> None:
        with self._exclusive():
            entries = self._read()
            entries[key] = {**entry, "stored": time.time()}
            self._write(entries)

    def entries(self) -> dict:
        if not os.path.exists(self.path):
            return {}
        with self._exclusive():
            return self._read()

    def clear(self) -> int:
        with self._exclusive():
            n = len(self._read()) if os.path.exists(self.path) else 0
            self._write({})
        return n
