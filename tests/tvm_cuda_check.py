"""Device check: the TVM backend's CUDA kernels, compiled with nvcc and run on a GPU.

TVM's pip build has no CUDA runtime and the GPU machines lent to this project have no TVM, so
the check has two halves:

    python tests/tvm_cuda_check.py prepare FILE  # here, with TVM: sources, inputs, expected
    python tests/tvm_cuda_check.py run FILE      # on the GPU: nvcc --ptx, CuPy launch, compare

``prepare`` renders, for every built-in, the sequential kernel (``cuda_source``) and every
stage of its chunk forms (``chunk_cuda_source``) as CUDA C for sm_90, and runs the same
kernels on the CPU (the sequential one as the CPU kernel with the same signature, the chunk
stages as their GPU rendering with serial block and thread loops) on a small call (T = 37,
initial state, varlen with a length-1 segment), recording every argument before and after
each call and the launch shape (grid from the ``blockIdx.x`` binding, block from
``threadIdx.x``, evaluated at the call's sizes). ``run`` compiles each source to PTX with
nvcc, launches it with CuPy on the recorded inputs and compares every argument afterwards
with the CPU's (relative error < 1e-5).
"""
import os
import re
import subprocess
import sys
import tempfile

import torch

SIZES = {"K": 64, "V": 32, "D": 64}
H = 2
ARCH = "sm_90"


def _launch_spec(script: str, args: list) -> tuple[dict, dict, int, int]:
    """(sizes of the symbolic vars, buffer name -> index into ``args``, grid, block) of a
    TVMScript kernel called with ``args`` (the host function's parameters, in order)."""
    params = re.search(r"def main\(([^)]*)\)", script).group(1)
    handles = [p.split(":")[0].strip() for p in params.split(",")]
    env, bufs = {}, {}
    for name, handle, shape in re.findall(
            r"(\w+) = T\.match_buffer\((\w+), \(([^)]*)\)", script):
        t = args[handles.index(handle)]
        bufs[name] = handles.index(handle)
        for dim, size in zip(shape.split(","), t.shape):
            dim = dim.strip()
            if dim and not dim.isdigit():
                env[dim] = int(size)
    grid = eval(re.search(r'T\.thread_binding\(([^,]+), thread="blockIdx\.x"\)',
                          script).group(1), {}, dict(env))
    block = re.search(r'T\.thread_binding\(([^,]+), thread="threadIdx\.x"\)', script)
    block = eval(block.group(1), {}, dict(env)) if block else 1
    return env, bufs, grid, block


def _kernel_params(cuda: str, name: str, env: dict, bufs: dict) -> list:
    sig = re.search(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?'
                    + re.escape(name) + r"\(([^)]*)\)", cuda).group(1)
    out = []
    for p in sig.split(","):
        ident = p.split()[-1]
        if ident.endswith("_ptr"):
            out.append(("buf", bufs[ident[:-4]]))
        else:
            out.append(("int", env[ident]))
    return out


def _cuda(script: str, symbol: str) -> str:
    import tvm
    import tvm.script
    func = tvm.script.from_source(script).with_attr("global_symbol", symbol)
    # without CSE, the kernel's scalar parameters are the buffers' symbolic sizes alone
    with tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        ex = tvm.compile(tvm.IRModule({symbol: func}),
                         target=tvm.target.Target({"kind": "cuda", "arch": ARCH}))
    return ex.mod.imports[0].inspect_source()


def _calls(name: str, form: str, gpu_script: str | list, run):
    """Record each kernel call of ``run()``: compile_source is wrapped so that every call's
    arguments are cloned before and after; ``gpu_script`` gives each call's GPU source."""
    from recurkit.backends.tvm import sequential as tvm_backend
    from recurkit.backends.tvm import chunk as tvm_tile
    seen = []

    def wrap(real):
        def compile_source(src):
            fn = real(src)

            def call(*a):
                before = [t.clone() for t in a]
                fn(*a)
                seen.append((before, [t.clone() for t in a]))
            return call
        return compile_source
    saved = tvm_backend.compile_source, tvm_tile.compile_source
    tvm_backend.compile_source = wrap(saved[0])
    tvm_tile.compile_source = wrap(saved[1])
    tvm_backend._KERNELS.clear()
    tvm_tile._PLANS.clear()
    try:
        run()
    finally:
        tvm_backend.compile_source, tvm_tile.compile_source = saved
        tvm_backend._KERNELS.clear()
        tvm_tile._PLANS.clear()
    scripts = gpu_script if isinstance(gpu_script, list) else [gpu_script] * len(seen)
    if len(scripts) != len(seen):
        raise RuntimeError(f"{name} {form}: {len(seen)} kernel calls for {len(scripts)} sources")
    out = []
    for k, ((before, after), script) in enumerate(zip(seen, scripts)):
        symbol = f"{name}_{form}_{k}"
        env, bufs, grid, block = _launch_spec(script, before)
        cuda = _cuda(script, symbol)
        kname = re.search(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(',
                          cuda).group(1)
        out.append(dict(op=name, form=form, stage=k, kernel=kname, cuda=cuda,
                        params=_kernel_params(cuda, kname, env, bufs), grid=grid, block=block,
                        before=before, after=after))
    return out


def prepare(path: str) -> None:
    import recurkit as rk
    from recurkit.backends.tvm import sequential as tvm_backend
    from recurkit.backends.tvm import chunk as tvm_tile
    from recurkit.ir import bind_call
    sys.path.insert(0, os.path.dirname(__file__))
    from test_adjoint import draw
    from cases import CASES, VECTOR_CASES
    records, skipped = [], []
    lens = [1, 20, 16]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    for name in [*CASES, *VECTOR_CASES]:
        decl = getattr(rk.ops, name).decl
        sizes = {d: SIZES[d] for d in decl.program.dims}
        xs = draw(decl, sum(lens), B=1, H=H, seed=0, gate=(-0.5, -0.01), sizes=SIZES)
        dims = (SIZES["D"],) if name in VECTOR_CASES else (SIZES["K"], SIZES["V"])
        s0 = torch.randn(len(lens), H, *dims, generator=torch.Generator().manual_seed(3))
        kw = dict(initial_state=s0, output_final_state=True, cu_seqlens=cu)
        bc = bind_call(decl.program, [], dict(xs, **kw))
        try:
            script = tvm_backend.sequential_source(decl.program, sizes, H, gpu=True)
            records += _calls(name, "sequential", script,
                              lambda: tvm_backend.run_tvm_sequential(bc))
        except NotImplementedError as e:
            skipped.append(f"{name} sequential: {e}")
        for form in rk.analyze(decl).forms:
            if not form.startswith("chunk"):
                continue
            tp = rk.lower(decl, form=form, chunk=16)
            scripts = tvm_tile.stage_sources(tp, sizes, H, gpu=True)
            records += _calls(name, form, scripts,
                              lambda: tvm_tile.run_tvm_chunked(tp, bc, emulate_gpu=True))
        print(f"prepared {name}", flush=True)
    torch.save(dict(records=records, skipped=skipped, arch=ARCH), path)
    print(f"{len(records)} kernels, {len(skipped)} not rendered: {skipped}")


def run(path: str) -> int:
    import cupy
    data = torch.load(path, weights_only=False)
    print(f"device: {torch.cuda.get_device_name()} | nvcc: "
          + subprocess.run(["nvcc", "--version"], capture_output=True, text=True
                           ).stdout.strip().splitlines()[-1])
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in data["records"]:
            label = f"{r['op']:18s} {r['form']:11s} kernel {r['stage']}"
            cu = os.path.join(tmp, r["kernel"] + ".cu")
            ptx = cu[:-3] + ".ptx"
            with open(cu, "w") as f:
                f.write(r["cuda"])
            p = subprocess.run(["nvcc", "--ptx", f"-arch={data['arch']}", "-o", ptx, cu],
                               capture_output=True, text=True)
            if p.returncode:
                print(f"{label}: nvcc FAILED\n{p.stderr[-2000:]}")
                bad += 1
                continue
            fn = cupy.RawModule(path=ptx).get_function(r["kernel"])
            dev = [t.cuda() for t in r["before"]]
            args = [cupy.asarray(dev[v]) if kind == "buf" else cupy.int32(v)
                    for kind, v in r["params"]]
            fn((r["grid"],), (r["block"],), tuple(args))
            torch.cuda.synchronize()
            err = 0.0
            for got, want in zip(dev, r["after"]):
                g, w = got.cpu().double(), want.double()
                if not torch.equal(g.isnan(), w.isnan()):
                    err = float("inf")
                    break
                g, w = g.nan_to_num(), w.nan_to_num()
                err = max(err, ((g - w).abs().max() / w.abs().max().clamp_min(1e-30)).item())
            ok = err < 1e-5
            bad += not ok
            print(f"{label}: ptx ok, grid {r['grid']:4d} x {r['block']:3d} threads, "
                  f"max rel diff {err:.1e} {'ok' if ok else 'MISMATCH'}")
    print(f"{len(data['records'])} kernels, {bad} failed; not rendered: {data['skipped']}")
    return 1 if bad else 0


if __name__ == "__main__":
    cmd, path = sys.argv[1], sys.argv[2]
    if cmd == "prepare":
        prepare(path)
    else:
        sys.exit(run(path))
