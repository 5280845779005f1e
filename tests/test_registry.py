"""The backend registry: one protocol object per backend, looked up by name; "auto" asks the
backends in rank order; a backend added to the registry is usable everywhere at once."""
import pytest
import torch

import recurkit as rk
from recurkit import backends
from recurkit.backends.base import Backend
from recurkit.backends.reference import ReferenceBackend

from cases import matrix_inputs


def test_every_backend_implements_the_protocol():
    assert set(backends.names()) == {"reference", "torch", "tvm", "triton"}
    for name, b in backends.REGISTRY.items():
        assert isinstance(b, Backend) and b.name == name
        assert b.forms and "recurrence" in b.kinds
        assert type(b).runner is not Backend.runner   # each runs recurrences
    assert backends.with_knobs() == ("tvm", "triton")
    assert set(backends.with_source()) == {"tvm", "triton"}
    with pytest.raises(ValueError, match="unknown backend 'cuda'; choose one of auto, "
                                         "reference, torch, tvm, triton"):
        backends.get("cuda")


def test_auto_choice_by_kind_form_device_and_grad():
    assert backends.choose("recurrence", None, "cpu").name == "tvm"
    assert backends.choose("recurrence", "sequential", "cpu").name == "tvm"
    assert backends.choose("recurrence", "chunk_wy", "cpu").name == "torch"
    assert backends.choose("recurrence", None, "cpu", grad=True).name == "torch"
    assert backends.choose("recurrence", None, "cuda").name == "torch"
    assert backends.choose("tiled", None, "cpu").name == "tvm"
    assert backends.choose("tiled", None, "cuda").name == "triton"
    assert backends.choose("tiled", None, "meta").name == "torch"
    # a CPU-only backend's op given other tensors runs what auto runs there
    assert backends.kernel_backend("tvm", "tiled", "cuda").name == "triton"
    assert backends.kernel_backend("tvm", "tiled", "meta").name == "torch"
    assert backends.kernel_backend("triton", "tiled", "cpu").name == "triton"


def test_auto_with_a_form_fixes_the_backend_auto_takes_for_it_on_a_cpu():
    assert rk.compile(rk.ops.gated_delta_rule, form="sequential").backend == "tvm"
    op = rk.compile(rk.ops.gated_delta_rule, form="chunk_wy", chunk=32)
    assert op.backend == "torch" and op.tile_program.chunk == 32
    with pytest.raises(rk.CallError, match="backend 'tvm' runs on CPU tensors"):
        rk.compile(rk.ops.gla, form="sequential")(
            *[t.to("meta") for t in matrix_inputs("gla", 1, 5, 2, 4, 4)])


def test_each_config_has_its_own_custom_op():
    """The op's name hashes everything that changes what it runs: two configs never share
    an op (the second would run the first one's forward)."""
    ops = [rk.compile(rk.ops.gated_delta_rule),
           rk.compile(rk.ops.gated_delta_rule, chunk=32),
           rk.compile(rk.ops.gated_delta_rule, form="chunk_wy"),
           rk.compile(rk.ops.gated_delta_rule, autotune=True),
           rk.compile(rk.ops.gated_delta_rule, autotune=True, form="chunk_wy"),
           rk.compile(rk.ops.gated_delta_rule, backend="tvm", autotune=True),
           rk.compile(rk.ops.gated_delta_rule, backend="tvm", autotune=True,
                      knobs={"block": 0})]
    names = [op.torch_op.qualname for op in ops]
    assert len(set(names)) == len(names)
    assert rk.compile(rk.ops.gated_delta_rule).torch_op is ops[0].torch_op   # same config


def test_repr_of_a_stateless_declaration_under_auto():
    @rk.recurrence
    def proj(x: rk.Token["D"], w: rk.Param["D"]):
        return x * w
    assert "backend=auto" in repr(rk.compile(proj))


class EchoBackend(ReferenceBackend):
    """A new backend: the reference's runner, counted."""
    name = "echo"
    calls = 0

    def runner(self, form, tp, knobs):
        run = super().runner(form, tp, knobs)

        def counted(bc):
            EchoBackend.calls += 1
            return run(bc)
        return counted


def test_a_registered_backend_is_usable_everywhere(monkeypatch):
    monkeypatch.setitem(backends.REGISTRY, "echo", EchoBackend())
    monkeypatch.setattr(EchoBackend, "calls", 0)
    x = matrix_inputs("gla", 1, 7, 2, 4, 4)
    o, S = rk.compile(rk.ops.gla, backend="echo")(*x, output_final_state=True)
    o_ref, S_ref = rk.compile(rk.ops.gla, backend="reference")(*x, output_final_state=True)
    assert EchoBackend.calls == 1 and torch.equal(o, o_ref) and torch.equal(S, S_ref)
    with pytest.raises(ValueError, match="choose one of auto, .*echo"):
        rk.compile(rk.ops.gla, backend="nope")
    with pytest.raises(ValueError, match="backend 'echo' takes none"):
        rk.compile(rk.ops.gla, backend="echo", knobs={"block": 0})
    with pytest.raises(ValueError, match="codegen shows generated source for 'triton' or 'tvm'"):
        rk.codegen(rk.ops.gla, "echo")


def test_device_errors_name_the_backend_and_its_devices():
    x = [t.to("meta") for t in matrix_inputs("gla", 1, 5, 2, 4, 4)]
    with pytest.raises(rk.CallError, match="backend 'tvm' runs on CPU tensors, got device meta"):
        rk.compile(rk.ops.gla, backend="tvm")(*x)
    with pytest.raises(rk.CallError, match="backend 'triton' runs on CUDA or CPU tensors"):
        rk.compile(rk.ops.gla, backend="triton")(*x)
