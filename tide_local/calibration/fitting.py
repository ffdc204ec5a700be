"""Timing and fitting for the profile: robust timers, a non-negative least-squares fit, and
the coefficients of each measured stage, assembled into the planner's `Costs`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from tide_local import architecture
from tide_local.planner.cost import Costs

COPIES_PER_EXPERT = len(architecture.EXPERT_PROJECTIONS)  # an expert is gate, up and down


@dataclass
class Evidence:
    """What a profile keeps beside its coefficients: each stage's timed points, and the median
    relative error of its fit."""

    samples: dict = field(default_factory=dict)
    fit_errors: dict = field(default_factory=dict)


@dataclass(frozen=True)
class UploadCosts:
    """Uploading experts: per copy (one projection's slice), per byte, per layer that uploads."""

    per_copy_s: float = 0.0
    per_byte_s: float = 0.0
    per_call_s: float = 0.0


@dataclass(frozen=True)
class ExpertCosts:
    """One side's expert work in a layer: per call, per weight byte read, per FLOP."""

    per_call_s: float = 0.0
    per_weight_byte_s: float = 0.0
    per_flop_s: float = 0.0


@dataclass(frozen=True)
class FixedCosts:
    """The fixed work of a pass: per MoE layer (constant, per token, per token and key) and the LM head."""

    layer_s: float = 0.0
    layer_per_token_s: float = 0.0
    layer_per_token_key_s: float = 0.0
    logits_pass_s: float = 0.0


def assemble_costs(cpu: ExpertCosts, device: ExpertCosts, *, uploads: UploadCosts = UploadCosts(),
                   fixed: FixedCosts = FixedCosts(), overlap_slowdown: float = 1.0) -> Costs:
    """The planner's `Costs` from the stages measured so far (the others cost nothing)."""
    return Costs(
        upload_per_copy_s=uploads.per_copy_s,
        upload_per_byte_s=uploads.per_byte_s,
        copies_per_expert=COPIES_PER_EXPERT,
        upload_per_call_s=uploads.per_call_s,
        cpu_per_call_s=cpu.per_call_s,
        cpu_per_weight_byte_s=cpu.per_weight_byte_s,
        cpu_per_flop_s=cpu.per_flop_s,
        device_per_call_s=device.per_call_s,
        device_per_weight_byte_s=device.per_weight_byte_s,
        device_per_flop_s=device.per_flop_s,
        layer_s=fixed.layer_s,
        layer_per_token_s=fixed.layer_per_token_s,
        layer_per_token_key_s=fixed.layer_per_token_key_s,
        logits_pass_s=fixed.logits_pass_s,
        overlap_slowdown=overlap_slowdown,
    )


def fit_nonnegative(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Least squares in relative error with non-negative coefficients (a feature whose
    coefficient comes out negative is dropped and the rest refitted). Returns the
    coefficients and the median relative error of the fit."""
    X, y = np.asarray(X, dtype=float), np.asarray(y, dtype=float)
    w = 1.0 / np.maximum(y, 1e-9)
    active = list(range(X.shape[1]))
    coef = np.zeros(X.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(X[:, active] * w[:, None], y * w, rcond=None)
        if (sol >= 0).all():
            coef[:] = 0
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    err = float(np.median(np.abs(X @ coef - y) / np.maximum(y, 1e-12))) if len(y) else 0.0
    return coef, err


def fit_expert_costs(points: list[tuple[int, int]], seconds: list[float], expert_bytes: int,
                     flops_per_row: int) -> tuple[ExpertCosts, float]:
    """Fit ``c0 + c1·experts·expert_bytes + c2·rows·flops`` to (rows, distinct experts) points."""
    X = np.column_stack([np.ones(len(points)), [d * expert_bytes for _, d in points],
                         [r * flops_per_row for r, _ in points]])
    (c0, c1, c2), err = fit_nonnegative(X, seconds)
    return ExpertCosts(float(c0), float(c1), float(c2)), err


def median_time(fn, repeat: int) -> float:
    """Median seconds of `repeat` calls of `fn`, after one warm-up call (graphs, caches)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def timed(fn, *args) -> float:
    """Seconds one call of `fn(*args)` takes."""
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0
