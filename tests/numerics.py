"""Tolerance helpers shared by the correctness tests."""

from __future__ import annotations

import torch


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ over the whole tensor (DESIGN.md's gradient criterion)."""
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def assert_relative_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5, name=""):
    """Fail with the measured error when the relative error exceeds `tol`."""
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    error = relative_error(actual, expected)
    assert error <= tol, f"{name}: relative error {error:.3e} > {tol:.0e}"
