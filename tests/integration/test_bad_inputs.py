"""Bad drafters and settings fail at engine start-up, before any request, with a message that says what is wrong.

Each case builds a real in-process vLLM engine (``LLM(...)``) with one defect. Most are caught in the
proposer's constructor (before the target loads); a target that cannot export hidden states is caught when
the target is bound. vLLM may wrap our error ("Failed to instantiate custom proposer class ..."), so the
whole exception chain is searched for the phrases a user needs to see.
"""
from __future__ import annotations

import gc
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from vllm_dspark.checkpoint import WEIGHTS_FILE, config_for_target, init_drafter, init_weights, save_drafter
from vllm_dspark.model.drafter import DSparkDrafter

pytestmark = pytest.mark.vllm

SPEC = {"method": "custom_class", "model": "vllm_dspark.DSparkProposer"}
TARGET_SHAPE = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2,
                    head_dim=64, intermediate_size=256, vocab_size=512, max_position_embeddings=512)


@pytest.fixture(scope="module")
def good_drafter(tiny_llama_dir, tmp_path_factory) -> Path:
    """A valid drafter for tiny_llama (block 4 -> K <= 4, target layers [1, 2] of 4)."""
    d = tmp_path_factory.mktemp("good-drafter")
    init_drafter(tiny_llama_dir, d, num_layers=1, markov_rank=16, block_size=4, num_target_layer_ids=2)
    return d


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 (same hidden size, layers and vocab as tiny_llama): vLLM's GPT2LMHeadModel is not
    SupportsEagle3, so it cannot hand intermediate hidden states to a drafter."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tiny_models import build_tiny_tokenizer

    out = tmp_path_factory.mktemp("tiny-gpt2")
    cfg = GPT2Config(n_embd=128, n_layer=4, n_head=2, vocab_size=512, n_positions=512, bos_token_id=1,
                     eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).eval().save_pretrained(out)
    build_tiny_tokenizer(out)
    return out


def test_vllm_gpt2_cannot_export_hidden_states():
    """The premise of the gpt2 case: vLLM 0.32's GPT-2 does not implement SupportsEagle3."""
    from vllm.model_executor.models.gpt2 import GPT2LMHeadModel
    from vllm.model_executor.models.interfaces import supports_eagle3
    from vllm.model_executor.models.llama import LlamaForCausalLM

    assert not supports_eagle3(GPT2LMHeadModel) and supports_eagle3(LlamaForCausalLM)


# --------------------------------------------------------------------------- defects
def _copy(good: Path, tmp: Path) -> Path:
    d = tmp / "drafter"
    shutil.copytree(good, d)
    return d


def _edit_config(d: Path, **changes) -> Path:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _edit_weights(d: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    from safetensors.torch import load_file, save_file

    weights = load_file(str(d / WEIGHTS_FILE))
    edit(weights)
    save_file(weights, str(d / WEIGHTS_FILE))
    return d


def _drafter_for(tmp: Path, **target_changes) -> Path:
    """A consistent drafter (config + weights) for a target of another shape."""
    cfg = config_for_target(dict(TARGET_SHAPE, **target_changes), num_layers=1, markov_rank=16, block_size=4,
                            num_target_layer_ids=2)
    model = DSparkDrafter(cfg)
    init_weights(model)
    return save_drafter(model, tmp / "drafter")


def _set_nan(w: dict[str, torch.Tensor]) -> None:
    w["fc.weight"][3, 5] = float("nan")


def _misshape(w: dict[str, torch.Tensor]) -> None:
    w["layers.0.self_attn.q_proj.weight"] = w["layers.0.self_attn.q_proj.weight"][:, :100].contiguous()


def _truncate(d: Path) -> Path:
    file = d / WEIGHTS_FILE
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    return d


def _break_config(d: Path) -> Path:
    (d / "config.json").write_text('{"hidden_size": 128,')  # cut short
    return d


def _only_config(d: Path) -> Path:
    (d / WEIGHTS_FILE).unlink()
    return d


# id -> (build(good, tmp) -> drafter path, engine overrides, phrases the error must contain)
CASES: dict[str, tuple[Callable[[Path, Path], Path], dict, tuple[str, ...]]] = {
    "other_vocab": (lambda g, t: _drafter_for(t, vocab_size=1024), {},
                    ("vocab_size=1024: expected the target's vocab_size=512", "drafter for another model")),
    "other_hidden": (lambda g, t: _drafter_for(t, hidden_size=256, num_attention_heads=4, num_key_value_heads=4),
                     {}, ("target_hidden_size=256: expected the target's hidden_size=128",)),
    "missing_weight": (lambda g, t: _edit_weights(_copy(g, t), lambda w: w.pop("fc.weight")), {},
                       ("missing tensor(s) ['fc.weight']",)),
    "misshaped_weight": (lambda g, t: _edit_weights(_copy(g, t), _misshape), {},
                         ("layers.0.self_attn.q_proj.weight has shape [128, 100]; expected [128, 128]",)),
    "nan_weight": (lambda g, t: _edit_weights(_copy(g, t), _set_nan), {},
                   ("fc.weight has 1 non-finite value(s)",)),
    "truncated_weights": (lambda g, t: _truncate(_copy(g, t)), {}, ("unreadable", "truncated download?")),
    "no_weights": (lambda g, t: _only_config(_copy(g, t)), {}, ("no *.safetensors file",)),
    "k_above_block": (lambda g, t: g, {"k": 5, "extra": {"sources": "drafter"}},
                      ("num_speculative_tokens=5: expected an integer in [1, 4]", "block_size=4")),
    "k_above_copy_limit": (lambda g, t: g, {"k": 33},
                           ("num_speculative_tokens=33: expected an integer in [1, 32]", "block of 4 are copied")),
    "layer_out_of_range": (lambda g, t: _edit_config(_copy(g, t), target_layer_ids=[1, 6], num_target_layers=8),
                           {}, ("target_layer_ids=[1, 6]", "6 is out of range", "the target has 4 layers")),
    "final_layer_id": (lambda g, t: _edit_config(_copy(g, t), target_layer_ids=[1, 3]), {},
                       ("no id equal to the final layer 3",)),
    "target_without_hidden_states": (lambda g, t: g, {"target": "gpt2"},
                                     ("GPT2LMHeadModel cannot export intermediate hidden states",
                                      "SupportsEagle3")),
    "unknown_setting": (lambda g, t: g, {"extra": {"drafterr": "x"}},
                        ("unknown key(s) 'drafterr' (did you mean 'drafter'?)", "expected only")),
    "bad_setting_value": (lambda g, t: g, {"extra": {"mode": "fast"}},
                          ("[\"mode\"]='fast': expected adaptive|fixed",)),
    "missing_path": (lambda g, t: t / "no-such-drafter", {}, ("no-such-drafter': no such directory",)),
    "missing_suffix_corpus": (lambda g, t: g, {"extra": {"suffix_corpus": "answers.jsonl,no-such-corpus"}},
                              ('["suffix_corpus"]=\'answers.jsonl,no-such-corpus\'', "'answers.jsonl': no such file")),
    "config_not_json": (lambda g, t: _break_config(_copy(g, t)), {}, ("config.json at", "not valid JSON")),
    "path_is_a_file": (lambda g, t: _copy(g, t) / WEIGHTS_FILE, {}, ("model.safetensors", "a file, not a directory")),
}


def _startup_error(target: Path, drafter: Path, k: int, extra: dict) -> str:
    """The whole exception chain of a failed ``LLM(...)``, joined (vLLM may wrap our error)."""
    from vllm import LLM

    with pytest.raises(Exception) as info:
        LLM(str(target), enforce_eager=True, dtype="float32", max_model_len=256, seed=0, block_size=32,
            speculative_config=dict(SPEC, num_speculative_tokens=k),
            additional_config={"dspark": dict({"drafter": str(drafter)}, **extra)})
    chain, seen, e = [], set(), info.value
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    gc.collect()
    return " | ".join(chain)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_at_startup_with_a_clear_message(case, vllm_env, good_drafter, tiny_llama_dir, gpt2_dir,
                                                         tmp_path):
    build, overrides, phrases = CASES[case]
    drafter = build(good_drafter, tmp_path)
    target = gpt2_dir if overrides.get("target") == "gpt2" else tiny_llama_dir
    message = _startup_error(target, drafter, overrides.get("k", 3), overrides.get("extra", {}))
    missing = [p for p in phrases if p not in message]
    assert not missing, f"{case}: {missing} not in: {message[:3000]}"
    assert "DSparkConfigError" in message or "vllm-dspark" in message, message[:3000]
    if case != "target_without_hidden_states":  # refused while vLLM built its config, before any engine started
        assert message.startswith("DSparkConfigError: "), message[:3000]
