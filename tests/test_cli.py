"""The CLI shell: help, info, unknown commands, every registered command importable."""

import importlib
import subprocess
import sys

import pytest

from diyllm import __version__
from diyllm.cli import COMMANDS, main


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "diyllm", "--help"], capture_output=True, text=True).stdout
    for name in COMMANDS:
        assert name in out


def test_info_prints_versions(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert __version__ in out and "torch" in out and "threads" in out and "device   cpu" in out


def test_unknown_command_is_an_error():
    proc = subprocess.run([sys.executable, "-m", "diyllm", "trian"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_registered_command_module_exists_and_has_help(name):
    module = importlib.import_module(COMMANDS[name][0])
    assert callable(module.add_arguments) and callable(module.run)
    proc = subprocess.run([sys.executable, "-m", "diyllm", name, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"diyllm {name}" in proc.stdout
