"""Drafter checkpoints: DeepSpec and speculators fixtures built here from the published formats
(reference/dspark.md §2), bit-exact round trips, vLLM's key precedence, one clear error per defect, and the
`vllm-dspark check` / `init` commands.

The fixtures never go through our own writer: names, shapes and config keys are spelled out below, so a
loader that drifts from the upstream format fails here.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_dspark import cli
from vllm_dspark.checkpoint import load_drafter, read_weights, save_drafter
from vllm_dspark.config import MAX_COPY_TOKENS, DSparkConfig, DSparkConfigError


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# A small Qwen3-shaped target and a drafter for it (drafter hidden = target hidden, as in DeepSpec).
H, HEADS, KV_HEADS, HEAD_DIM, MLP = 32, 4, 2, 8, 48
V, TARGET_LAYERS, LAYER_IDS, RANK, BLOCK, MASK = 97, 8, [1, 3, 5], 16, 7, 96
DRAFT_LAYERS = 2

# The keys a DeepSpec / vLLM Qwen3DSparkModel config.json carries (Qwen3 shape + DSpark).
DSPARK_KEYS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "vocab_size", "rms_norm_eps", "rope_theta", "block_size", "mask_token_id",
    "target_layer_ids", "num_target_layers", "markov_rank", "markov_head_type", "enable_confidence_head",
    "confidence_head_with_markov", "target_hidden_size", "draft_vocab_size",
)


# ----------------------------------------------------------------------------------------------- builders
def target_config(**over) -> dict:
    cfg = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=H, num_hidden_layers=TARGET_LAYERS,
               num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, intermediate_size=64,
               vocab_size=V, rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=512,
               bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    cfg.update(over)
    return cfg


def write_target(directory: Path, seed: int = 100, **over) -> Path:
    """A HF-style target folder: config.json + the tensors a drafter borrows (HF names, ``model.`` prefix)."""
    cfg = target_config(**over)
    g = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    save_file({"model.embed_tokens.weight": torch.randn(cfg["vocab_size"], cfg["hidden_size"], generator=g),
               "lm_head.weight": torch.randn(cfg["vocab_size"], cfg["hidden_size"], generator=g),
               "model.norm.weight": torch.ones(cfg["hidden_size"])}, str(directory / "model.safetensors"))
    return directory


class TinyTarget(torch.nn.Module):
    """An in-memory target exposing embed_tokens / lm_head under HF's names."""

    def __init__(self, seed: int = 7):
        super().__init__()
        torch.manual_seed(seed)
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(V, H)
        self.lm_head = torch.nn.Linear(H, V, bias=False)


def deepspec_config(**over) -> dict:
    """config.json of a DeepSpec drafter: a Qwen3 config plus the DSpark keys (dspark.md §2)."""
    cfg = dict(
        architectures=["Qwen3DSparkModel"], model_type="qwen3", hidden_act="silu", attention_bias=False,
        hidden_size=H, num_hidden_layers=DRAFT_LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM, intermediate_size=MLP, vocab_size=V, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
        max_position_embeddings=512, tie_word_embeddings=False, torch_dtype="bfloat16",
        block_size=BLOCK, mask_token_id=MASK, target_layer_ids=list(LAYER_IDS), num_target_layers=TARGET_LAYERS,
        markov_rank=RANK, markov_head_type="vanilla", enable_confidence_head=True,
        confidence_head_with_markov=True, target_hidden_size=H, draft_vocab_size=V,
    )
    cfg.update(over)
    return cfg


def deepspec_weights(seed: int = 0, *, layers: int = DRAFT_LAYERS, rank: int = RANK, n_ids: int = len(LAYER_IDS),
                     dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Exactly DeepSpec's tensor names and shapes, random values; embed_tokens / lm_head omitted."""
    shapes: dict[str, tuple[int, ...]] = {
        "fc.weight": (H, H * n_ids), "hidden_norm.weight": (H,), "norm.weight": (H,),
        "markov_head.markov_w1.weight": (V, rank), "markov_head.markov_w2.weight": (V, rank),
        "confidence_head.proj.weight": (1, H + rank), "confidence_head.proj.bias": (1,),
    }
    for i in range(layers):
        p = f"layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, H),
            p + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, H),
            p + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, H),
            p + "self_attn.o_proj.weight": (H, HEADS * HEAD_DIM),
            p + "self_attn.q_norm.weight": (HEAD_DIM,), p + "self_attn.k_norm.weight": (HEAD_DIM,),
            p + "mlp.gate_proj.weight": (MLP, H), p + "mlp.up_proj.weight": (MLP, H),
            p + "mlp.down_proj.weight": (H, MLP),
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
        })
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g).to(dtype) for name, shape in shapes.items()}


def write_drafter(directory: Path, config: dict, weights: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file(weights, str(directory / "model.safetensors"))
    return directory


@pytest.fixture
def target_dir(tmp_path) -> Path:
    return write_target(tmp_path / "target")


@pytest.fixture
def deepspec_dir(tmp_path) -> Path:
    return write_drafter(tmp_path / "drafter", deepspec_config(), deepspec_weights())


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


# ----------------------------------------------------------------------------------- DeepSpec format
@pytest.mark.parametrize("target_kind", ["folder", "module"])
def test_deepspec_checkpoint_loads_and_borrows_the_targets_embeddings(tmp_path, deepspec_dir, target_kind):
    target = write_target(tmp_path / "target") if target_kind == "folder" else TinyTarget()
    model = load_drafter(deepspec_dir, target=target)

    cfg = model.cfg
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.block_size, cfg.mask_token_id) == (H, DRAFT_LAYERS, BLOCK, MASK)
    assert (cfg.target_layer_ids, cfg.markov_rank, cfg.max_draft_tokens) == (LAYER_IDS, RANK, BLOCK)
    state = model.state_dict()
    assert_same_tensors({k: v for k, v in state.items() if not k.startswith(("embed_tokens", "lm_head"))},
                        deepspec_weights())
    if target_kind == "folder":
        borrowed = load_file(str(target / "model.safetensors"))
        embed, head = borrowed["model.embed_tokens.weight"], borrowed["lm_head.weight"]
    else:
        embed, head = target.model.embed_tokens.weight, target.lm_head.weight
    assert torch.equal(state["embed_tokens.weight"], embed) and torch.equal(state["lm_head.weight"], head)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact(tmp_path, target_dir, dtype):
    original = deepspec_weights(dtype=dtype)
    src = write_drafter(tmp_path / "src", deepspec_config(), original)
    model = load_drafter(src, target=target_dir, dtype=dtype)
    out = save_drafter(model, tmp_path / "out")

    assert_same_tensors(read_weights(out), original)  # frozen target copies are not written
    saved = json.loads((out / "config.json").read_text())
    written = deepspec_config()
    assert {k: saved[k] for k in DSPARK_KEYS} == {k: written[k] for k in DSPARK_KEYS}
    assert saved["architectures"] == ["Qwen3DSparkModel"]
    again = load_drafter(out, target=target_dir, dtype=dtype)
    assert_same_tensors(again.state_dict(), model.state_dict())
    assert again.cfg == model.cfg


def test_frozen_copies_can_be_saved_and_then_no_target_is_needed(tmp_path, deepspec_dir, target_dir):
    model = load_drafter(deepspec_dir, target=target_dir)
    out = save_drafter(model, tmp_path / "full", include_frozen=True)
    assert_same_tensors(load_drafter(out).state_dict(), model.state_dict())


# ---------------------------------------------------------------------- nested configs and aliases
PRECEDENCE_CASES = {
    # vLLM 0.32 (config/speculative.py, eagle3_utils.get_eagle3_aux_layers_from_config):
    # dflash_config.target_layer_ids > dspark_target_layer_ids > target_layer_ids.
    "dflash_config beats every other layer-id source": (
        dict(dflash_config={"target_layer_ids": [2, 4]}, eagle_config={"target_layer_ids": [0, 6]},
             dspark_target_layer_ids=[1, 2], target_layer_ids=[5, 6]),
        "target_layer_ids", [2, 4]),
    "dspark_target_layer_ids beats top-level target_layer_ids": (
        dict(dspark_target_layer_ids=[2, 4], target_layer_ids=[5, 6]), "target_layer_ids", [2, 4]),
    "dspark_target_layer_ids alone": (dict(dspark_target_layer_ids=[0, 6], target_layer_ids=None),
                                      "target_layer_ids", [0, 6]),
    # block size (speculative._get_qwen3_dspark_value): dflash > eagle > top level > dspark_block_size.
    "dflash_config block_size beats eagle_config": (
        dict(dflash_config={"block_size": 3}, eagle_config={"block_size": 5}, block_size=7), "block_size", 3),
    "eagle_config block_size beats top level": (dict(eagle_config={"block_size": 5}, block_size=7), "block_size", 5),
    "top-level block_size beats dspark_block_size": (dict(block_size=6, dspark_block_size=4), "block_size", 6),
    "dspark_block_size alone": (dict(block_size=None, dspark_block_size=4), "block_size", 4),
    # mask token (llm_base_proposer._init_parallel_drafting_params): dflash > mask_token_id > dspark_noise_token_id.
    "dflash_config mask_token_id beats top level": (dict(dflash_config={"mask_token_id": 5}, mask_token_id=9),
                                                    "mask_token_id", 5),
    "top-level mask_token_id beats dspark_noise_token_id": (dict(mask_token_id=9, dspark_noise_token_id=11),
                                                            "mask_token_id", 9),
    "dspark_noise_token_id alone": (dict(mask_token_id=None, dspark_noise_token_id=11), "mask_token_id", 11),
    "markov_rank inside dflash_config": (dict(dflash_config={"markov_rank": 4}, markov_rank=RANK), "markov_rank", 4),
}


@pytest.mark.parametrize("case", list(PRECEDENCE_CASES))
def test_nested_configs_and_aliases_follow_vllm_precedence(tmp_path, case):
    over, field_name, expected = PRECEDENCE_CASES[case]
    raw = {k: v for k, v in deepspec_config(**over).items() if v is not None}
    cfg = DSparkConfig.from_dict(raw)
    assert getattr(cfg, field_name) == expected
    # What we write is plain top-level keys that read back to the same config (no stale nested copies).
    written = cfg.to_dict()
    assert written[field_name] == expected
    assert not {"dflash_config", "eagle_config", "dspark_target_layer_ids", "dspark_block_size",
                "dspark_noise_token_id"} & set(written)
    reread = DSparkConfig.from_dict(json.loads(json.dumps(written)))
    assert {**reread.__dict__, "extra": None} == {**cfg.__dict__, "extra": None}


# ----------------------------------------------------------------------------------- speculators format
def speculators_config(**over) -> dict:
    layer_cfg = {k: deepspec_config()[k] for k in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
        "intermediate_size", "vocab_size", "rms_norm_eps", "rope_theta", "max_position_embeddings", "hidden_act")}
    cfg = dict(
        architectures=["DSparkSpeculator"], speculators_model_type="dspark", speculators_version="0.3.0",
        transformer_layer_config=dict(layer_cfg, architectures=["Qwen3ForCausalLM"], model_type="qwen3"),
        aux_hidden_state_layer_ids=[i + 1 for i in LAYER_IDS], block_size=BLOCK, mask_token_id=MASK,
        markov_rank=RANK, markov_head_type="vanilla", enable_confidence_head=True, target_hidden_size=H,
        draft_vocab_size=V,
        speculators_config={"algorithm": "dspark",
                            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": BLOCK - 1}],
                            "default_proposal_method": "greedy",
                            "verifier": {"name_or_path": "Qwen/Qwen3-tiny", "architectures": ["Qwen3ForCausalLM"]}},
    )
    cfg.update(over)
    return cfg


def test_speculators_checkpoint_loads_and_saves_as_deepspec(tmp_path, target_dir):
    weights = deepspec_weights(seed=3)
    src = write_drafter(tmp_path / "spec", speculators_config(), {"model." + k: v for k, v in weights.items()})
    model = load_drafter(src, target=target_dir)

    cfg = model.cfg
    assert cfg.target_layer_ids == LAYER_IDS and cfg.aux_layer_ids == [2, 4, 6]
    assert cfg.sample_from_anchor is False and cfg.max_draft_tokens == BLOCK - 1
    assert cfg.extra["speculators_config"]["verifier"]["name_or_path"] == "Qwen/Qwen3-tiny"
    assert_same_tensors({k: v for k, v in model.state_dict().items() if not k.startswith(("embed", "lm_head"))},
                        weights)
    with pytest.raises(DSparkConfigError, match=re.escape(f"num_speculative_tokens={BLOCK}: expected an integer "
                                                          f"in [1, {BLOCK - 1}]")):
        cfg.check_num_speculative_tokens(BLOCK)

    out = save_drafter(model, tmp_path / "out")
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == ["Qwen3DSparkModel"] and "speculators_model_type" not in saved
    assert saved["target_layer_ids"] == LAYER_IDS and saved["sample_from_anchor"] is False
    assert_same_tensors(read_weights(out), weights)
    again = load_drafter(out, target=target_dir)
    assert_same_tensors(again.state_dict(), model.state_dict())
    strip = lambda c: {**c.__dict__, "extra": None}
    assert strip(again.cfg) == strip(cfg)
    assert again.cfg.extra["speculators_config"] == cfg.extra["speculators_config"]


def test_speculators_sample_from_anchor_true_drafts_the_whole_block():
    cfg = DSparkConfig.from_dict(speculators_config(sample_from_anchor=True))
    assert cfg.sample_from_anchor is True and cfg.max_draft_tokens == BLOCK


@pytest.mark.parametrize("over, message", [
    (dict(speculators_model_type="eagle3"), "speculators_model_type='eagle3': expected 'dspark'"),
    (dict(aux_hidden_state_layer_ids=[]), "aux_hidden_state_layer_ids=[]: expected a non-empty list"),
    (dict(transformer_layer_config=None), "transformer_layer_config=None: expected a dict"),
])
def test_bad_speculators_config_is_named(over, message):
    with pytest.raises(DSparkConfigError, match=re.escape(message)):
        DSparkConfig.from_dict(speculators_config(**over))


# ---------------------------------------------------------------------------------------- errors
def _drop(name):
    return lambda w: {k: v for k, v in w.items() if k != name}


def _set(name, value):
    return lambda w: {**w, name: value}


def _nan(name):
    def f(w):
        t = w[name].clone()
        t[3, 1] = float("nan")
        return {**w, name: t}
    return f


VD = 40  # a reduced draft vocabulary: VD of the V target ids
DRAFT_IDS = torch.arange(0, 2 * VD, 2) + 1  # odd ids 1..79: target id = draft id + d2t[draft id]


def reduced(weights, d2t=DRAFT_IDS - torch.arange(VD)):
    """A DeepSpec checkpoint with a reduced draft vocabulary: markov_w2 has VD rows, plus the d2t table."""
    w = {**weights, "markov_head.markov_w2.weight": weights["markov_head.markov_w2.weight"][:VD]}
    return {**w, "d2t": d2t} if d2t is not None else w


ERROR_CASES = {
    "missing weight": (
        {}, _drop("layers.1.mlp.up_proj.weight"), {},
        "weights: missing tensor(s) ['layers.1.mlp.up_proj.weight']; expected every drafter weight"),
    "extra weight": (
        {}, _set("layers.2.mlp.up_proj.weight", torch.zeros(MLP, H)), {},
        "weights: unexpected tensor(s) ['layers.2.mlp.up_proj.weight'] for this config (num_hidden_layers=2"),
    "mis-shaped weight": (
        {}, _set("fc.weight", torch.zeros(H, 2 * H)), {},
        f"weights: fc.weight has shape [{H}, {2 * H}]; expected [{H}, {3 * H}]"),
    "vocab mismatch with the target": (
        {}, None, dict(vocab_size=V + 4),
        f"vocab_size={V}: expected the target's vocab_size={V + 4} (drafter for another model?)"),
    "hidden-size mismatch with the target": (
        {}, None, dict(hidden_size=2 * H),
        f"target_hidden_size={H}: expected the target's hidden_size={2 * H} (drafter for another model?)"),
    "target layer id out of range (config)": (
        dict(target_layer_ids=[1, 3, 9]), None, {},
        "target_layer_ids=[1, 3, 9]: expected ids < 8 (num_target_layers); 9 is out of range"),
    "target layer id out of range (target)": (
        dict(target_layer_ids=[1, 3, 9], num_target_layers=None), None, {},
        "target_layer_ids=[1, 3, 9]: expected ids < 8 (the target has 8 layers); 9 is out of range"),
    "target layer id equal to the final layer": (
        dict(target_layer_ids=[1, 3, 7], num_target_layers=None), None, {},
        "target_layer_ids=[1, 3, 7]: expected no id equal to the final layer 7 (the target has 8 layers)"),
    "markov_rank 0 with markov_head weights": (
        dict(markov_rank=0), None, {},
        "markov_rank=0: expected > 0: the checkpoint declares a Markov head (markov_head.* weights)"),
    "negative markov_rank": (
        dict(markov_rank=-2), None, {}, "markov_rank=-2: expected an integer >= 0"),
    "unknown markov_head_type": (
        dict(markov_head_type="lstm"), None, {},
        "markov_head_type='lstm': expected one of ['vanilla', 'gated', 'rnn']"),
    "gated variant (declared, not implemented)": (
        dict(markov_head_type="gated"), None, {},
        "markov_head_type='gated': expected one of ['vanilla']: the 'gated' variant (DeepSpec code, unused by its "
        "configs) is not implemented by vllm-dspark yet"),
    "rnn variant (declared, not implemented)": (
        dict(markov_head_type="rnn"), None, {},
        "markov_head_type='rnn': expected one of ['vanilla']: the 'rnn' variant"),
    "NaN weight": (
        {}, _nan("markov_head.markov_w2.weight"), {},
        "weights: markov_head.markov_w2.weight has 1 non-finite value(s) (NaN/inf); expected finite"),
    "unknown architecture": (
        dict(architectures=["Qwen3DSparkModelV2"]), None, {},
        "architectures=['Qwen3DSparkModelV2']: expected one of ['Qwen3DSparkModel', 'Qwen3OmniDSparkModel']"),
    "mask token outside the vocabulary": (
        dict(mask_token_id=V), None, {}, f"mask_token_id={V}: expected a token id in [0, vocab_size={V})"),
    "reduced vocabulary without d2t": (
        dict(draft_vocab_size=VD), lambda w: reduced(w, d2t=None), {},
        f"weights: d2t missing but draft_vocab_size={VD} < vocab_size={V}; expected a [{VD}] integer d2t table"),
    "d2t mapping two draft ids to one target id": (
        dict(draft_vocab_size=VD), lambda w: reduced(w, d2t=torch.zeros(VD, dtype=torch.int64).index_fill_(
            0, torch.tensor([1]), -1)), {},
        "weights: d2t maps two draft ids to the same target id; expected distinct ids"),
    "d2t past the target vocabulary": (
        dict(draft_vocab_size=VD), lambda w: reduced(w, d2t=torch.full((VD,), V - 5)), {},
        f"weights: d2t maps draft ids to target ids in [{V - 5}, {V - 5 + VD - 1}]; "
        f"expected ids in [0, vocab_size={V})"),
    "mis-shaped d2t": (
        dict(draft_vocab_size=VD), lambda w: reduced(w, d2t=torch.zeros(VD + 1, dtype=torch.int64)), {},
        f"weights: d2t has shape [{VD + 1}] and dtype torch.int64; expected a [{VD}] integer table"),
    "non-identity d2t with the full vocabulary": (
        {}, _set("d2t", torch.ones(V, dtype=torch.int64)), {},
        f"draft_vocab_size={V}: expected < vocab_size={V}: the checkpoint carries a non-identity d2t table"),
    "missing target_layer_ids": (
        dict(target_layer_ids=None), None, {}, "target_layer_ids=None: expected a non-empty list"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_each_defect_raises_a_named_error(tmp_path, case):
    config_over, weights_edit, target_over, message = ERROR_CASES[case]
    config = {k: v for k, v in deepspec_config(**config_over).items() if v is not None}
    weights = deepspec_weights()
    if weights_edit is not None:
        weights = weights_edit(weights)
    drafter = write_drafter(tmp_path / "drafter", config, weights)
    target = write_target(tmp_path / "target", **target_over)
    with pytest.raises(DSparkConfigError, match=re.escape(message)):
        load_drafter(drafter, target=target)


def test_embedding_output_as_target_layer_minus_one(tmp_path, target_dir):
    """DeepSpec: "-1 denotes the embedding output"; vLLM's aux hidden state 0; speculators' aux id 0."""
    d = write_drafter(tmp_path / "emb", deepspec_config(target_layer_ids=[-1, 3, 5]), deepspec_weights())
    m = load_drafter(d, target_dir)
    assert m.cfg.target_layer_ids == [-1, 3, 5] and m.cfg.aux_layer_ids == [0, 4, 6]
    spec = DSparkConfig.from_dict(speculators_config(aux_hidden_state_layer_ids=[0, 4, 6]))
    assert spec.target_layer_ids == [-1, 3, 5]
    for bad in ([-2, 3, 5], [3, -1, 5]):
        with pytest.raises(DSparkConfigError, match=re.escape(f"target_layer_ids={bad}: expected")):
            DSparkConfig.from_dict(deepspec_config(target_layer_ids=bad))


def test_reduced_draft_vocabulary_loads_drafts_target_ids_and_round_trips(tmp_path, target_dir):
    from vllm_dspark.context import ContextStore
    from vllm_dspark.drafting import draft_block

    d = write_drafter(tmp_path / "reduced", deepspec_config(draft_vocab_size=VD), reduced(deepspec_weights()))
    m = load_drafter(d, target_dir)
    head = load_file(str(target_dir / "model.safetensors"))["lm_head.weight"]
    assert torch.equal(m.draft_token_ids, DRAFT_IDS)
    assert torch.equal(m.lm_head.weight, head[DRAFT_IDS])  # the target's rows of the draft vocabulary

    store = ContextStore(m)
    g = torch.Generator().manual_seed(3)
    store.append([(r, 0, torch.randn(n, H * len(LAYER_IDS), generator=g)) for r, n in (("a", 5), ("b", 9))])
    ctx, anchor = store.gather(["a", "b"]), torch.tensor([4, 17])
    block = draft_block(m, ctx, anchor, BLOCK)
    # By hand: the base logits over the VD draft rows, the Markov chain fed with target ids.
    from vllm_dspark.model.drafter import block_attention_mask
    qids = m.query_ids(anchor, BLOCK)
    qpos = ctx.lengths[:, None] + torch.arange(qids.shape[1])[None]
    with torch.no_grad():
        base = m.base_logits(m.block_hidden(qids, qpos, ctx.k, ctx.v,
                                            block_attention_mask(ctx.lengths, ctx.k.shape[1], qids.shape[1])))
        prev, want = anchor, []
        for k in range(BLOCK):
            z = base[:, k] + m.markov_head.markov_w1.weight[prev] @ m.markov_head.markov_w2.weight.T
            prev = DRAFT_IDS[z.argmax(-1)]
            want.append(prev)
    assert torch.equal(block.tokens, torch.stack(want, 1))

    sampled = draft_block(m, ctx, anchor, BLOCK, temperature=torch.tensor([1.0, 0.7]), seed=torch.tensor([1, 2]),
                          return_q=True)
    assert sampled.q.shape == (2, BLOCK, V)  # q over the target vocabulary, zero outside the draft ids
    assert float(sampled.q[:, :, [t for t in range(V) if t not in DRAFT_IDS.tolist()]].abs().sum()) == 0.0
    torch.testing.assert_close(sampled.q.sum(-1), torch.ones(2, BLOCK))
    assert all(t in DRAFT_IDS.tolist() for t in sampled.tokens.flatten().tolist())
    top = draft_block(m, ctx, anchor, BLOCK, temperature=torch.tensor([1.0, 0.0]), seed=torch.tensor([1, 2]),
                      topk=8, return_q=True)
    assert set(top.q_ids.flatten().tolist()) <= set(DRAFT_IDS.tolist())

    saved = save_drafter(m, tmp_path / "saved")  # d2t travels with the checkpoint; frozen rows do not
    assert torch.equal(load_file(str(saved / "model.safetensors"))["d2t"], DRAFT_IDS - torch.arange(VD))
    again = load_drafter(saved, target_dir)
    assert torch.equal(draft_block(again, ctx, anchor, BLOCK).tokens, block.tokens)


def test_identity_d2t_with_the_full_vocabulary_is_accepted(tmp_path, target_dir):
    w = {**deepspec_weights(), "d2t": torch.zeros(V, dtype=torch.int64)}  # EAGLE-3 style files may carry one
    m = load_drafter(write_drafter(tmp_path / "d", deepspec_config(), w), target_dir)
    assert m.d2t is None


@pytest.mark.parametrize("k, ok", [(1, True), (BLOCK, True), (BLOCK + 1, False), (0, False)])
def test_num_speculative_tokens_is_checked_against_the_trained_block(deepspec_dir, target_dir, k, ok):
    cfg = load_drafter(deepspec_dir, target=target_dir).cfg
    if ok:
        cfg.check_num_speculative_tokens(k)
        return
    with pytest.raises(DSparkConfigError, match=re.escape(
            f"num_speculative_tokens={k}: expected an integer in [1, {BLOCK}] (the drafter was trained with "
            f"block_size={BLOCK}")):
        cfg.check_num_speculative_tokens(k)


@pytest.mark.parametrize("k, ok", [(BLOCK + 1, True), (MAX_COPY_TOKENS, True), (MAX_COPY_TOKENS + 1, False)])
def test_num_speculative_tokens_may_pass_the_block_when_copying(deepspec_dir, target_dir, k, ok):
    cfg = load_drafter(deepspec_dir, target=target_dir).cfg
    if ok:
        cfg.check_num_speculative_tokens(k, copying=True)
        return
    with pytest.raises(DSparkConfigError, match=re.escape(
            f"num_speculative_tokens={k}: expected an integer in [1, {MAX_COPY_TOKENS}] (drafts past the drafter's "
            f"block of {BLOCK} are copied ones)")):
        cfg.check_num_speculative_tokens(k, copying=True)


def test_truncated_safetensors_file_is_named(deepspec_dir, target_dir):
    file = deepspec_dir / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])  # a download cut short: header intact, data missing
    with pytest.raises(DSparkConfigError, match=re.escape(f"weights file {str(file)!r}: unreadable (")) as e:
        load_drafter(deepspec_dir, target=target_dir)
    assert "expected a complete safetensors file (truncated download?)" in str(e.value)


@pytest.mark.parametrize("defect, message", [
    ("no directory", "drafter={path!r}: not a readable directory; expected a drafter checkpoint directory"),
    ("a file", "drafter={path!r}: not a readable directory"),
    ("no config.json", "config.json: not found at {config!r}: expected a drafter directory"),
    ("bad json", "config.json at {config!r}: not valid JSON"),
    ("no weights", "weights: no *.safetensors file in {path!r}: expected model.safetensors"),
])
def test_unreadable_drafter_paths_are_named(tmp_path, deepspec_dir, target_dir, defect, message):
    path = deepspec_dir
    if defect == "no directory":
        path = tmp_path / "nowhere"
    elif defect == "a file":
        path = deepspec_dir / "model.safetensors"
    elif defect == "no config.json":
        (path / "config.json").unlink()
    elif defect == "bad json":
        (path / "config.json").write_text('{"hidden_size": 32,')
    else:
        (path / "model.safetensors").unlink()
    with pytest.raises(DSparkConfigError, match=re.escape(
            message.format(path=str(path), config=str(path / "config.json")))):
        load_drafter(path, target=target_dir)


def test_unreadable_target_path_is_named(tmp_path, deepspec_dir):
    missing = tmp_path / "no-target"
    with pytest.raises(DSparkConfigError, match=re.escape(f"target={str(missing)!r}: not a readable directory")):
        load_drafter(deepspec_dir, target=missing)


def test_omitted_embeddings_without_a_target_are_named(deepspec_dir):
    with pytest.raises(DSparkConfigError, match=re.escape(
            "weights: ['embed_tokens.weight', 'lm_head.weight'] omitted from the checkpoint; expected a target")):
        load_drafter(deepspec_dir)


# ------------------------------------------------------------------------------------------- CLI
def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(map(str, argv)))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_check_accepts_a_good_checkpoint_with_a_one_screen_summary(capsys, deepspec_dir, target_dir):
    code, out, err = run_cli(capsys, "check", "--drafter", deepspec_dir, "--target", target_dir, "-k", BLOCK)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert len(lines) <= 24 and max(map(len, lines)) <= 120 and lines[-1] == "ok"
    assert f"target layers [1, 3, 5] (aux ids [2, 4, 6]), target hidden {H}" in out
    assert f"block         {BLOCK} -> up to {BLOCK} drafts per round" in out
    assert f"markov head   vanilla, rank {RANK}" in out


@pytest.mark.parametrize("defect, message", [
    ("k", f"vllm-dspark check: num_speculative_tokens={BLOCK + 1}: expected an integer in [1, {BLOCK}]"),
    ("nan", "vllm-dspark check: weights: fc.weight has 1 non-finite value(s)"),
    ("vocab", f"vllm-dspark check: vocab_size={V}: expected the target's vocab_size={V + 1}"),
    ("target path", "vllm-dspark check: target="),
])
def test_check_rejects_a_bad_checkpoint_with_exit_2(tmp_path, capsys, defect, message):
    weights = _nan("fc.weight")(deepspec_weights()) if defect == "nan" else deepspec_weights()
    drafter = write_drafter(tmp_path / "d", deepspec_config(), weights)
    target = write_target(tmp_path / "t", **({"vocab_size": V + 1} if defect == "vocab" else {}))
    if defect == "target path":
        target = tmp_path / "missing"
    code, out, err = run_cli(capsys, "check", "--drafter", drafter, "--target", target, "-k",
                             BLOCK + 1 if defect == "k" else BLOCK)
    assert code == 2 and out == ""
    assert err.startswith(message) and "Traceback" not in err and len(err.splitlines()) == 1


def test_console_script_exit_codes(tmp_path, deepspec_dir, target_dir):
    script = Path(sys.executable).parent / "vllm-dspark"
    assert script.exists(), "the vllm-dspark console script is not installed in this environment"
    good = subprocess.run([str(script), "check", "--drafter", str(deepspec_dir), "--target", str(target_dir)],
                          capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stderr
    assert good.stdout.splitlines()[-1] == "ok"
    bad = subprocess.run([str(script), "check", "--drafter", str(deepspec_dir), "--target", str(target_dir),
                          "-k", str(BLOCK + 1)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip() == (f"vllm-dspark check: num_speculative_tokens={BLOCK + 1}: expected an integer in "
                                  f"[1, {BLOCK}] (the drafter was trained with block_size={BLOCK}; more tokens "
                                  "would be drafted blind; with sources hybrid or suffix, copied drafts may reach 32)")


@pytest.mark.parametrize("target_layers, expected_ids", [(8, [1, 2, 4, 5, 6]), (24, [1, 6, 12, 17, 22]), (4, [1, 2])])
def test_init_writes_a_drafter_that_check_accepts(tmp_path, capsys, target_layers, expected_ids):
    target = write_target(tmp_path / "target", num_hidden_layers=target_layers)
    out_dir = tmp_path / "fresh"
    code, _, err = run_cli(capsys, "init", "--target", target, "--out", out_dir, "--layers", 1,
                           "--markov-rank", 16, "--block-size", 4)
    assert code == 0, err

    saved = json.loads((out_dir / "config.json").read_text())
    assert saved["architectures"] == ["Qwen3DSparkModel"]
    assert (saved["num_hidden_layers"], saved["markov_rank"], saved["block_size"]) == (1, 16, 4)
    ids = saved["target_layer_ids"]
    # Spread from layer 1 to the second-to-last; never the final layer (its output feeds the final norm).
    assert ids == expected_ids and ids[-1] == target_layers - 2 and target_layers - 1 not in ids
    assert saved["num_target_layers"] == target_layers and saved["target_hidden_size"] == H
    assert not {"embed_tokens.weight", "lm_head.weight"} & set(read_weights(out_dir))

    code, out, err = run_cli(capsys, "check", "--drafter", out_dir, "--target", target, "-k", 4)
    assert code == 0 and out.splitlines()[-1] == "ok", err
    code, _, err = run_cli(capsys, "check", "--drafter", out_dir, "--target", target, "-k", 5)
    assert code == 2 and "num_speculative_tokens=5: expected an integer in [1, 4]" in err


def test_init_against_a_real_hf_folder(tmp_path, capsys, tiny_llama_dir):
    """The conftest target is written by transformers itself (4 layers, hidden 128, vocab 512)."""
    out_dir = tmp_path / "fresh"
    code, _, err = run_cli(capsys, "init", "--target", tiny_llama_dir, "--out", out_dir, "--layers", 1,
                           "--markov-rank", 16, "--block-size", 4)
    assert code == 0, err
    model = load_drafter(out_dir, target=tiny_llama_dir)
    assert model.cfg.target_layer_ids == [1, 2] and model.cfg.hidden_size == 128
    target = {k.removeprefix("model."): v for k, v in load_file(str(tiny_llama_dir / "model.safetensors")).items()}
    assert torch.equal(model.embed_tokens.weight, target["embed_tokens.weight"].float())
    assert torch.equal(model.lm_head.weight, target["lm_head.weight"].float())


@pytest.mark.parametrize("args, message", [
    (("--layers", 0), "vllm-dspark init: num_hidden_layers=0: expected a positive integer"),
    (("--markov-rank", -1), "vllm-dspark init: markov_rank=-1: expected an integer >= 0"),
    (("--target-missing",), "vllm-dspark init: target="),
])
def test_init_refuses_bad_arguments_with_exit_2(tmp_path, capsys, target_dir, args, message):
    target = tmp_path / "missing" if args == ("--target-missing",) else target_dir
    extra = () if args == ("--target-missing",) else args
    code, out, err = run_cli(capsys, "init", "--target", target, "--out", tmp_path / "fresh", *extra)
    assert code == 2 and out == "" and err.startswith(message) and "Traceback" not in err
    assert not (tmp_path / "fresh").exists()
