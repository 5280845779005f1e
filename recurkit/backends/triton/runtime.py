"""The Triton backend: generated kernels, run on a GPU or, for CPU tensors, in Triton's
interpreter; compiled ahead of time for GPUs that are not here.

Each tile program becomes one Python module of source (kernels plus a ``launch`` function),
written to ``$RECURKIT_CACHE_DIR/triton/<hash>.py`` by content hash and imported from there
(Triton needs kernels in real files). The module is imported once per mode: as interpreted
functions for CPU tensors and as JIT functions for GPUs and ahead-of-time compilation.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import threading
from types import ModuleType

import torch

from ...ir.bind import BoundCall, as_given
from ...lowering.analysis import analyze
from ...lowering.forms import default_chunk as lowering_default_chunk
from ...lowering.tile import TileProgram
from ..shared.config import cache_root, merge_defaults
from ..shared.host import chunk_count, per_token, scan_args, scan_result, token_loop_args
from ..shared.host import decays_positive
from .sequential import SeqGen, scan_source
from .chunk_module import chunk_source

GEN_VERSION = 1
# Triton 3.9 warns unless this is set; 1 keeps its current default (fused multiply-add)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
DEFAULT_CONFIG = {"num_warps": None,     # warps per program (None: 4 for the token loops, 8
                                         # for chunk stages, whose blocks are larger)
                  "num_stages": 2,       # software-pipelining depth of the chunk kernels
                  "block_v": None,       # state columns per program of the token loops and the
                                         # chunk state pass (None: 64; 16 for the state pass
                                         # of an fp32 call, whose fp32 operands need twice
                                         # the registers: no spills at K = V = 128)
                  "precision": "auto",   # tl.dot operands on a GPU: "auto" (16-bit calls: their
                                         # dtype, as FLA; fp32 calls: tf32), "tf32" or "ieee"
                  "intermediates": "auto",   # chunk forms: values crossing kernels in the
                                             # call's 16-bit dtype ("auto") or "fp32"
                  "segments": None}   # chunk forms: runs of chunks per sequence the state
                                      # pass does in parallel, joined exactly (None: as
                                      # ``segments.choose`` models it pays on a GPU, else 1)
_MODULES: dict[tuple[str, bool], ModuleType] = {}
_LOCK = threading.Lock()


def check_config(config: dict | None) -> dict:
    out = merge_defaults(config, DEFAULT_CONFIG, "Triton config key")
    for k in ("num_warps", "block_v"):
        v = out[k]
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v & (v - 1):
            raise ValueError(f"Triton config {k!r} must be a power of two, got {v!r}")
    if not isinstance(out["num_stages"], int) or out["num_stages"] < 1:
        raise ValueError(f"Triton config 'num_stages' must be an int >= 1, got "
                         f"{out['num_stages']!r}")
    seg = out["segments"]
    if seg is not None and (isinstance(seg, bool) or not isinstance(seg, int) or seg < 1):
        raise ValueError(f"Triton config 'segments' must be an int >= 1 or None (chosen per "
                         f"call), got {seg!r}")
    if out["intermediates"] not in ("auto", "fp32"):
        raise ValueError(f"Triton config 'intermediates' must be 'auto' or 'fp32', got "
                         f"{out['intermediates']!r}")
    if out["precision"] not in ("auto", "ieee", "tf32"):
        raise ValueError(f"Triton config 'precision' must be 'auto', 'ieee' or 'tf32', got "
                         f"{out['precision']!r}")
    return out


MAX_DEFAULT_CHUNK = 32   # chunk 64 spills registers in the WY prep kernel at K = V = 128


def default_chunk(program) -> int:
    """The chunk size the Triton backend lowers with when none is given."""
    return min(MAX_DEFAULT_CHUNK, lowering_default_chunk(analyze(program)))


def warps(cfg: dict, chunked: bool) -> int:
    return cfg["num_warps"] or (8 if chunked else 4)


def cache_dir() -> str:
    return os.path.join(cache_root(), "triton")


def load_module(src: str, interpret: bool) -> ModuleType:
    """Import generated source (cached by content hash) as interpreted or JIT functions."""
    import triton
    key = hashlib.sha256(f"{src}\n{triton.__version__}\n{GEN_VERSION}".encode()).hexdigest()[:24]
    with _LOCK:
        hit = _MODULES.get((key, interpret))
    if hit is not None:
        return hit
    path = os.path.join(cache_dir(), f"rk_{key}.py")
    if not os.path.exists(path) or _read(path) != src:   # missing or damaged: (re)write
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "w") as f:
            f.write(src)
        os.replace(tmp, path)
    name = f"recurkit_triton_{key}_{'interp' if interpret else 'jit'}"
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = interpret
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    with _LOCK:
        _MODULES[(key, interpret)] = mod
    return mod


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _launch(mod: ModuleType, interpret: bool, *args) -> None:
    if interpret:
        import triton
        with triton.knobs.runtime.scope():
            triton.knobs.runtime.interpret = True
            mod.launch(*args)
    else:
        mod.launch(*args)


def sequential_gen(p, sizes: dict[str, int], H: int, config: dict | None = None) -> SeqGen:
    # a rotation holds each state block twice (its lanes' partners): half as many columns
    turns = any(n.op == "rotate" for n in p.nodes())
    return SeqGen(p, sizes, H, check_config(config)["block_v"] or (32 if turns else 64))


def module_source(program, tp: TileProgram | None, sizes: dict[str, int], H: int,
                  config: dict | None = None, dtype: str = "fp32") -> str:
    """The generated module for ``program`` lowered to ``tp`` (None: the sequential form) at
    the given dim sizes and head count, for calls in ``dtype`` with an initial state and a
    final state (chunk forms): what the runners below load, for reading and for compiling
    ahead of time."""
    cfg = check_config(config)
    if tp is None or tp.form == "sequential":
        return sequential_gen(program, sizes, H, cfg).source(warps(cfg, False))
    if tp.form == "scan":
        return scan_source(sizes[program.state.dims[0]], H, "scan_sign" in tp.prologue,
                           num_warps=warps(cfg, False))
    from .segments import why_not
    segs = cfg["segments"] or 1   # as a call runs it (``segments.choose``): where it splits
    if segs > 1 and why_not(tp, program, sizes) is not None:
        segs = 1
    return chunk_source(tp, sizes, H, cfg, dtype=dtype, segments=segs)[0]


def run_triton_sequential(bc: BoundCall, config: dict | None = None):
    p = bc.program
    cfg = check_config(config)
    gen = sequential_gen(p, bc.sizes, bc.H, cfg)
    interpret = bc.device.type != "cuda"
    mod = load_module(gen.source(warps(cfg, False)), interpret)
    feeds, segt, s0, sf = token_loop_args(bc, gen.feeds)
    o = torch.empty(bc.B, bc.T, bc.H, *(bc.sizes[d] for d in p.output.dims),
                    device=bc.device)
    _launch(mod, interpret, o, s0, sf, segt, feeds, bc.T, segt.shape[0])
    return o.to(bc.out_dtype), (sf if bc.output_final_state else None)


def run_triton_scan(tp: TileProgram, bc: BoundCall, config: dict | None = None):
    cfg = check_config(config)
    m, sg, b, seg, s0, sf = scan_args(tp, bc)
    interpret = bc.device.type != "cuda"
    mod = load_module(scan_source(m.shape[-1], bc.H, sg is not None,
                                  num_warps=warps(cfg, False)), interpret)
    hs = torch.empty_like(m)
    _launch(mod, interpret, m, sg, b, hs, s0, sf, seg, bc.T, seg.shape[0])
    return scan_result(bc, hs, sf)


def call_groups(bc: BoundCall) -> tuple[tuple[int, int], ...]:
    """(input index, G) of the call's inputs given with H / G heads (FLA's GVA), which the
    chunk kernels read at head h // G instead of repeated."""
    return tuple((i, g) for i, s in enumerate(bc.program.inputs) if s.role in ("token", "param")
                 for g in [as_given(bc, s.name)[1]] if g > 1)


def chunk_inputs(io, bc: BoundCall, d_out=None):
    """(xs, fs, scs) for a chunk module's ``launch``: the call's tensors it reads (contiguous,
    in their own dtype), the host-evaluated feeds (fp32 [B, T, H, *dims]) and the scalars.
    A backward's feeds of role ``d_out`` (the readout's and the output's cotangents) are
    ``d_out[name]``, [B, T, H, *dims] in their own dtype (the kernels convert)."""
    p = bc.program
    xs = [(as_given(bc, p.inputs[n.attr("index")].name)[0] if n.attr("index") in io.groups
           else bc.tensors[p.inputs[n.attr("index")].name]).contiguous() for n in io.inputs]
    host = [n for n in io.feeds if n.role != "d_out"]
    vals = dict(zip(map(id, host), per_token(bc, host)))
    shape = (bc.B, bc.T, bc.H, *(bc.sizes[d] for d in p.output.dims))
    fs = [vals[id(n)] if id(n) in vals else d_out[n.attr("name")].expand(shape).contiguous()
          for n in io.feeds]
    scs = [float(bc.scalars[n.attr("name")]) for n in io.scalars]
    return xs, fs, scs


DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def intermediate_dtype(bc: BoundCall, cfg: dict) -> torch.dtype:
    """The dtype of values crossing the chunk kernels: the call's if it is 16-bit."""
    lowp = bc.out_dtype in (torch.bfloat16, torch.float16) and cfg["intermediates"] == "auto"
    return bc.out_dtype if lowp else torch.float32


def run_triton_chunked(tp: TileProgram, bc: BoundCall, config: dict | None = None):
    cfg = check_config(config)
    if not decays_positive(tp, bc):   # the log-space form does not apply to this call
        return run_triton_sequential(bc, config)
    p = bc.program
    varlen, has_s0 = bc.cu_seqlens is not None, bc.initial_state is not None
    interpret = bc.device.type != "cuda"
    N, nc = bc.N, chunk_count(bc, tp.chunk)
    from .segments import Joiner, choose
    segs = choose(tp, bc, cfg)
    src, io = chunk_source(tp, bc.sizes, bc.H, cfg, varlen, has_s0, bc.output_final_state,
                           DTYPE_NAMES.get(bc.out_dtype, "fp32"), interpret,
                           groups=call_groups(bc), segments=segs)
    mod = load_module(src, interpret)
    xs, fs, scs = chunk_inputs(io, bc)
    o = torch.empty(bc.B, bc.T, bc.H, *(bc.sizes[d] for d in p.output.dims),
                    dtype=bc.out_dtype, device=bc.device)
    state = (N, bc.H, *(bc.sizes[d] for d in p.state.dims))
    s0 = bc.initial_state.to(torch.float32).contiguous() if has_s0 else None
    sf = torch.empty(state, dtype=torch.float32, device=bc.device) \
        if bc.output_final_state else None
    cu = bc.cu_seqlens_tensor if varlen else None
    if cu is not None and cu.device != bc.device:
        cu = cu.to(bc.device)
    join = (Joiner(tp, bc, segs, cfg, interpret, io.maps_in_kernel),) if segs > 1 else ()
    _launch(mod, interpret, xs, fs, scs, o, s0, sf, cu, N, nc, bc.T,
            intermediate_dtype(bc, cfg), *join)
    return o, sf


# --- ahead-of-time compilation for GPUs that are not here -----------------------------------
TARGETS = {"sm_80": ("cuda", 80, 32), "sm_90": ("cuda", 90, 32), "gfx942": ("hip", "gfx942", 64)}
SHARED_LIMIT = {"sm_80": 166912, "sm_90": 232448, "gfx942": 65536}


def _param_type(name: str, io: str = "fp32") -> str:
    """Argument types for compiling a generated kernel ahead of time, by parameter name:
    inputs, low-precision intermediates and the output in ``io`` ("fp32", "bf16", "fp16"),
    everything else fp32 (integers for offsets and counts, fp32 scalars)."""
    import re
    if name in ("SEG", "CU"):
        return "*i32"
    if name in ("NC", "TT"):
        return "i32"
    if re.fullmatch(r"SC\d+", name):
        return "fp32"
    if name == "O" or re.fullmatch(r"[XL]\d+", name):
        return f"*{io}"
    return "*fp32"


ALIGNED_INTS = ("NC", "TT")   # integer arguments a typical call passes as multiples of 16


def divisibility_attrs(fn, signature: dict, ints=ALIGNED_INTS) -> dict:
    """The ``attrs`` Triton's JIT gives a call of ``fn`` whose tensors are 16-byte aligned:
    ``tt.divisibility = 16`` on every pointer argument (Triton 3.6-3.9 ``specialize_impl``
    with ``align=True``: ``data_ptr() % 16 == 0``, true of every tensor torch allocates) and
    on the integer arguments named in ``ints`` (the JIT adds it to an int argument whose
    value is a multiple of 16)."""
    return {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
            if a in signature and (signature[a].startswith("*")
                                   or (a in ints and signature[a] in ("i32", "i64")))}


def aot_compile(src: str, arch: str = "sm_90", config: dict | None = None,
                io: str = "fp32", aligned: bool = True) -> list[dict]:
    """Compile every kernel of a generated module for ``arch`` with no GPU, its inputs,
    output and low-precision intermediates in ``io``. Returns, per kernel: name, shared memory
    bytes, for CUDA registers and spill bytes (read from the cubin with the cuobjdump bundled
    with Triton; None where it cannot be read) and whether the SASS has tensor-core
    instructions (``mma``: HGMMA / HMMA counts; None where it cannot be read).

    ``aligned`` (default) compiles what Triton's JIT compiles for a typical call: every
    pointer argument 16-byte aligned (torch's allocations are) and the sequence length
    ``TT`` and chunk count ``NC`` multiples of 16 (a typical training or benchmark length,
    a power of two of 1024 tokens or more, at chunk 16-64: T = 4096, chunk 32 gives
    NC = 128), each with ``tt.divisibility = 16`` as the JIT's ``specialize_impl`` gives
    them. The JIT would also make an int argument equal to 1 a constant; no generated kernel
    takes such an argument (its ints are lengths and counts). ``aligned=False`` compiles
    with no attributes (the JIT's code for unaligned pointers and lengths that are not
    multiples of 16, e.g. a varlen batch)."""
    import triton
    from triton.backends.compiler import GPUTarget
    if arch not in TARGETS:
        raise ValueError(f"unknown target {arch!r}; choose one of {', '.join(TARGETS)}")
    cfg = check_config(config)
    mod = load_module(src, interpret=False)
    out = []
    for name in sorted(n for n in vars(mod) if n.endswith("_kernel")):
        fn = getattr(mod, name)
        sig = {a: _param_type(a, io) for a in fn.arg_names}
        attrs = divisibility_attrs(fn, sig) if aligned else {}
        loop = name in ("recurrent_kernel", "scan_kernel")
        k = triton.compile(triton.compiler.ASTSource(fn, sig, {}, attrs), target=GPUTarget(
            *TARGETS[arch]), options={"num_warps": warps(cfg, not loop),
                                      "num_stages": 1 if loop else cfg["num_stages"]})
        rec = {"kernel": name, "arch": arch, "shared": k.metadata.shared,
               "registers": None, "spill_bytes": None, "mma": None}
        if "cubin" in k.asm:
            rec.update(_cubin_usage(k.asm["cubin"]))
        out.append(rec)
    return out


def aot_compile_kernel(fn, signature: dict, constants: dict, arch: str = "sm_90",
                       num_warps: int = 4, aligned: bool = True) -> dict:
    """Compile one @triton.jit function of a loaded module for ``arch`` with no GPU; the
    report is as ``aot_compile``'s. ``signature`` maps every argument to a Triton type
    ("*fp32", "i32", "constexpr", ...), ``constants`` the constexpr ones to values.
    ``aligned`` (default): every pointer argument 16-byte aligned, as the JIT compiles for
    torch tensors; integer arguments get no attribute (their typical values are the
    caller's to know). ``aligned=False``: no attributes."""
    import triton
    from triton.backends.compiler import GPUTarget
    if arch not in TARGETS:
        raise ValueError(f"unknown target {arch!r}; choose one of {', '.join(TARGETS)}")
    attrs = divisibility_attrs(fn, signature, ints=()) if aligned else {}
    k = triton.compile(triton.compiler.ASTSource(fn, signature, constants, attrs),
                       target=GPUTarget(*TARGETS[arch]), options={"num_warps": num_warps})
    rec = {"kernel": fn.__name__, "arch": arch, "shared": k.metadata.shared,
           "registers": None, "spill_bytes": None}
    if "cubin" in k.asm:
        rec.update(_cubin_usage(k.asm["cubin"]))
    return rec


def _cubin_usage(cubin: bytes) -> dict:
    import re
    import shutil
    import subprocess
    import tempfile

    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    tool = tool if os.path.exists(tool) else shutil.which("cuobjdump")
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        r = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True)
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", r.stdout)
    out = {"registers": int(m.group(1)), "spill_bytes": int(m.group(2))} if m else {}
    if sass:   # tensor-core instructions: warpgroup MMA (sm_90) and warp MMA
        out["mma"] = {op: len(re.findall(rf"\b{op}\.", sass)) for op in ("HGMMA", "HMMA")}
    return out
