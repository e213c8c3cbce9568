import subprocess
import sys

from fastssl.cli import main


def test_info_lists_versions_devices_and_backends_with_reasons(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for expected in ("fastssl  0.1.0", "torch    ", "triton   ", "backends on cpu:", "reference  available"):
        assert expected in out
    assert "cuda       unavailable: needs a CUDA device, got cpu" in out


def test_console_entry_point_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "fastssl", "info"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "backends on cpu:" in result.stdout


def test_unknown_command_fails():
    result = subprocess.run([sys.executable, "-m", "fastssl", "bogus"], capture_output=True, text=True)
    assert result.returncode != 0
    assert "invalid choice" in result.stderr
