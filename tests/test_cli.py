"""The top-level CLI: a quick start that needs no torch, and user errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys

from tunesmith.cli import main


def test_help_is_a_quick_start_and_does_not_import_torch():
    # what keeps --help instant is not importing torch or transformers (seconds each); a wall-clock limit is not
    # asserted, since on a busy machine it fails for reasons the code does not control
    code = (
        "import sys; from tunesmith.cli import main; rc = main(['--help']); assert rc == 0; "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    *_, last = out.strip().splitlines()
    assert last.split() == ["False", "False"]
    assert "tunesmith data check" in out and "tunesmith train" in out


def test_subcommand_help_is_light_too():
    code = "import sys; from tunesmith.cli import main; main(['train', '--help']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")
    assert "--lora.r 8" in out


def test_unknown_command_and_missing_file_are_user_errors(capsys, tmp_path):
    assert main(["trian"]) == 2
    assert "No such command 'trian'" in capsys.readouterr().err
    assert main(["data", "check", str(tmp_path / "missing.jsonl")]) == 2
