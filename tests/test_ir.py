"""The IR: printing, JSON round-trip, content hash, verifier."""
import json

import pytest
import torch

import recurkit as rk
from recurkit.ir import Program


@rk.recurrence
def gdn(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"], v: rk.Token["V"],
        g: rk.Token[()], beta: rk.Token[()], scale: rk.Scalar = rk.dim("K") ** -0.5):
    S = rk.exp(g) * S
    S = S + beta * rk.outer(k, v - k @ S)
    return S, scale * (q @ S)


@rk.recurrence
def gdn_renamed(M: rk.State["Dk", "Dv"], query: rk.Token["Dk"], key: rk.Token["Dk"],
                value: rk.Token["Dv"], gate: rk.Token[()], b: rk.Token[()],
                s: rk.Scalar = rk.dim("Dk") ** -0.5):
    decayed = rk.exp(gate) * M
    err = value - key @ decayed
    new = decayed + b * rk.outer(key, err)
    return new, s * (query @ new)


@rk.recurrence
def gdn_other_math(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"],
                   v: rk.Token["V"], g: rk.Token[()], beta: rk.Token[()],
                   scale: rk.Scalar = rk.dim("K") ** -0.5):
    S = rk.exp(g) * S
    S = S + beta * rk.outer(k, v + k @ S)  # sign flipped
    return S, scale * (q @ S)


def test_printer_shows_the_math():
    text = str(gdn)
    for piece in ["recurrence gdn", "state   S: [N, H, K, V]", "token   q: [B, T, H, K]",
                  "token   g: [B, T, H]", "scalar  scale (default K ** -0.5)",
                  "= exp(g)", "contract[K](k, %1)", "sub(v, %2)", "S' = %6", "out = %8: [V]"]:
        assert piece in text, (piece, text)
    assert text.count("# line") == 9


def test_json_round_trip_preserves_program_and_results():
    text = gdn.program.to_json()
    back = Program.from_json(text)
    assert back.to_json() == text
    assert back.content_hash() == gdn.content_hash()
    assert str(back) == str(gdn.program)
    x = [torch.randn(1, 5, 2, 3), torch.randn(1, 5, 2, 3), torch.randn(1, 5, 2, 4),
         -torch.rand(1, 5, 2), torch.rand(1, 5, 2)]
    a = rk.compile(gdn)(*x, output_final_state=True)
    b = rk.compile(back)(*x, output_final_state=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_hash_is_stable_under_renaming_and_changes_with_the_math():
    assert gdn.content_hash() == gdn_renamed.content_hash()
    assert gdn.content_hash() == rk.ops.gated_delta_rule.decl.content_hash()
    assert gdn.content_hash() != gdn_other_math.content_hash()
    assert rk.ops.kda.decl.content_hash() != gdn.content_hash()
    # the default of a scalar is part of the math
    assert rk.ops.gla.decl.content_hash() != rk.ops.simple_gla.decl.content_hash()


def test_all_builtin_hashes_distinct():
    hashes = {}
    for name, op in rk.ops.ALL.items():
        for decl in [op.decl, *op.variants.values()]:
            hashes.setdefault(decl.content_hash(), []).append(decl.name)
    assert all(len(v) == 1 for v in hashes.values()), hashes


def test_verifier_rejects_tampered_json():
    d = json.loads(gdn.program.to_json())
    exp_node = next(n for n in d["nodes"] if n["op"] == "exp")
    exp_node["dims"] = ["K"]
    with pytest.raises(rk.DeclarationError, match="typed"):
        Program.from_json(json.dumps(d))
    d = json.loads(gdn.program.to_json())
    d["ir_version"] = 99
    with pytest.raises(ValueError, match="ir_version"):
        Program.from_json(json.dumps(d))
    d = json.loads(gdn.program.to_json())
    next(n for n in d["nodes"] if n["op"] == "sub")["op"] = "frobnicate"
    with pytest.raises(rk.DeclarationError, match="unknown op 'frobnicate'"):
        Program.from_json(json.dumps(d))


def test_common_subexpressions_are_shared():
    @rk.recurrence
    def twice(S: rk.State["K", "V"], k: rk.Token["K"], v: rk.Token["V"], g: rk.Token[()]):
        S = rk.exp(g) * S + rk.exp(g) * rk.outer(k, v)
        return S, k @ S
    assert sum(1 for n in twice.program.nodes() if n.op == "exp") == 1


def test_stateless_declaration_runs_per_token():
    @rk.recurrence
    def gated_proj(x: rk.Token["D"], w: rk.Param["D"], z: rk.Token[()]):
        return rk.silu(z) * rk.sum(x * w, "D")
    x, w, z = torch.randn(2, 6, 3, 5), torch.randn(3, 5), torch.randn(2, 6, 3)
    o, final = rk.compile(gated_proj)(x, w, z)
    assert final is None
    assert torch.allclose(o, torch.nn.functional.silu(z) * (x * w).sum(-1), atol=1e-6)


def test_string_annotations_are_evaluated():
    ns = {}
    exec("from __future__ import annotations\nimport recurkit as rk\n"
         "def step(S: rk.State['K', 'V'], k: rk.Token['K'], v: rk.Token['V']):\n"
         "    S = S + rk.outer(k, v)\n    return S, k @ S\n", ns)
    decl = rk.recurrence(ns["step"])
    assert decl.content_hash() != gdn.content_hash()


def test_token_dims_declared_in_other_order_are_read_by_name():
    @rk.recurrence
    def bilinear(S: rk.State["K", "V"], w: rk.Token["V", "K"], k: rk.Token["K"]):
        S = S + w  # w is laid out [B, T, H, V, K]; broadcasting is by name
        return S, k @ S
    w = torch.randn(1, 4, 2, 3, 5)  # V=3, K=5
    k = torch.randn(1, 4, 2, 5)
    o, S = rk.compile(bilinear)(w, k, output_final_state=True)
    S_ref = w.transpose(-1, -2).sum(1)
    assert torch.allclose(S, S_ref, atol=1e-5)
    assert torch.allclose(o[:, -1], torch.einsum("bhk,bhkv->bhv", k[:, -1], S_ref), atol=1e-5)
