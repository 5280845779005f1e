"""Golden files of printed tile programs: a change to the chunk algebra shows up as a diff.

Regenerate after an intended change with RECURKIT_UPDATE_GOLDEN=1 python -m pytest
tests/test_golden.py, and read the diff before committing it.
"""
import os
from pathlib import Path

import pytest

import recurkit as rk

GOLDEN = Path(__file__).parent / "golden"
CASES = [("gated_delta_rule", "chunk_wy", 64), ("gla", "chunk_gated", 32),
         ("dplr_delta_rule", "chunk_wy", 16), ("hgrn", "scan", None)]


@pytest.mark.parametrize("name,form,chunk", CASES, ids=[c[0] for c in CASES])
def test_tile_program_matches_golden(name, form, chunk):
    text = str(rk.lower(getattr(rk.ops, name), form=form, chunk=chunk or 32)) + "\n"
    path = GOLDEN / f"{name}.{form}.txt"
    if os.environ.get("RECURKIT_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; run with RECURKIT_UPDATE_GOLDEN=1"
    assert text == path.read_text()


TILED = [("logic_layer", {"I": 24, "O": 40}), ("group_sum", {"C": 10, "G": 8})]


@pytest.mark.parametrize("name,sizes", TILED, ids=[c[0] for c in TILED])
def test_tiled_form_and_sources_match_golden(name, sizes):
    """The derived backward and the TVM and Triton source of the built-in tiled ops."""
    from recurkit.lowering.tiled import lower_tiled
    decl = getattr(rk.ops, name)
    parts = {"tiled.txt": str(lower_tiled(decl.program)) + "\n",
             "tiled.tvm.py.txt": rk.codegen(decl, "tvm", sizes=sizes),
             "tiled.triton.py.txt": rk.codegen(decl, "triton", sizes=sizes)}
    for suffix, text in parts.items():
        path = GOLDEN / f"{name}.{suffix}"
        if os.environ.get("RECURKIT_UPDATE_GOLDEN"):
            path.write_text(text)
        assert path.exists(), f"missing golden file {path}; run with RECURKIT_UPDATE_GOLDEN=1"
        assert text == path.read_text(), path
