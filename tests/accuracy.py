"""The accuracy rule of DESIGN.md, shared by every op's tests.

A kernel's error against the float64 reference may be at most ``factor`` (2) times the
error of the plain-PyTorch reference computed in the same precision, plus a small atol.
"""

import torch


def max_error(value: torch.Tensor, exact: torch.Tensor) -> float:
    return (value.double() - exact.double()).abs().max().item()


def rms_error(value: torch.Tensor, exact: torch.Tensor) -> float:
    return (value.double() - exact.double()).square().mean().sqrt().item()


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
    assert error <= bound, f"{what}: error {error:.3e} exceeds {factor} x baseline + atol = {bound:.3e}"


def output_rounding(exact: torch.Tensor, dtype: torch.dtype) -> float:
    """The error any correct float32-accumulating implementation may show at the largest
    magnitude of ``exact``: one unit in the last place of the output ``dtype`` (storing the
    result) plus four float32 units (the order of accumulation, which differs between a
    fused kernel and a chain of PyTorch ops)."""
    eps = torch.finfo(dtype).eps + 4 * torch.finfo(torch.float32).eps
    return eps * exact.abs().max().item()
