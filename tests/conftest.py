"""Test harness shared by every op.

- Without a CUDA device the Triton interpreter is enabled (before triton is imported), so
  the kernels run on the CPU.
- ``@pytest.mark.gpu`` tests need CUDA and are skipped without it; ``pytest -m gpu`` runs them.
- Deterministic by default: every test seeds torch, numpy and ``random`` from a seed fixed by
  its own node id, so every run on every machine draws the same inputs. ``--seeds N`` runs
  each test with N seeds (``--first-seed`` shifts the range; seed index 0 is the default
  run's), ``FASTSSL_TEST_SEED=random`` draws fresh seeds, ``FASTSSL_TEST_SEED=<int>`` replays
  one; a failure prints its replay line. ``--accuracy-log FILE`` writes every test's accuracy
  checks (error and bound of each, from tests/accuracy.py) as JSON lines for tests/stress.py.
- Under the interpreter, helper calls inside a kernel do not re-patch triton.language
  (tests/interpreter.py): a third of the interpreted time, with the same values; and the
  device-side asserts of ``@triton.jit(debug=True)`` kernels are evaluated, as on a GPU.
  ``FASTSSL_GPU_MATH=1`` also gives the interpreted kernels the GPU's approximate division,
  exponentials and logarithms (each result moved randomly within its documented error).
- Reductions split across threads round differently with another thread count, so the tests
  run torch's and the native extension's OpenMP threads at the CI machine's count.

The interpreter truncates float32 -> bfloat16 conversions (even with
``fp_downcast_rounding="rtne"``; seen with triton 3.8) where GPUs round to nearest even. So
kernels round to bfloat16 only when storing an output, which the tests allow one bfloat16
unit for (``accuracy.output_rounding``), and do arithmetic on float32 values.
"""

import json
import os
import random
import re
import zlib

# The CI machine's cores; tests/stress.py runs one pytest process per core with one thread each.
TEST_THREADS = int(os.environ.get("FASTSSL_TEST_THREADS", "2"))
os.environ["OMP_NUM_THREADS"] = str(TEST_THREADS)  # read by every OpenMP runtime at its first use

import numpy  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(TEST_THREADS)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import accuracy  # noqa: E402
import interpreter  # noqa: E402
import pytest  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# FASTSSL_GPU_MATH=1: the interpreted kernels get the GPU's approximate float32 division,
# exponentials and logarithms (tests/interpreter.py), drawn from each test's seed.
GPU_MATH = INTERPRETING and os.environ.get("FASTSSL_GPU_MATH", "0") not in ("", "0")
if INTERPRETING:
    interpreter.patch_helpers_once()
    interpreter.enable_device_asserts()

SEED_VARIABLE = "FASTSSL_TEST_SEED"


def pytest_addoption(parser):
    group = parser.getgroup("fastssl seeds")
    group.addoption("--seeds", type=int, default=1, metavar="N",
                    help="run every test with N seeds: seed indices --first-seed .. --first-seed + N - 1")
    group.addoption("--first-seed", type=int, default=0, metavar="I",
                    help="first seed index (0, the default run's seed, unless given)")
    group.addoption("--accuracy-log", metavar="FILE",
                    help="append one JSON line per test: its seed, outcome and accuracy checks")
    group.addoption("--tests-from", metavar="FILE",
                    help="run only the tests whose ids (without the seed parameter) are lines of FILE; a "
                         "line 'ID<tab>I' selects that test's seed index I only")


def pytest_configure(config):
    if config.getoption("seeds") < 1 or config.getoption("first_seed") < 0:
        raise pytest.UsageError("--seeds must be >= 1 and --first-seed >= 0")
    # Inputs built at collection time (parametrize lists) are drawn from a fixed state too.
    torch.manual_seed(0)


def pytest_generate_tests(metafunc):
    first, count = metafunc.config.getoption("first_seed"), metafunc.config.getoption("seeds")
    if (first, count) != (0, 1):
        metafunc.parametrize("seed", range(first, first + count), indirect=True, ids=lambda i: f"seed{i}")


def pytest_collection_modifyitems(config, items):
    listed = config.getoption("tests_from")
    if listed:
        with open(listed) as file:
            wanted = set(file.read().split("\n"))

        def selected(item) -> bool:
            test = base_nodeid(item.nodeid)
            return test in wanted or f"{test}\t{seed_index(item)}" in wanted

        config.hook.pytest_deselected(items=[item for item in items if not selected(item)])
        items[:] = [item for item in items if selected(item)]
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def base_nodeid(nodeid: str) -> str:
    """The node id without the ``seedI`` parameter that ``--seeds`` adds."""
    head, bracket, params = nodeid.partition("[")
    if not bracket:
        return nodeid
    kept = [part for part in params[:-1].split("-") if not re.fullmatch(r"seed\d+", part)]
    return f"{head}[{'-'.join(kept)}]" if kept else head


def seed_index(item) -> int:
    """The seed index ``--seeds`` gave ``item`` (0 without it)."""
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("seed", 0) if callspec else 0


def seed_value(test: str, index: int) -> int:
    chosen = os.environ.get(SEED_VARIABLE, "")
    if chosen == "random":
        return random.SystemRandom().randrange(2**31)
    if chosen:
        return int(chosen)
    return zlib.crc32(f"{test}#{index}".encode()) & 0x7FFFFFFF


@pytest.fixture(autouse=True)
def seed(request):
    index = seed_index(request.node)
    value = seed_value(base_nodeid(request.node.nodeid), index)
    torch.manual_seed(value)
    numpy.random.seed(value)
    random.seed(value)
    if GPU_MATH and not interpreter.emulate_gpu_math(value):
        pytest.fail("FASTSSL_GPU_MATH is set, but this triton's interpreter cannot take the GPU's math")
    accuracy.checks.clear()
    request.node.user_properties += [("seed", value), ("seed_index", index)]
    return value


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    properties = dict(item.user_properties)
    if "seed" not in properties or not (report.when == "call" or report.failed):
        return
    if report.failed:
        report.sections.append(("seed", f"replay with {SEED_VARIABLE}={properties['seed']} "
                                        f"pytest '{base_nodeid(item.nodeid)}'"))
    log = item.config.getoption("accuracy_log")
    if log:
        line = dict(test=base_nodeid(item.nodeid), seed_index=properties["seed_index"], seed=properties["seed"],
                    outcome=report.outcome, when=report.when, duration=report.duration,
                    checks=[check._asdict() for check in accuracy.checks])
        with open(log, "a") as file:
            file.write(json.dumps(line) + "\n")


@pytest.fixture
def poisoned_outputs():
    """Make torch.empty return NaN-filled memory, so a kernel that leaves part of its
    output unwritten fails the accuracy checks instead of passing on lucky zeros."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)
    torch.utils.deterministic.fill_uninitialized_memory = previous_fill


def kernel_devices():
    """Where the Triton kernels run: the CPU under the interpreter, and CUDA (marked gpu)."""
    return [
        pytest.param("cpu", id="cpu-interpreter"),
        pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
    ]


@pytest.fixture
def kernel_device(request):
    device = request.param
    if device == "cpu" and not INTERPRETING:
        pytest.skip("the Triton interpreter is off (a CUDA device is present)")
    return device


def kernel_backends(native: bool = False):
    """(backend, device) pairs that run an op's kernels: Triton on the CPU (interpreter) and
    on CUDA, and with ``native`` the kernels of fastssl._C (C++ on the CPU, CUDA)."""
    params = [
        pytest.param(("triton", "cpu"), id="triton-interpreter"),
        pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.gpu),
    ]
    if native:
        params += [
            pytest.param(("cpp", "cpu"), id="cpp"),
            pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.gpu),
        ]
    return params


@pytest.fixture
def kernel_backend(request):
    backend, device = request.param
    if backend == "triton" and device == "cpu" and not INTERPRETING:
        pytest.skip("the Triton interpreter is off (a CUDA device is present)")
    return backend, device



class AllocationRecorder(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns, allocations included (for tests
    that no buffer of some size is ever created)."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.shapes.add(tuple(value.shape))
        return out
