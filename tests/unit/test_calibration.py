"""Sequential temperature scaling of the confidence head, and its file next to the drafter."""

import json

import numpy as np
import pytest
import torch

from vllm_dspark.calibration import (CALIBRATION_FILE, apply_temperature, fit_sequential_temperature,
                                     load_calibration, save_calibration, survival)
from vllm_dspark.eval.metrics import calibration_report


def synthetic_rounds(rng, n, k, overconfidence):
    """True per-round conditional acceptances, sequential accept outcomes, over-confident logits."""
    p = rng.uniform(0.15, 0.97, size=(n, k))
    accepted = (rng.uniform(size=(n, k)) < p).cumprod(axis=1).sum(axis=1)
    z = overconfidence * np.log(p / (1 - p))
    return z, accepted


def test_sts_lowers_ece_on_held_out_rounds():
    rng = np.random.default_rng(4)
    k = 5
    z_fit, acc_fit = synthetic_rounds(rng, 20000, k, overconfidence=3.0)
    z_test, acc_test = synthetic_rounds(rng, 20000, k, overconfidence=3.0)
    temps = fit_sequential_temperature(z_fit, acc_fit, num_bins=10)
    assert temps.shape == (k,)
    assert 2.0 < temps[0] < 4.5  # undoes the 3x over-confidence at the first position
    before = calibration_report(apply_temperature(z_test, np.ones(k)), acc_test)["ece"]
    after = calibration_report(apply_temperature(z_test, temps), acc_test)["ece"]
    for k_, (b, a) in enumerate(zip(before, after), start=1):
        assert a < 0.5 * b and a < 0.03, (k_, b, a)


def test_sts_leaves_calibrated_logits_near_one_and_respects_drafted():
    rng = np.random.default_rng(5)
    z, acc = synthetic_rounds(rng, 20000, 3, overconfidence=1.0)
    temps = fit_sequential_temperature(z, acc)
    assert np.all((temps > 0.7) & (temps < 1.4)), temps
    # Rounds that drafted fewer positions do not vote for the later ones; no round reached k=3 -> 1.0.
    drafted = np.minimum(2, rng.integers(1, 4, size=z.shape[0]))
    temps2 = fit_sequential_temperature(z * 3.0, np.minimum(acc, drafted), drafted=drafted)
    assert temps2[2] == 1.0 and temps2[0] > 2.0
    # A position few rounds reach keeps 1.0 (the fit would land on the grid's bounds); with the floor
    # lowered the same rounds give a temperature far from 1.
    sparse_acc = np.minimum(acc, 1)
    sparse_acc[:12] = 3  # 12 rounds reach position 3 (and 2)
    rare = fit_sequential_temperature(z * 3.0, sparse_acc)
    assert rare[2] == 1.0 and rare[0] > 2.0
    assert fit_sequential_temperature(z * 3.0, sparse_acc, min_reached=1)[2] != 1.0


def test_apply_temperature_numpy_and_torch_agree():
    z = np.array([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    temps = np.array([2.0, 0.5, 1.0])
    expected = np.cumprod(1 / (1 + np.exp(-z / temps)), axis=1)
    np.testing.assert_allclose(apply_temperature(z, temps), expected, rtol=1e-12)
    got = apply_temperature(torch.tensor(z, dtype=torch.float64), temps)
    assert isinstance(got, torch.Tensor)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(apply_temperature(z[:, :2], temps), expected[:, :2])
    with pytest.raises(ValueError, match="temperatures"):
        apply_temperature(z, temps[:2])


def test_calibration_json_round_trip(tmp_path):
    temps = np.array([1.5, 2.25, 0.75])
    path = save_calibration(tmp_path, temps, {"drafter": "toy", "rounds": 123})
    assert path.endswith(CALIBRATION_FILE)
    loaded, meta = load_calibration(tmp_path)
    np.testing.assert_array_equal(loaded, temps)
    assert meta == {"drafter": "toy", "rounds": 123}
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other", "temperatures": [1.0]}))
    with pytest.raises(ValueError, match="format"):
        load_calibration(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="positive"):
        save_calibration(tmp_path / "x.json", [1.0, -1.0])


def test_survival_is_the_product_of_sigmoids():
    z = np.array([[0.0, 2.0, -1.0]])
    sig = 1 / (1 + np.exp(-z))
    np.testing.assert_allclose(survival(z), np.cumprod(sig, axis=1))
    np.testing.assert_allclose(survival(z, [1.0, 2.0, 0.5]), np.cumprod(1 / (1 + np.exp(-z / [1.0, 2.0, 0.5])), axis=1))
