"""Triton's interpreter, without re-patching triton.language on every helper call, and with
the device-side asserts of kernels compiled with ``debug=True``.

Under ``TRITON_INTERPRET=1`` a kernel launch patches ``triton.language`` once (each builtin
replaced by its interpreted form, restored when the launch ends), and then every call of a
``@triton.jit`` helper inside the kernel patches it again: a scan of the whole language,
about 1 ms per call (seen with triton 3.8). Kernels that call helpers in their loops spent a
third of their interpreted time there. A second patch of modules the launch has already
patched changes nothing (an interpreted builtin is no longer a builtin, so the scan replaces
nothing), so :func:`patch_helpers_once` skips it; a helper that reaches a language module the
launch has not patched still patches it as before. Test infrastructure only: the values the
kernels compute are the interpreter's own either way.

The interpreter ignores ``@triton.jit(debug=True)`` and never evaluates ``tl.device_assert``;
:func:`enable_device_asserts` makes it evaluate them in those kernels (raising where a GPU
would stop with a device-side assert), so the tests see the checks they make on a GPU.

:func:`launches_free_their_arguments` frees what each launch holds of its arguments when it
returns, as a GPU launch does, for tests that measure memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc


class _NothingToRestore:
    def restore(self) -> None:
        pass


def patch_helpers_once() -> bool:
    """Install the skip into triton's interpreter; False (nothing changed) if this triton's
    interpreter is not laid out as expected."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    patch_lang = getattr(interpreter, "_patch_lang", None)
    if patch_lang is None or not hasattr(interpreter, "tl"):
        return False
    if getattr(patch_lang, "patches_helpers_once", False):
        return True

    patched_in_this_launch: set[int] = set()

    def language_modules(fn) -> set[int]:
        return {id(value) for value in fn.__globals__.values()
                if value is interpreter.tl or value is interpreter.tl.core}

    def patch_lang_once(fn):
        wanted = language_modules(fn)
        if patched_in_this_launch and wanted <= patched_in_this_launch:
            return _NothingToRestore()  # a helper inside a launch that already patched them
        scope = patch_lang(fn)
        if patched_in_this_launch:
            patched_in_this_launch.update(wanted)
            return scope
        # The launch itself: its scope is restored when the launch ends, and so is our record.
        patched_in_this_launch.update(wanted)
        restore = scope.restore

        def restore_and_forget() -> None:
            patched_in_this_launch.clear()
            restore()

        scope.restore = restore_and_forget
        return scope

    patch_lang_once.patches_helpers_once = True
    interpreter._patch_lang = patch_lang_once
    return True


def enable_device_asserts() -> bool:
    """Evaluate ``tl.device_assert`` (and the integer-overflow checks that come with
    ``debug``) in the kernels jitted with ``debug=True``, as a GPU does; False if this
    triton's interpreter is not laid out as expected."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    function = getattr(interpreter, "InterpretedFunction", None)
    builder = getattr(interpreter, "interpreter_builder", None)
    if function is None or builder is None or not dataclasses.is_dataclass(getattr(builder, "options", None)):
        return False
    if getattr(function.run, "evaluates_device_asserts", False):
        return True
    run = function.run

    def run_with_debug_options(self, *args, **kwargs):
        if not self.kwargs.get("debug"):
            return run(self, *args, **kwargs)
        options = builder.options
        builder.options = dataclasses.replace(options, debug=True)
        try:
            return run(self, *args, **kwargs)
        finally:
            builder.options = options

    run_with_debug_options.evaluates_device_asserts = True
    function.run = run_with_debug_options
    return True


# Approximate float32 math of NVIDIA GPUs (sm_70 .. sm_120), as Triton lowers it, in units in
# the last place of the result (CUDA C++ Programming Guide, mathematical functions appendix;
# PTX ISA, ex2 and div): ``/`` is div.full.f32 (2 ulp), tl.exp2 is ex2.approx.ftz.f32 (2 ulp,
# subnormal results flushed to zero), tl.exp is ex2.approx.f32 of the float32 product
# x * log2(e) (2 ulp after that product's rounding), tl.log and tl.log2 call libdevice (1 ulp),
# tl.erf too (2 ulp), tl.sqrt and tl.rsqrt are sqrt/rsqrt.approx.ftz.f32 (1 and 2 ulp).
# tl.math.div_rn (div.rn.f32) stays correctly rounded. Read off the PTX of sm_90 binaries.
GPU_MATH_ULPS = {"create_fdiv": 2, "create_exp2": 2, "create_exp": 2, "create_log": 1, "create_log2": 1,
                 "create_erf": 2, "create_sqrt": 1, "create_rsqrt": 2}
FLUSHES_SUBNORMALS = {"create_exp2", "create_sqrt", "create_rsqrt"}
# Functions whose approximations are exact where the exact value is a float32 (exp2 of an
# integer, log2 of a power of two: the hardware splits off the exponent). Divisions are
# moved everywhere: div.full.f32 multiplies by an approximate reciprocal.
EXACT_WHERE_REPRESENTABLE = {"create_exp2", "create_exp", "create_log", "create_log2"}
FLOAT64_FUNCTIONS = {"create_exp2": "exp2", "create_exp": "exp2", "create_log": "log", "create_log2": "log2"}
LOG2_E = 1.4426950408889634


def _unit_noise(operands, seed: int):
    """A value in [-1, 1) per element that depends only on the operands' bits and ``seed``
    (murmur3's 64-bit finalizer): like the GPU's approximations, the same inputs give the same
    result, so runs stay reproducible and identical inputs in other layouts agree."""
    import numpy as np

    operands = np.broadcast_arrays(*[np.asarray(value, dtype=np.float32) for value in operands])
    key = np.full(operands[0].shape, seed * 0x9E3779B97F4A7C15 % 2**64, dtype=np.uint64)
    for operand in operands:
        bits = np.ascontiguousarray(operand).view(np.uint32).astype(np.uint64)
        key = (key ^ bits) * np.uint64(0xFF51AFD7ED558CCD)
        key = key ^ (key >> np.uint64(33))
    key = (key ^ (key >> np.uint64(33))) * np.uint64(0xC4CEB9FE1A85EC53)
    key = key ^ (key >> np.uint64(33))
    return (key >> np.uint64(11)).astype(np.float64) * 2.0**-52 - 1.0


def emulate_gpu_math(seed: int) -> bool:
    """Give the interpreter the GPU's approximate float32 math: each result of the operations
    in GPU_MATH_ULPS moves by up to its error bound, by an amount that is a fixed function of
    its operands (and of ``seed``, so that seeds draw different approximations; call again to
    reseed), uniform over the bound: near its worst case far more often than a GPU's error is.
    False if the interpreter is not laid out as expected."""
    import numpy as np

    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    builder = getattr(interpreter, "interpreter_builder", None)
    if builder is None or not all(hasattr(builder, name) for name in GPU_MATH_ULPS):
        return False
    exact_methods = getattr(builder, "exact_math", None) or {name: getattr(builder, name) for name in GPU_MATH_ULPS}
    builder.exact_math = exact_methods

    def approximate(name):
        exact, ulps = exact_methods[name], GPU_MATH_ULPS[name]

        def operation(*args):
            operands = [arg.data for arg in args]
            if name == "create_exp" and operands[0].dtype == np.float32:  # ex2.approx of x * log2(e) in float32
                operands = [operands[0] * np.float32(LOG2_E)]
                result = exact_methods["create_exp2"](interpreter.TensorHandle(operands[0], args[0].dtype.scalar))
            else:
                result = exact(*args)
            data = result.data
            if data.dtype != np.float32:
                return result
            finite = np.isfinite(data)
            step = np.where(finite, np.spacing(np.where(finite, data, 0)), 0)
            if name in EXACT_WHERE_REPRESENTABLE:
                with np.errstate(all="ignore"):
                    wide = getattr(np, FLOAT64_FUNCTIONS[name])(operands[0].astype(np.float64))
                step = np.where(wide == wide.astype(np.float32).astype(np.float64), 0, step)
            noise = _unit_noise(operands, seed * len(GPU_MATH_ULPS) + list(GPU_MATH_ULPS).index(name))
            moved = (data + ulps * step * noise).astype(np.float32)
            if name in FLUSHES_SUBNORMALS:
                moved = np.where(np.abs(moved) < np.float32(2.0**-126), np.float32(0), moved)
            return interpreter.TensorHandle(np.asarray(moved, dtype=np.float32), result.dtype.scalar)
        return operation

    for name in GPU_MATH_ULPS:
        setattr(builder, name, approximate(name))
    return True


def restore_exact_math() -> None:
    """Undo :func:`emulate_gpu_math`: the interpreter's own (correctly rounded) math again."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    for name, method in getattr(builder, "exact_math", {}).items():
        setattr(builder, name, method)


@contextlib.contextmanager
def launches_free_their_arguments():
    """Free each interpreted launch's copies of its arguments when the launch returns.

    The interpreter's host copies of the arguments sit in a reference cycle (a recursive
    closure over them; seen with triton 3.8), so every tensor passed to a kernel lives on
    until the garbage collector's next pass: memory measured under the interpreter would
    hold workspaces that a GPU launch frees at once, by an amount that depends on when the
    collector happens to run. Here a collection follows every launch; the objects alive on
    entry are frozen out of it (``gc.freeze``), so each pass costs microseconds."""
    from triton.runtime import interpreter

    executor = interpreter.GridExecutor
    call = executor.__call__

    def call_and_collect(self, *args, **kwargs):
        try:
            return call(self, *args, **kwargs)
        finally:
            gc.collect()

    gc.collect()
    gc.freeze()
    executor.__call__ = call_and_collect
    try:
        yield
    finally:
        executor.__call__ = call
        gc.unfreeze()
