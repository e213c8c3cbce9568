import os
import subprocess
import sys
from pathlib import Path

from fastssl.devices import ARCHITECTURES


def test_every_kernel_configuration_compiles_and_fits_every_target():
    """The interpreter checks values; this checks that the configurations the launchers choose
    for every target GPU build for it, fit its shared memory, and spill nothing in the
    recipes' 16-bit kernels (ahead-of-time compilation, no GPU needed), the same for the CUDA
    C++ kernels, and that the README's tables are this run's. See tests/compile_kernels.py."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTSSL_TARGET")}
    script = Path(__file__).with_name("compile_kernels.py")
    result = subprocess.run([sys.executable, str(script), "--check-readme"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
    for name in ARCHITECTURES:
        assert f"\n{name} (" in "\n" + result.stdout
