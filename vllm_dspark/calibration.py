"""Calibration of the confidence head: sequential temperature scaling (STS), saved next to the drafter.

c_k = sigmoid(z_k / t_k) and survival a_k = prod_{i<=k} c_i; ``vllm-dspark calibrate`` fits t_1..t_K on
verified rounds and the proposer applies them before planning. Pure numpy (torch tensors are accepted).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np

__all__ = ["CALIBRATION_FILE", "apply_temperature", "survival", "fit_sequential_temperature", "load_calibration",
           "save_calibration"]

CALIBRATION_FILE = "dspark_calibration.json"


def _to_numpy(x, dtype=np.float64) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)

_DEFAULT_GRID = np.geomspace(0.05, 20.0, 200)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free


def _ece_rows(p: np.ndarray, y: np.ndarray, num_bins: int) -> np.ndarray:
    """ECE of each row of p [G, N] against labels y [N] (same equal-width bins as the metric)."""
    g, n = p.shape
    idx = np.clip((p * num_bins).astype(np.int64), 0, num_bins - 1) + num_bins * np.arange(g)[:, None]
    gap = np.bincount(idx.ravel(), weights=(y[None, :] - p).ravel(), minlength=g * num_bins)
    return np.abs(gap.reshape(g, num_bins)).sum(1) / n


def fit_sequential_temperature(
    z, accepted_len, num_bins: int = 10, drafted=None, grid=None, min_reached: int = 30
) -> np.ndarray:
    """Per-position temperatures t_1..t_K by sequential temperature scaling.

    c_k = sigmoid(z_k / t_k) and survival a_k = prod_{i<=k} c_i.  Left to right, t_k is the grid value that
    minimises the ECE of a_k against the label ``accepted_len >= k`` with t_1..t_{k-1} already fixed.
    Among equally good temperatures the one closest to 1 (in log space) wins, so a position with no signal
    is left alone.

    Args:
        z:            [N, K] confidence logits (pre-sigmoid) per draft position.
        accepted_len: [N] accepted drafts per round (0..K).
        num_bins:     ECE bins.
        drafted:      [N] drafts per round (default K); position k is fitted only on rounds with drafted >= k.
        grid:         candidate temperatures (default 200 log-spaced points in [0.05, 20]).
        min_reached:  a position reached (its predecessors accepted) by fewer rounds keeps 1.0: with a handful
                      of rounds the ECE is noise and the best temperature lands on the grid's bounds
                      (SmolLM2's drafter: 0.05 and 20 at positions 5-7, reached by < 10 of ~1000 rounds).
    Returns:
        [K] temperatures (1.0 for a position too few rounds reached).
    """
    zz = _to_numpy(z)
    if zz.ndim != 2:
        raise ValueError(f"z must be [N, K], got shape {zz.shape}")
    n, k_max = zz.shape
    acc = _to_numpy(accepted_len, np.int64).reshape(-1)
    dr = np.full(n, k_max, dtype=np.int64) if drafted is None else _to_numpy(drafted, np.int64).reshape(-1)
    if acc.shape[0] != n or dr.shape[0] != n:
        raise ValueError(f"z has {n} rows but accepted_len has {acc.shape[0]} and drafted {dr.shape[0]}")
    temps_grid = _DEFAULT_GRID if grid is None else np.asarray(grid, dtype=np.float64)
    if temps_grid.ndim != 1 or temps_grid.size == 0 or (temps_grid <= 0).any():
        raise ValueError("grid must be a non-empty 1-D array of positive temperatures")
    closeness = np.abs(np.log(temps_grid))

    temps = np.ones(k_max)
    prefix = np.ones(n)  # a_{k-1} per round with the temperatures fitted so far
    for k in range(k_max):
        m = dr >= k + 1
        if int((m & (acc >= k)).sum()) >= min_reached:
            y = (acc[m] >= k + 1).astype(np.float64)
            zk, pk = zz[m, k], prefix[m]
            # Chunk the grid so the [G, N] matrix stays small for large N.
            step = max(1, 2_000_000 // max(1, zk.size))
            eces = np.concatenate([
                _ece_rows(pk[None, :] * _sigmoid(zk[None, :] / temps_grid[i:i + step, None]), y, num_bins)
                for i in range(0, temps_grid.size, step)
            ])
            best = np.flatnonzero(eces <= eces.min() + 1e-12)
            temps[k] = temps_grid[best[np.argmin(closeness[best])]]
        prefix = prefix * _sigmoid(zz[:, k] / temps[k])
    return temps


def apply_temperature(z, temps):
    """[N, K] logits -> [N, K] calibrated survival cumprod(sigmoid(z / t)).

    Accepts numpy or torch (result on the same device).  ``z`` may have fewer positions than ``temps``.
    """
    t = np.asarray(temps, dtype=np.float64).reshape(-1)
    k = z.shape[-1]
    if k > t.shape[0]:
        raise ValueError(f"z has {k} positions but only {t.shape[0]} temperatures")
    t = t[:k]
    if hasattr(z, "sigmoid"):  # torch
        return (z / z.new_tensor(t)).sigmoid().cumprod(-1)
    return np.cumprod(_sigmoid(_to_numpy(z) / t), axis=-1)


def save_calibration(path: str | os.PathLike, temps, meta: Mapping | None = None) -> str:
    """Write temperatures (and free-form metadata) as JSON; a directory gets ``CALIBRATION_FILE``."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, CALIBRATION_FILE)
    t = np.asarray(temps, dtype=np.float64).reshape(-1)
    _check_temps(t, path)
    with open(path, "w") as f:
        json.dump({"format": "dspark-sts", "version": 1, "temperatures": t.tolist(), "meta": dict(meta or {})},
                  f, indent=2)
    return path


def load_calibration(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Read ``(temperatures [K], meta)`` written by :func:`save_calibration`."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, CALIBRATION_FILE)
    with open(path) as f:
        data = json.load(f)
    if data.get("format") != "dspark-sts":
        raise ValueError(f"{path}: format={data.get('format')!r}, expected 'dspark-sts'")
    t = np.asarray(data["temperatures"], dtype=np.float64)
    _check_temps(t, path)
    return t, dict(data.get("meta", {}))


def _check_temps(t: np.ndarray, where: str) -> None:
    if t.ndim != 1 or not np.isfinite(t).all() or (t <= 0).any():
        raise ValueError(f"{where}: temperatures must be positive and finite, got {t.tolist()}")


def survival(z, temps=None) -> np.ndarray:
    """[N, K] confidence logits -> survival cumprod(sigmoid(z / t)), uncalibrated (t = 1) without ``temps``."""
    return apply_temperature(z, np.ones(z.shape[-1]) if temps is None else temps)
