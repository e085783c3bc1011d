"""RoPE of the draft layers: each type against the formulas written out here, configs read as transformers
reads them, unsupported types refused, and a transformers-5 checkpoint drafting what its top-level twin does."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests.unit.test_checkpoint import (BLOCK, H, LAYER_IDS, deepspec_config, deepspec_weights,  # noqa: F401
                                       target_dir, write_drafter)
from vllm_dspark.checkpoint import check_main, load_drafter
from vllm_dspark.config import DSparkConfig, DSparkConfigError
from vllm_dspark.model.rope import Rope

D, MAX_POS = 64, 4096
POSITIONS = [0, 1, 2, 7, 100, 511, 1000, 4095, 9000]

CASES = {
    "default": {"rope_type": "default", "rope_theta": 1e5},
    "linear": {"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0},
    "dynamic-trained": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0, "max_trained_positions": 2048},
    "yarn": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 1024},
    "yarn-mscale": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0, "original_max_position_embeddings": 512,
                    "beta_fast": 16, "beta_slow": 2, "mscale": 0.707, "mscale_all_dim": 1.0},
    "yarn-attention-factor": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0, "attention_factor": 1.3,
                              "original_max_position_embeddings": 512, "truncate": False},
    "llama3": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "llama3-short": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 512},
}


# ------------------------------------------------------------------ the formulas, one frequency at a time
def frequencies_by_hand(p: dict) -> tuple[list[float], float]:
    """(theta_i for i < D/2, cos/sin scale) from the papers' / model cards' formulas."""
    base, kind = p["rope_theta"], p["rope_type"]
    if kind == "dynamic":  # NTK-aware base at max_position over the trained length (vLLM's static form)
        trained = p.get("max_trained_positions", MAX_POS)
        base = base * (p["factor"] * MAX_POS / trained - (p["factor"] - 1)) ** (D / (D - 2))
    plain = [base ** (-2 * i / D) for i in range(D // 2)]
    if kind in ("default", "dynamic"):
        return plain, 1.0
    if kind == "linear":  # position interpolation: position / factor
        return [f / p["factor"] for f in plain], 1.0
    if kind == "llama3":
        out, orig = [], p["original_max_position_embeddings"]
        for f in plain:
            wavelen = 2 * math.pi / f
            if wavelen < orig / p["high_freq_factor"]:
                out.append(f)
            elif wavelen > orig / p["low_freq_factor"]:
                out.append(f / p["factor"])
            else:
                s = (orig / wavelen - p["low_freq_factor"]) / (p["high_freq_factor"] - p["low_freq_factor"])
                out.append((1 - s) * f / p["factor"] + s * f)
        return out, 1.0
    assert kind == "yarn"  # YaRN (Peng et al. 2023): ramp between extrapolated and interpolated frequencies
    orig, factor = p["original_max_position_embeddings"], p["factor"]

    def dim_of(rotations):
        return D * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))
    low, high = dim_of(p.get("beta_fast", 32)), dim_of(p.get("beta_slow", 1))
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, D - 1)
    out = []
    for i, f in enumerate(plain):
        ramp = min(1.0, max(0.0, (i - low) / (high - low)))  # 0: keep f, 1: f / factor
        out.append(f * (1 - ramp) + f / factor * ramp)

    def m(scale, k=1.0):
        return 1.0 if scale <= 1 else 0.1 * k * math.log(scale) + 1.0
    if "attention_factor" in p:
        scale = p["attention_factor"]
    elif "mscale" in p:
        scale = m(factor, p["mscale"]) / m(factor, p["mscale_all_dim"])
    else:
        scale = m(factor)
    return out, scale


@pytest.mark.parametrize("case", list(CASES))
def test_each_rope_type_matches_its_formula(case):
    p = CASES[case]
    freqs, scale = frequencies_by_hand(p)
    cos, sin = Rope(p, D, MAX_POS).cos_sin(torch.tensor(POSITIONS), torch.float64)
    for row, pos in enumerate(POSITIONS):
        want_cos = [scale * math.cos(pos * f) for f in freqs] * 2  # neox: the half repeated
        want_sin = [scale * math.sin(pos * f) for f in freqs] * 2
        torch.testing.assert_close(cos[row], torch.tensor(want_cos, dtype=torch.float64), rtol=0, atol=1e-9)
        torch.testing.assert_close(sin[row], torch.tensor(want_sin, dtype=torch.float64), rtol=0, atol=1e-9)
    if case != "default" and case != "dynamic":  # the scaled types really differ from plain RoPE here
        plain, _ = Rope({"rope_type": "default", "rope_theta": p["rope_theta"]}, D, MAX_POS).cos_sin(
            torch.tensor(POSITIONS), torch.float64)
        assert (plain - cos).abs().max() > 1e-3


# ------------------------------------------------------------------ reading configs as transformers does
LAYOUTS = {
    "top-level theta": ({"rope_theta": 1e4}, {"rope_type": "default", "rope_theta": 1e4}),
    "transformers 5": ({"rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}},
                       {"rope_type": "default", "rope_theta": 1e4}),
    "rope_parameters theta wins": ({"rope_theta": 1e6, "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}},
                                   {"rope_type": "default", "rope_theta": 5e5}),
    "nothing given": ({}, {"rope_type": "default", "rope_theta": 1e4}),
    "legacy rope_scaling with type": (
        {"rope_theta": 2e4, "rope_scaling": {"type": "linear", "factor": 2.0}},
        {"rope_type": "linear", "rope_theta": 2e4, "factor": 2.0}),
    "llama3 without original max": (
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0}},
        {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 512}),
    "dynamic": ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
                {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}),
    # transformers' Qwen3/Llama configs ignore a top-level original_max_position_embeddings
    "yarn with top-level original max": (
        {"original_max_position_embeddings": 128,
         "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                             "original_max_position_embeddings": 64}},
        {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 64}),
}


def _config(rope_keys: dict) -> dict:
    cfg = {k: v for k, v in deepspec_config().items() if k not in ("rope_theta", "rope_parameters")}
    return dict(cfg, **rope_keys)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_rope_is_read_as_written_and_as_transformers_reads_it(layout):
    keys, want = LAYOUTS[layout]
    raw = _config(keys)
    cfg = DSparkConfig.from_dict(json.loads(json.dumps(raw)))
    assert cfg.rope == want
    # transformers' own reading of the same config.json
    from transformers import Qwen3Config

    theirs = Qwen3Config.from_dict(json.loads(json.dumps(raw))).rope_parameters
    assert {k: v for k, v in theirs.items() if k != "type"} == want  # "type": the legacy alias, kept by them
    # and the inverse frequencies / scale transformers computes from it (dynamic: at max_position_embeddings)
    if want["rope_type"] != "default":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv, scale = ROPE_INIT_FUNCTIONS[want["rope_type"]](Qwen3Config.from_dict(raw), "cpu")
        ours = Rope(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
        torch.testing.assert_close(ours.inv_freq, inv.double(), rtol=1e-6, atol=0)
        assert ours.scale == pytest.approx(scale)
    # written back in the transformers-5 layout (plus a top-level theta), read back the same
    again = DSparkConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.rope == cfg.rope and cfg.to_dict()["rope_parameters"] == want


@pytest.mark.parametrize("rope, message", [
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]},
     "rope_parameters.rope_type='longrope': expected one of ['default', 'linear', 'dynamic', 'yarn', 'llama3']"),
    ({"rope_type": "mrope_thing"}, "rope_parameters.rope_type='mrope_thing'"),
    ({"type": "su"}, "rope_parameters.rope_type='su'"),
    ({"rope_type": "linear"}, "rope_parameters.factor=None: expected a finite positive number (required by rope_type "
                              "'linear')"),
    ({"rope_type": "dynamic", "alpha": 2.0, "factor": 1.0}, "rope_parameters.alpha=2.0: expected absent"),
    ({"rope_type": "default", "mrope_section": [16, 24, 24]}, "rope_parameters.mrope_section"),
    ({"rope_type": "default", "partial_rotary_factor": 0.5}, "rope_parameters.partial_rotary_factor=0.5: expected 1.0"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0},
     "rope_parameters.low_freq_factor=4.0: expected <= high_freq_factor=1.0"),
    ({"sliding_attention": {"rope_type": "default"}, "full_attention": {"rope_type": "default"}},
     "per-layer-type RoPE is not supported"),
])
def test_unsupported_rope_is_refused_at_load_naming_it(tmp_path, capsys, rope, message):
    with pytest.raises(DSparkConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        DSparkConfig.from_dict(_config({"rope_parameters": rope}))
    d = write_drafter(tmp_path / "d", _config({"rope_parameters": rope}), deepspec_weights())
    assert check_main(["--drafter", str(d)]) == 2
    assert message.split(":")[0] in capsys.readouterr().err


def test_check_prints_the_rope_it_will_use(tmp_path, capsys, target_dir):
    rope = dict(CASES["llama3-short"])
    d = write_drafter(tmp_path / "d", _config({"rope_parameters": rope}), deepspec_weights())
    assert check_main(["--drafter", str(d), "--target", str(target_dir)]) == 0
    out = capsys.readouterr().out
    assert ("rope          llama3, theta 10000, factor 32.0, high_freq_factor 4.0, low_freq_factor 1.0, "
            "original_max_position_embeddings 512") in out
    assert 'target rope   DIFFERS: {"rope_theta": 1000000.0, "rope_type": "default"}' in out
    same = write_drafter(tmp_path / "same", _config({"rope_theta": 1e6}), deepspec_weights())
    assert check_main(["--drafter", str(same), "--target", str(target_dir)]) == 0
    assert "target rope   same" in capsys.readouterr().out


# ------------------------------------------------------------------ whole drafter, both layouts
def _draft(drafter_dir, target_dir):
    from vllm_dspark.context import ContextStore
    from vllm_dspark.drafting import draft_block

    m = load_drafter(drafter_dir, target_dir)
    store = ContextStore(m)
    g = torch.Generator().manual_seed(5)
    # long contexts: the theta matters most at large positions
    store.append([(r, 0, torch.randn(n, H * len(LAYER_IDS), generator=g)) for r, n in (("a", 300), ("b", 41))])
    return draft_block(m, store.gather(["a", "b"]), torch.tensor([4, 17]), BLOCK)


def test_transformers5_layout_drafts_what_the_top_level_theta_drafts(tmp_path, target_dir):
    weights = deepspec_weights(seed=3)
    top = write_drafter(tmp_path / "top", _config({"rope_theta": 1e4}), weights)
    tf5 = write_drafter(tmp_path / "tf5", _config({"rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}}),
                        weights)
    other = write_drafter(tmp_path / "other", _config({"rope_theta": 1e6}), weights)  # the old silent fallback
    a, b, c = (_draft(d, target_dir) for d in (top, tf5, other))
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.confidence_logit, b.confidence_logit, rtol=0, atol=0)
    assert not torch.allclose(a.confidence_logit, c.confidence_logit, atol=1e-3)  # theta changes the numbers
