"""Build entry point: package metadata lives in pyproject.toml; this file builds the native
extension fastssl._C (csrc/ and kernels/) through CMake and Ninja.

- A C++ compiler and CMake present: the C++ CPU kernels are built, and the CUDA kernels too
  when CMake finds nvcc: for FASTSSL_CUDA_ARCHS (CMake's syntax, e.g. "86"), by default for
  every NVIDIA target of fastssl/devices.py that this nvcc can build, with the newest one's
  PTX for later GPUs. A build that starts and fails fails the install: a broken kernel must
  not pass unnoticed.
- No C++ compiler or no CMake: the extension is skipped with a warning, the package installs
  and runs on its Triton and reference backends, and ``fastssl info`` says why.
- FASTSSL_NO_NATIVE=1 skips the extension on purpose.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _missing_tool() -> str | None:
    if os.environ.get("FASTSSL_NO_NATIVE", "0") not in ("", "0"):
        return "FASTSSL_NO_NATIVE is set"
    if shutil.which("cmake") is None:
        return "CMake was not found"
    if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
        return "no C++ compiler was found"
    return None


def default_cuda_archs() -> str:
    """The NVIDIA architectures of fastssl/devices.py (read as text: the build environment has
    no torch) that the CUDA compiler lists, as CMake's CUDA_ARCHITECTURES: binaries for
    each, and PTX of the newest too, which the driver compiles for GPUs newer than all."""
    nvcc = os.environ.get("CUDACXX") or shutil.which("nvcc")
    if nvcc is None:
        return ""
    listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True).stdout
    buildable = {int(arch) for arch in re.findall(r"compute_(\d+)", listed)}
    targets = {int(arch) for arch in re.findall(r'"sm_(\d+)"', (ROOT / "fastssl" / "devices.py").read_text())}
    archs = sorted(targets & buildable)
    return ";".join([f"{arch}-real" for arch in archs[:-1]] + [str(arch) for arch in archs[-1:]])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        reason = _missing_tool()
        if reason is not None:
            print(f"warning: fastssl._C is not built ({reason}); the triton and reference backends remain",
                  file=sys.stderr)
            return
        output_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir),
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={output_dir}",
        ]
        archs = os.environ.get("FASTSSL_CUDA_ARCHS") or default_cuda_archs()
        if archs:
            configure.append(f"-DFASTSSL_CUDA_ARCHS={archs}")
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel"], check=True)


setup(ext_modules=[CMakeExtension("fastssl._C")], cmdclass={"build_ext": CMakeBuild})
