"""The accuracy rule of DESIGN.md, shared by every op's tests.

A kernel's error against the float64 reference may be at most ``factor`` (2) times the
error of the plain-PyTorch reference computed in the same precision, plus a small atol.

Every comparison made through this module is recorded in ``checks`` (the test harness clears
it before each test and logs it with ``--accuracy-log``), so that tests/stress.py can show
how close each bound comes to failing over many seeds.
"""

import functools
import math
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map


class Check(NamedTuple):
    what: str
    error: float
    bound: float


checks: list[Check] = []


def record(what: str, error: float, bound: float) -> None:
    checks.append(Check(what, float(error), float(bound)))


def max_error(value: torch.Tensor, exact: torch.Tensor) -> float:
    return (value.double() - exact.double()).abs().max().item()


def rms_error(value: torch.Tensor, exact: torch.Tensor) -> float:
    return (value.double() - exact.double()).square().mean().sqrt().item()


# Operations whose float results are exact (moving, selecting or building values, not
# rounding them): the simulated rounding leaves them alone.
EXACT_OPERATIONS = frozenset("""
    _to_copy _unsafe_view abs alias amax amin as_strided cat clamp clamp_max clamp_min clone constant_pad_nd
    contiguous copy detach diagonal empty_like expand eye fill flip full_like gather index index_put
    index_select lift_fresh masked_fill max maximum min minimum narrow neg new_empty
    new_empty_strided new_ones new_zeros ones_like permute repeat reshape scatter select sign slice split
    split_with_sizes squeeze stack t transpose unbind unsqueeze view where zero zeros_like
""".split())


# Reductions by the index of the operand they sum over and the terms per output, for the
# simulated accumulation error below.
def _inner_dimension(operand_index: int):
    return lambda args, kwargs: (operand_index, args[operand_index].shape[-1])


def _reduced_count(args, kwargs):
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        return 0, args[0].numel()
    dims = [dims] if isinstance(dims, int) else dims
    return 0, math.prod(args[0].shape[dim] for dim in dims)


REDUCTIONS = {"mm": _inner_dimension(0), "bmm": _inner_dimension(0), "addmm": _inner_dimension(1),
              "baddbmm": _inner_dimension(1), "dot": _inner_dimension(0), "mv": _inner_dimension(0),
              "sum": _reduced_count, "mean": _reduced_count}


UNIT_ROUNDOFF = torch.finfo(torch.float32).eps / 2  # 2^-24, float32's: round-to-nearest errs by at most this, relative


@functools.cache
def _rounding_deltas(seed: int, count: int) -> torch.Tensor:
    """``count`` deltas uniform in [-u, u], the same for a seed on every call. Cached: drawing a
    million of them takes longer than many a simulated run (read only, never written)."""
    generator = torch.Generator().manual_seed(seed)
    return UNIT_ROUNDOFF * (2 * torch.rand(count, dtype=torch.float64, generator=generator) - 1)


@functools.cache
def _rounding_factors(seed: int, count: int) -> torch.Tensor:
    """``1 + delta`` for :func:`_rounding_deltas` (cached likewise): most rounded results take
    the factor as it is, one tensor operation fewer each."""
    return 1 + _rounding_deltas(seed, count)


class SimulatedRounding(TorchDispatchMode):
    """Run float64 code as if in float32 with randomized rounding. The result of every
    operation that rounds (arithmetic, reductions, matmuls, transcendentals; not views,
    copies or selections) is multiplied by ``1 + delta``, delta uniform in [-u, u] with u =
    2^-24, float32's unit roundoff (round-to-nearest errs by at most u relative). A sum of k
    terms also accumulates rounding: each term carries about sqrt(k) u of it (a random walk
    over the partial sums), so before a reduction (sum, mean, matmuls) the summed operand's
    elements are multiplied by ``1 + sqrt(k) delta`` (an error relative to the terms, not to
    their sum, as cancellation needs). Each run is one random rounding realization of the
    same algorithm, with the same amplification of each rounding by the operations after it,
    the backward included when it runs inside."""

    def __init__(self, seed: int, pool_size: int = 1 << 20):
        super().__init__()
        # Deltas drawn once per (seed, pool) and used in turn: drawing per operation costs more.
        self.pool_size = pool_size
        self.deltas = _rounding_deltas(seed, pool_size)
        self.factors = _rounding_factors(seed, pool_size)
        self.next = 0

    def _factor(self, value, scale: float = 1.0):
        """``1 + scale * delta`` for each element of ``value``, the next deltas of the pool."""
        count = value.numel()
        if self.next + count > self.pool_size:
            self.next = 0
        pool = self.factors if scale == 1.0 else self.deltas
        taken = pool[self.next:self.next + count] if count <= self.pool_size else \
            pool.repeat(-(-count // self.pool_size))[:count]
        self.next += count
        taken = taken.view(value.shape).to(value.device)
        return taken if scale == 1.0 else 1 + scale * taken

    @staticmethod
    def _rounds(value) -> bool:
        return isinstance(value, torch.Tensor) and value.dtype == torch.float64 and value.numel() > 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__.rstrip("_")
        if name in REDUCTIONS and self._rounds(args[0]):
            index, terms = REDUCTIONS[name](args, kwargs)
            if terms > 1:
                args = list(args)
                args[index] = args[index] * self._factor(args[index], math.sqrt(terms))
        out = func(*args, **kwargs)
        if name in EXACT_OPERATIONS:
            return out

        # An in-place operation's result is rounded in place, and so is a fresh result (the
        # same values, one allocation fewer); a result that views an input is not.
        in_place = func._schema.is_mutable or all(result.alias_info is None for result in func._schema.returns)

        def perturb(value):
            if not self._rounds(value):
                return value
            return value.mul_(self._factor(value)) if in_place else value * self._factor(value)

        return tree_map(perturb, out)


def simulated_float32_runs(fn, *float64_args, runs: int = 4) -> list:
    """``fn(*float64_args)`` under ``runs`` independent :class:`SimulatedRounding` realizations
    (deterministic: realization i uses seed i)."""
    results = []
    for run in range(runs):
        with SimulatedRounding(seed=run):
            results.append(fn(*float64_args))
    return results


def simulated_float32_row_runs(fn, *float64_row_args, runs: int = 16) -> list:
    """``runs`` simulated float32 realizations of ``fn(*float64_row_args)`` (a tuple of
    outputs) for a function that treats each row (index along dim 0) of its arguments on its
    own, in one call: the tensor arguments repeated ``runs`` times along dim 0 under one
    :class:`SimulatedRounding`, so that every copy rounds independently.

    Where one rounding dominates an output's error (a near-tie in a steep sorting comparator
    amplifies it by steepness / pi, and the gradient by its square), that error is about
    uniform between 0 and its largest value, so the worst of m realizations stays below half
    the largest with probability 2^-m: four runs let the factor-2 rule fail about once in
    sixteen draws at such a case (seen: 1.06x the bound in 50 seeds); sixteen make it
    1.5e-5. One call costs far less than sixteen runs where per-operation overhead dominates
    (small rows); at n = 100 (16 copies of 8 permutation matrices of 128 x 128) it is bound
    by memory traffic and costs about half of what sixteen runs would."""
    stacked = [arg.repeat(runs, *(1,) * (arg.dim() - 1)) if isinstance(arg, torch.Tensor) else arg
               for arg in float64_row_args]
    with SimulatedRounding(seed=0, pool_size=1 << 22):  # distinct deltas for 16 copies of (8, 128, 128)
        outputs = fn(*stacked)
    pieces = [output.chunk(runs) for output in outputs]
    return [tuple(piece[run] for piece in pieces) for run in range(runs)]


def float32_baseline(fn, *tensors):
    """``(baseline, exact)`` for ``fn(*tensors)`` (a tensor or a tuple of tensors): exact is its
    float64 run; the baseline, per output, the worst of its float32 run and
    :func:`simulated_float32_runs`."""
    exact = fn(*(tensor.double() for tensor in tensors))
    runs = [fn(*(tensor.float() for tensor in tensors)), *simulated_float32_runs(fn, *(t.double() for t in tensors))]
    if isinstance(exact, torch.Tensor):
        return worst(runs, exact), exact
    return tuple(worst([run[index] for run in runs], value) for index, value in enumerate(exact)), exact


def worst(candidates, exact, statistic=max_error):
    """The float32 baseline of the accuracy rule where one float32 run of the reference is a
    noisy yardstick (its error is one draw of the rounding, and near-cancellations or steep
    comparators amplify single roundings): of several runs that round the same function in
    different, equally valid ways (other plain-PyTorch implementations, and
    :func:`simulated_float32_runs`), the one with the largest error."""
    return max(candidates, key=lambda candidate: statistic(candidate, exact))


def assert_accurate(actual, baseline, exact, *, atol: float = 1e-6, factor: float = 2.0, what: str = "",
                    statistic=max_error):
    """``actual``: kernel output; ``baseline``: PyTorch reference in the same precision;
    ``exact``: float64 reference. Non-finite values in ``actual`` always fail.

    ``statistic``: ``max_error`` by default; ``rms_error`` where rounding errors are amplified
    chaotically (steep sorting networks), so that the largest single error of any float32
    run is a noisy draw while the root mean square over all entries is stable."""
    assert actual.shape == exact.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values in the output"
    error = statistic(actual, exact)
    bound = factor * statistic(baseline, exact) + atol
    record(what, error, bound)
    assert error <= bound, f"{what}: error {error:.3e} exceeds {factor} x baseline + atol = {bound:.3e}"


def output_rounding(exact: torch.Tensor, dtype: torch.dtype) -> float:
    """The error any correct float32-accumulating implementation may show at the largest
    magnitude of ``exact``: one unit in the last place of the output ``dtype`` (storing the
    result) plus four float32 units (the order of accumulation, which differs between a
    fused kernel and a chain of PyTorch ops)."""
    eps = torch.finfo(dtype).eps + 4 * torch.finfo(torch.float32).eps
    return eps * exact.abs().max().item()


# torch.testing.assert_close's defaults, by dtype (its documentation's table).
DEFAULT_TOLERANCES = {torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5), torch.float32: (1.3e-6, 1e-5),
                      torch.float64: (1e-7, 1e-7)}


def assert_close(actual, expected, *, rtol: float | None = None, atol: float | None = None, what: str = "",
                 **kwargs):
    """``torch.testing.assert_close`` (the same defaults) that also records the comparison,
    with error ``max |actual - expected| / (atol + rtol |expected|)`` against a bound of 1.
    ``what`` names it in the record and in the failure's message."""
    if rtol is None and atol is None and isinstance(actual, torch.Tensor):
        rtol, atol = DEFAULT_TOLERANCES.get(actual.dtype, (0.0, 0.0))
    if (isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor) and actual.is_floating_point()
            and actual.shape == expected.shape and actual.numel()):
        record(what, tolerance_ratio(actual, expected, rtol, atol, kwargs.get("equal_nan", False)), 1.0)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol,
                               msg=(lambda message: f"{what}: {message}") if what else None, **kwargs)


def tolerance_ratio(actual, expected, rtol, atol, equal_nan=False) -> float:
    """The largest ``|actual - expected| / (atol + rtol |expected|)``: 0 where the two are equal
    (infinities and, with ``equal_nan``, NaNs included), infinite where one is not finite."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    equal = (actual == expected) | (equal_nan & actual.isnan() & expected.isnan())
    ratio = (actual - expected).abs() / (atol + rtol * expected.abs())
    return torch.where(equal, 0.0, ratio.nan_to_num(nan=float("inf"))).max().item()
