"""Build entry point: package metadata lives in pyproject.toml; this file builds the native
extension fastssl._C (csrc/ and kernels/) through CMake and Ninja.

- A C++ compiler and CMake present: the C++ CPU kernels are built, and the CUDA kernels too
  when CMake finds nvcc (architectures from FASTSSL_CUDA_ARCHS, default "80;90"). A build
  that starts and fails fails the install: a broken kernel must not pass unnoticed.
- No C++ compiler or no CMake: the extension is skipped with a warning, the package installs
  and runs on its Triton and reference backends, and ``fastssl info`` says why.
- FASTSSL_NO_NATIVE=1 skips the extension on purpose.
"""

import os
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
            f"-DFASTSSL_CUDA_ARCHS={os.environ.get('FASTSSL_CUDA_ARCHS', '80;90')}",
        ]
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel"], check=True)


setup(ext_modules=[CMakeExtension("fastssl._C")], cmdclass={"build_ext": CMakeBuild})
