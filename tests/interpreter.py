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
"""

from __future__ import annotations

import dataclasses


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
