"""The top-level CLI: a quick start that needs no torch, and user errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys

from tunesmith.cli import main


def test_help_is_a_quick_start_and_does_not_import_torch():
    code = (
        "import sys, time; t = time.perf_counter(); from tunesmith.cli import main; "
        "rc = main(['--help']); assert rc == 0; "
        "print('torch' in sys.modules, 'transformers' in sys.modules, time.perf_counter() - t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    *_, last = out.strip().splitlines()
    torch_loaded, transformers_loaded, seconds = last.split()
    assert (torch_loaded, transformers_loaded) == ("False", "False")
    assert float(seconds) < 1.0
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
