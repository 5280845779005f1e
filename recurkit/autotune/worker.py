"""Measuring candidates in a separate process, so that none can take the caller down.

The worker (a child process, reused across candidates) builds each candidate, checks it
against the reference interpreter on a small input, then times it at the real shape: warm-up,
repeats, median. A candidate that raises, computes a wrong answer, crashes the process or
runs past its time limit is reported as failed; a crashed or hung worker is replaced.
"""
from __future__ import annotations

import importlib
import os
import pickle
import select
import statistics
import struct
import subprocess
import sys
import time
import traceback

import torch

from .. import backends
from ..ir.bind import bind_call
from ..ir.interpret import run_reference
from ..ir.program import Program
from .space import Candidate

VERIFY_T = 37          # tokens of the correctness check: not a multiple of any chunk
VERIFY_TOL = 1e-4      # relative error against the reference (fp32)
VERIFY_TOL_16 = 5e-2   # in bf16 / fp16 (16-bit intermediates and dot operands)


def make_inputs(program, B: int, T: int, H: int, sizes: dict[str, int], dtype=torch.float32,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs at a shape: tokens [B, T, H, ...], params [H, ...]; scaled so that any
    decay read from them stays near 1 and nothing overflows over a short check."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for spec in program.call_inputs:
        if spec.role not in ("token", "param"):
            continue
        lead = (B, T, H) if spec.role == "token" else (H,)
        x = torch.randn(*lead, *(sizes[d] for d in spec.dims), generator=g) * 0.3
        out[spec.name] = x.to(dtype)
    return out


def build(program, cand: Candidate):
    """A callable(*inputs, **kw) -> (output, final_state) for the candidate."""
    run = build_bound(program, cand)

    def call(*xs, **kw):
        return run(bind_call(program, xs, kw))
    return call


def build_bound(program, cand: Candidate):
    """A callable(bound call) -> (output, final_state) for the candidate."""
    if cand.backend.startswith("py:"):   # an external runner factory: "py:module:function"
        mod, fn = cand.backend[3:].rsplit(":", 1)
        return getattr(importlib.import_module(mod), fn)(program, cand)
    b = backends.get(cand.backend)
    form, tp = b.prepare(program, cand.form, cand.chunk)
    return b.run_fn(form, tp, cand.knob_dict or None)


def _rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def measure(program, cand: Candidate, shape: dict, repeats: int, warmup: int = 1) -> dict:
    """Verify, then time. Runs in the worker (or in-process for tests)."""
    torch.manual_seed(0)
    sizes, H = shape["sizes"], shape["H"]
    dev = shape.get("device", "cpu")
    fn = build(program, cand)
    small = {k: v.to(dev) for k, v in make_inputs(program, 1, VERIFY_T, H, sizes,
                                                   seed=1).items()}
    S0 = (torch.randn(1, H, *(sizes[d] for d in program.state.dims),
                      generator=torch.Generator().manual_seed(2)) * 0.3).to(dev)
    dtype = getattr(torch, shape.get("dtype", "float32"))   # verified in fp32, timed in it
    checks = [(small, VERIFY_TOL, "")]
    if dtype != torch.float32:   # and verified in it too: 16-bit paths of their own
        checks.append(({k: v.to(dtype) for k, v in small.items()}, VERIFY_TOL_16,
                       f" in {shape['dtype']}"))
    for xs, tol, where in checks:
        o_ref, s_ref = run_reference(bind_call(program, (), {
            **xs, "initial_state": S0, "output_final_state": True}))
        o, s = fn(**xs, initial_state=S0, output_final_state=True)
        err = max(_rel(o, o_ref), _rel(s, s_ref))
        if not err < tol:   # NaN fails too
            return {"ok": False, "why": f"wrong answer{where}: relative error {err:.2e} "
                                        "against the reference"}
    xs = {k: v.to(dev) for k, v in make_inputs(program, shape["B"], shape["T"], H, sizes,
                                                dtype=dtype, seed=3).items()}
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn(**xs)
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn(**xs)
        sync()
        times.append(time.perf_counter() - t)
    return {"ok": True, "seconds": statistics.median(times), "error": err}


def _send(f, obj) -> None:
    data = pickle.dumps(obj)
    f.write(struct.pack("<Q", len(data)) + data)
    f.flush()


def _recv(f):
    head = f.read(8)
    if len(head) < 8:
        raise EOFError
    (n,) = struct.unpack("<Q", head)
    data = f.read(n)
    if len(data) < n:
        raise EOFError
    return pickle.loads(data)


def serve(fin, fout) -> None:
    """The worker's loop: (program JSON, candidate, shape, repeats, threads) in, result out."""
    programs: dict[str, Program] = {}
    while True:
        try:
            msg = _recv(fin)
        except EOFError:
            return
        if msg is None:
            return
        pjson, cand_json, shape, repeats, threads = msg
        torch.set_num_threads(threads)
        try:
            p = programs.get(pjson) or Program.from_json(pjson)
            programs[pjson] = p
            res = measure(p, Candidate.from_json(cand_json), shape, repeats)
        except Exception as e:  # noqa: BLE001 - reported as this candidate's failure
            res = {"ok": False, "why": f"{type(e).__name__}: {e}"[:400],
                   "trace": traceback.format_exc()[-2000:]}
        _send(fout, res)


class Worker:
    """A measuring process (``python -m recurkit.autotune._serve``, which needs no main-module
    guard in the caller's script); ``run`` returns the result, or a failure after a crash or
    a timeout, replacing the process."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None

    def _start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)   # same imports as here
        self.proc = subprocess.Popen([sys.executable, "-m", "recurkit.autotune._serve"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)

    def run(self, program, cand: Candidate, shape: dict, repeats: int,
            timeout: float) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        try:
            _send(self.proc.stdin, (program.to_json(), cand.to_json(), shape, repeats,
                                    torch.get_num_threads()))
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            if ready:
                return _recv(self.proc.stdout)
            why = f"hung: no result within {timeout:.0f} s"
        except (EOFError, BrokenPipeError, OSError, pickle.UnpicklingError):
            why = "crashed the measuring process"
        self.close(kill=True)
        return {"ok": False, "why": why}

    def close(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if not kill:
            try:
                _send(self.proc.stdin, None)
            except (BrokenPipeError, OSError):
                pass
        try:
            self.proc.wait(timeout=0 if kill else 10)
        except subprocess.TimeoutExpired:
            pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self.proc = None

