"""The `relucap` command line: entry point, smoke command, argument errors."""

import subprocess
import sys

import pytest

from relucap_plugin.cli import main


def test_info_lists_versions_and_activations(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "relucap-plugin" in out and "torch" in out
    assert "capped_relu(cap=6)" in out and "pssilu" in out
    assert "[0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0]" in out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: relucap" in capsys.readouterr().out


def test_unknown_command_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_console_script_is_installed():
    done = subprocess.run([sys.executable, "-m", "relucap_plugin.cli", "--version"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and "relucap-plugin" in done.stdout
