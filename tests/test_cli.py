"""The command line and the README quickstart's demo."""
import subprocess
import sys

from recurkit.cli import main


def test_demo_matches_plain_torch(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "MATCH" in out and "MISMATCH" not in out
    assert "recurrence gated_delta_rule" in out


def test_show_prints_ir_and_hash(capsys):
    assert main(["show", "recurkit.ops:kda"]) == 0
    out = capsys.readouterr().out
    assert "recurrence kda" in out and "content hash" in out
    assert main(["show", "--json", "recurkit.ops:gla"]) == 0
    assert '"ir_version"' in capsys.readouterr().out


def test_ops_lists_every_builtin(capsys):
    assert main(["ops"]) == 0
    out = capsys.readouterr().out
    for name in ["gated_delta_rule", "kda", "hgrn", "min_gru", "dplr_delta_rule", "retention",
                 "logic_layer", "group_sum", "shift_add"]:
        assert f"  {name} " in out


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "recurkit.cli", "ops"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "gla" in r.stdout
