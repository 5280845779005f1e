"""Building TVM kernels: the host target, and one memory + disk cache for every compiled kernel.

Kernels are compiled for the detected CPU and cached by their generated source text (plus
target and versions) in memory and under ``$RECURKIT_CACHE_DIR/tvm``; ``cuda_ptx`` compiles
generated CUDA source with nvcc where there is one.
"""
from __future__ import annotations

import os
import re
import threading
import warnings
from typing import Callable

import torch

from ..shared.config import cache_root

_CACHE: dict[str, Callable] = {}
_LOCK = threading.Lock()


def target():
    """The LLVM target kernels are compiled for: the host's CPU, or the one named by
    $RECURKIT_TVM_MCPU (an LLVM CPU name such as "znver3" or "haswell": code for an older CPU
    of the family, e.g. to measure the AVX2 code on an AVX-512 machine)."""
    _threads()
    import tvm
    mcpu = os.environ.get("RECURKIT_TVM_MCPU") or tvm.target.codegen.llvm_get_system_cpu()
    tgt = tvm.target.Target({"kind": "llvm", "mcpu": mcpu,
                             "num-cores": max(1, torch.get_num_threads()),
                             "fast-math-contract": True})   # a*b+c as one FMA
    if os.environ.get("RECURKIT_TVM_MCPU") and not tvm.target.codegen.llvm_is_valid_cpu(
            mcpu, tvm.target.codegen.llvm_get_system_triple()):
        raise ValueError(f"RECURKIT_TVM_MCPU={mcpu!r} is not a CPU LLVM knows (e.g. znver3, "
                         "haswell, skylake-avx512)")
    return tgt


def vector_lanes() -> int:
    """fp32 lanes of the widest vector register of the target (``target()``) that generated
    kernels use: 16 with AVX-512 (fewer instructions per element: the walk of the backward
    is bound by them), else 8 (AVX2, and where the features cannot be read)."""
    import tvm
    key = os.environ.get("RECURKIT_TVM_MCPU", "")
    if key not in _LANES:
        try:
            wide = bool(tvm.target.codegen.target_has_features("avx512f", target()))
        except Exception:  # noqa: BLE001 - unknown features: narrower vectors work anywhere
            wide = False
        _LANES[key] = 16 if wide else 8
    return _LANES[key]


_LANES: dict[str, int] = {}   # by $RECURKIT_TVM_MCPU


def _threads() -> None:
    """TVM's runtime reads these once, when its thread pool starts: use as many threads as
    torch, unpinned (pinned workers contend with torch's OpenMP threads on the same cores)."""
    os.environ.setdefault("TVM_NUM_THREADS", str(max(1, torch.get_num_threads())))
    os.environ.setdefault("TVM_BIND_THREADS", "0")


def cuda_ptx(src: str, arch: str = "sm_90") -> str:
    """PTX for CUDA source with the nvcc found on PATH (RuntimeError when there is none)."""
    import shutil
    import subprocess
    import tempfile
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc is not on PATH: CUDA source can be generated but not compiled")
    with tempfile.TemporaryDirectory() as d:
        cu, ptx = os.path.join(d, "k.cu"), os.path.join(d, "k.ptx")
        with open(cu, "w") as f:
            f.write(src)
        r = subprocess.run([nvcc, "--ptx", f"-arch={arch}", "-o", ptx, cu],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"nvcc failed on the generated kernel:\n{r.stderr}")
        with open(ptx) as f:
            return f.read()


GEN_VERSION = 5   # bump when the generated code changes meaning

_ELEM_BYTES = {"float32": 4, "int32": 4, "uint32": 4, "uint8": 1, "int8": 1, "int64": 8,
               "float64": 8, "float16": 2, "bfloat16": 2}
_MATCH = re.compile(r'^(\s*\w+ = T\.match_buffer\(.*), "(\w+)"\)$', re.M)


def unaligned_buffers(src: str) -> str:
    """``src`` with every argument buffer declared aligned to its element only. TVM assumes
    64-byte aligned arguments by default and emits aligned vector loads from them, which
    crash on a tensor that is a view at another offset (``x[:, 1:]`` of a row of 20 floats);
    with the element's alignment LLVM emits unaligned loads, as fast on aligned data."""
    out, n = _MATCH.subn(lambda m: f'{m[1]}, "{m[2]}", align={_ELEM_BYTES[m[2]]})', src)
    if n != src.count("T.match_buffer("):
        raise AssertionError("a T.match_buffer line of the generated source is not of the "
                             "form `X = T.match_buffer(x, shape, \"dtype\")`")
    return out


def buffer_scope(gpu: bool) -> str:
    """The ``scope=`` argument of a kernel's small buffers. On a GPU "local": registers. On a
    CPU the default scope: TVM puts buffers under 1 KiB on the stack, where LLVM keeps them in
    registers, while "local" ones become heap workspaces that LLVM must assume alias the
    state, so it reloads and re-stores them every row."""
    return ', scope="local"' if gpu else ""


def cache_dir() -> str:
    """Where compiled TVM kernels live: ``tvm/`` under the cache root (see ``cache_root``)."""
    return os.path.join(cache_root(), "tvm")


def compile_source(src: str) -> Callable:
    """Compile TVMScript ``src`` for the host CPU, through the memory and disk caches.

    The key is the source text itself plus the target and versions, so dim sizes, knobs and
    the declaration's math are all part of it. A cached library that cannot be loaded is
    reported, removed and rebuilt; a new one is written under a private name and renamed
    into place, so concurrent processes never read half a file."""
    import hashlib

    import tvm
    import tvm.script

    from ..._version import __version__
    tgt = target()
    key = hashlib.sha256("\n".join([src, str(tgt), tvm.__version__, __version__,
                                     str(GEN_VERSION)]).encode()).hexdigest()[:32]
    with _LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        return hit
    path = os.path.join(cache_dir(), key + ".so")
    fn = None
    if os.path.exists(path):
        try:
            fn = tvm.runtime.load_module(path)["main"]
        except Exception as e:  # noqa: BLE001 - a corrupt cache entry is rebuilt, not fatal
            warnings.warn(f"recurkit: discarding unreadable cached kernel {path} ({e}); "
                          "rebuilding it", RuntimeWarning, stacklevel=3)
            _remove(path)
    if fn is None:
        ex = tvm.compile(tvm.IRModule({"main": tvm.script.from_source(unaligned_buffers(src))}),
                         target=tgt)
        fn = ex["main"]
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp.so"
            ex.export_library(tmp)
            os.replace(tmp, path)
        except Exception as e:  # noqa: BLE001 - the kernel works without its disk copy
            warnings.warn(f"recurkit: could not cache the compiled kernel in {path} ({e})",
                          RuntimeWarning, stacklevel=3)
    with _LOCK:
        _CACHE[key] = fn
    return fn


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
