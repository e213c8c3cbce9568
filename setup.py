"""Build entry point.

All metadata lives in pyproject.toml. This file exists so that the native extension
(fastssl._C, built from csrc/ and kernels/ through CMake) can hook into the build; until
then it is a plain setuptools call.
"""

from setuptools import setup

setup()
