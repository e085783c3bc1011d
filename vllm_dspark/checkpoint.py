"""Drafter checkpoints: safetensors in DeepSpec/vLLM weight names, speculators reading, validation, CLI.

A checkpoint directory holds ``config.json`` and ``model.safetensors`` (or several ``*.safetensors``).
``embed_tokens.weight`` and ``lm_head.weight`` are copies of the target's and may be omitted: they are then
taken from the target at load time (:func:`target_embeddings`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Mapping

import torch

from .cli import HelpFormatter
from .config import DSparkConfig, DSparkConfigError, _bad, read_rope
from .model.drafter import DSparkDrafter

WEIGHTS_FILE = "model.safetensors"
FROZEN = ("embed_tokens.weight", "lm_head.weight")
# Prefixes other trainers put in front of DeepSpec names.
_STRIP_PREFIXES = ("model.", "drafter.", "module.")
_IGNORED = ("t2d", "mask_embedding")


# ----------------------------------------------------------------------------- reading
def read_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, names normalised to DeepSpec's."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise DSparkConfigError(f"weights: no *.safetensors file in {str(directory)!r}: expected {WEIGHTS_FILE}")
    out: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors = load_file(str(file))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise DSparkConfigError(f"weights file {str(file)!r}: unreadable ({e}); expected a complete "
                                    "safetensors file (truncated download?)") from None
        for name, t in tensors.items():
            for p in _STRIP_PREFIXES:
                if name.startswith(p):
                    name = name[len(p):]
                    break
            if name == "d2t" or name.endswith(".d2t"):
                name = "d2t"
            if any(name == i or name.endswith("." + i) for i in _IGNORED):
                continue
            out[name] = t
    return out


def expected_shapes(cfg: DSparkConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a drafter with this config has (frozen copies included), by DeepSpec name."""
    return {name: tuple(t.shape) for name, t in DSparkDrafter(cfg).to("meta").state_dict().items()}


def validate_weights(cfg: DSparkConfig, weights: Mapping[str, torch.Tensor]) -> None:
    """Missing / extra / mis-shaped / non-finite tensors, each named."""
    if cfg.markov_rank <= 0 and any(n.startswith("markov_head.") for n in weights):
        raise _bad("markov_rank", cfg.markov_rank, "> 0: the checkpoint declares a Markov head "
                   "(markov_head.* weights); markov_rank = 0 means no Markov head")
    cfg.check_markov_supported()
    want = expected_shapes(cfg)
    _check_d2t(cfg, weights)
    extra = sorted(n for n in weights if n not in want)
    if extra:
        raise DSparkConfigError(f"weights: unexpected tensor(s) {extra[:5]} for this config "
                                f"(num_hidden_layers={cfg.num_hidden_layers}, markov_rank={cfg.markov_rank}, "
                                f"enable_confidence_head={cfg.enable_confidence_head}); expected only {sorted(want)[:3]}...")
    if cfg.enable_confidence_head and not any(n.startswith("confidence_head.") for n in weights):
        raise DSparkConfigError("weights: confidence_head.proj.* missing but enable_confidence_head=true; "
                                "expected the confidence head's weights (or enable_confidence_head=false)")
    missing = sorted(n for n in want if n not in weights and n not in FROZEN)
    if missing:
        raise DSparkConfigError(f"weights: missing tensor(s) {missing[:5]}; expected every drafter weight "
                                f"(only {list(FROZEN)} may be omitted)")
    for name, t in weights.items():
        if tuple(t.shape) != want[name]:
            raise DSparkConfigError(f"weights: {name} has shape {list(t.shape)}; expected {list(want[name])}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise DSparkConfigError(f"weights: {name} has {bad} non-finite value(s) (NaN/inf); expected finite")


def _check_d2t(cfg: DSparkConfig, weights: dict[str, torch.Tensor]) -> None:
    """A reduced draft vocabulary needs a d2t table mapping draft ids to distinct target ids; a full one may
    carry an all-zero (identity) table, which is dropped."""
    d2t = weights.get("d2t")
    if cfg.draft_vocab == cfg.vocab_size:
        if d2t is not None:
            if d2t.is_floating_point() or d2t.ndim != 1 or d2t.numel() != cfg.vocab_size or bool(d2t.any()):
                raise _bad("draft_vocab_size", cfg.draft_vocab_size,
                           f"< vocab_size={cfg.vocab_size}: the checkpoint carries a non-identity d2t table "
                           f"(shape {list(d2t.shape)}) but the config declares the full vocabulary")
            del weights["d2t"]
        return
    if d2t is None:
        raise DSparkConfigError(f"weights: d2t missing but draft_vocab_size={cfg.draft_vocab} < vocab_size="
                                f"{cfg.vocab_size}; expected a [{cfg.draft_vocab}] integer d2t table "
                                "(target id = draft id + d2t[draft id])")
    if d2t.is_floating_point() or tuple(d2t.shape) != (cfg.draft_vocab,):
        raise DSparkConfigError(f"weights: d2t has shape {list(d2t.shape)} and dtype {d2t.dtype}; expected a "
                                f"[{cfg.draft_vocab}] integer table (draft_vocab_size)")
    ids = torch.arange(cfg.draft_vocab) + d2t.long()
    if bool((ids < 0).any() or (ids >= cfg.vocab_size).any()):
        raise DSparkConfigError(f"weights: d2t maps draft ids to target ids in [{int(ids.min())}, {int(ids.max())}];"
                                f" expected ids in [0, vocab_size={cfg.vocab_size})")
    if ids.unique().numel() != ids.numel():
        raise DSparkConfigError("weights: d2t maps two draft ids to the same target id; expected distinct ids")
    weights["d2t"] = d2t.long()


def target_embeddings(target: str | Path | torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(embed_tokens [V, H], lm_head [V, H]) from a target HF folder or a loaded target module."""
    if isinstance(target, torch.nn.Module):
        named = dict(target.named_parameters())
    else:
        from safetensors import safe_open

        named = {}
        for file in sorted(Path(target).glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    if key.endswith(("embed_tokens.weight", "lm_head.weight")):
                        named[key] = f.get_tensor(key)
    embed = next((t for n, t in named.items() if n.endswith("embed_tokens.weight")), None)
    head = next((t for n, t in named.items() if n.endswith("lm_head.weight")), embed)  # tied embeddings
    if embed is None:
        raise DSparkConfigError(f"target {target if not isinstance(target, torch.nn.Module) else type(target).__name__}:"
                                " no embed_tokens.weight found; expected a decoder LM (Llama/Qwen/Mistral family)")
    return embed.detach(), head.detach()


def read_target_config(target: str | Path) -> dict[str, Any]:
    """The target folder's config.json; a missing folder or file is a DSparkConfigError, not a traceback."""
    file = Path(target) / "config.json"
    if not file.is_file():
        what = "no config.json in it" if Path(target).is_dir() else "not a readable directory"
        raise DSparkConfigError(f"target={str(target)!r}: {what}; expected the target's HF model folder "
                                "(config.json + *.safetensors)")
    return json.loads(file.read_text())


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtypes(dtype: str, head_dtype: str, device: torch.device,
                   model_dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype | None]:
    """The drafter's compute dtype and its LM head's (None: the drafter's) for the ``dtype`` / ``head_dtype``
    settings: "auto" = float32 on CPU (no bf16 units on AVX2) and the target's dtype elsewhere; the head as a
    bfloat16 copy on CPU, where it is memory-bound."""
    compute = _DTYPES.get(dtype, torch.float32 if device.type == "cpu" else model_dtype)
    head = _DTYPES.get(head_dtype, torch.bfloat16 if head_dtype == "auto" and device.type == "cpu" else None)
    return compute, head


def load_drafter(directory: str | Path, target: str | Path | torch.nn.Module | None = None, *,
                 target_config: Any = None, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> DSparkDrafter:
    """Read, validate and build a drafter. ``target`` supplies omitted embed_tokens/lm_head."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DSparkConfigError(f"drafter={str(directory)!r}: not a readable directory; expected a drafter "
                                "checkpoint directory (config.json + *.safetensors)")
    cfg = DSparkConfig.load(directory)
    if target_config is None and target is not None and not isinstance(target, torch.nn.Module):
        target_config = read_target_config(target)
    if target_config is not None:
        cfg.check_target(target_config)
    weights = read_weights(directory)
    validate_weights(cfg, weights)
    if any(n not in weights for n in FROZEN):
        if target is None:
            raise DSparkConfigError(f"weights: {[n for n in FROZEN if n not in weights]} omitted from the "
                                    "checkpoint; expected a target to take them from")
        embed, head = target_embeddings(target)
        for name, t in (("embed_tokens.weight", embed), ("lm_head.weight", head)):
            want = (cfg.vocab_size, cfg.hidden_size)
            if name not in weights:
                if tuple(t.shape[1:]) != want[1:] or t.shape[0] < want[0]:
                    raise DSparkConfigError(f"target {name} has shape {list(t.shape)}; expected {list(want)} "
                                            "(drafter hidden_size/vocab_size must match the target's)")
                t = t[: want[0]]
                if name == "lm_head.weight" and "d2t" in weights:  # the target's rows of the draft vocabulary
                    t = t[torch.arange(cfg.draft_vocab) + weights["d2t"]]
                weights[name] = t
    model = DSparkDrafter(cfg)
    model.load_state_dict(weights, strict=True)
    return model.to(device=device, dtype=dtype).eval()


def save_drafter(model: DSparkDrafter, directory: str | Path, *, include_frozen: bool = False,
                 dtype: torch.dtype | None = None) -> Path:
    """config.json (DeepSpec format) + model.safetensors; frozen target copies omitted unless asked."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.cfg.save(directory)
    state = model.state_dict() if include_frozen else model.trainable_state_dict()
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
             for k, v in state.items()}
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "producer": "vllm-dspark"})
    tmp.replace(directory / WEIGHTS_FILE)
    return directory


# ----------------------------------------------------------------------------- new drafters
def default_layer_ids(num_target_layers: int, count: int = 5) -> list[int]:
    """Evenly spread ids from layer 1 to the second-to-last (DeepSpec: [1, 9, 17, 25, 33] of 36)."""
    last = num_target_layers - 2
    count = max(1, min(count, last))
    if count == 1:
        return [last]
    return sorted({round(1 + i * (last - 1) / (count - 1)) for i in range(count)})


def config_for_target(target_config: Mapping[str, Any], *, num_layers: int = 2, markov_rank: int = 256,
                      block_size: int = 7, num_target_layer_ids: int = 5, mask_token_id: int | None = None,
                      intermediate_size: int | None = None, draft_vocab_size: int | None = None) -> DSparkConfig:
    """A drafter config sized for a HF decoder target (hidden size and vocab follow the target)."""
    t = dict(target_config.get("text_config") or target_config)
    hidden, heads = t["hidden_size"], t["num_attention_heads"]
    rope_theta, rope_parameters = read_rope(t)  # the target's RoPE, scaling included
    head_dim = t.get("head_dim") or hidden // heads
    cfg = DSparkConfig(
        hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=heads,
        num_key_value_heads=t.get("num_key_value_heads") or heads, head_dim=head_dim,
        intermediate_size=intermediate_size or t.get("intermediate_size") or 4 * hidden,
        vocab_size=t["vocab_size"], rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta, rope_parameters=rope_parameters,
        max_position_embeddings=t.get("max_position_embeddings", 32768), block_size=block_size,
        mask_token_id=mask_token_id if mask_token_id is not None else _pick_mask_token(t),
        target_layer_ids=default_layer_ids(t["num_hidden_layers"], num_target_layer_ids),
        num_target_layers=t["num_hidden_layers"], target_hidden_size=hidden, markov_rank=markov_rank,
        draft_vocab_size=draft_vocab_size if draft_vocab_size and draft_vocab_size < t["vocab_size"] else None,
    )
    cfg.validate()
    return cfg


def _pick_mask_token(t: Mapping[str, Any]) -> int:
    """A token the chat never uses: the highest id, unless it is bos/eos/pad (DeepSpec adds a mask token;
    a frozen embedding row of an unused token serves the same purpose)."""
    special = {t.get("bos_token_id"), t.get("eos_token_id"), t.get("pad_token_id")}
    for tid in range(t["vocab_size"] - 1, 0, -1):
        if tid not in special:
            return tid
    return 0


def new_drafter(target: str | Path | torch.nn.Module, target_config: Mapping[str, Any], *, seed: int = 0,
                draft_token_ids: torch.Tensor | list[int] | None = None, **kwargs) -> DSparkDrafter:
    """A fresh drafter sized for the target: initialised weights, the target's embeddings and LM head.

    ``draft_token_ids``: the target ids the drafter may propose (a reduced draft vocabulary, see
    :func:`select_draft_vocab`); None = the whole vocabulary.
    """
    ids = None
    if draft_token_ids is not None:
        ids = torch.as_tensor(draft_token_ids, dtype=torch.int64).unique()  # sorted, distinct
        vocab = (target_config.get("text_config") or target_config)["vocab_size"]
        if ids.numel() >= vocab:
            ids = None
        elif ids.numel() == 0 or int(ids[0]) < 0 or int(ids[-1]) >= vocab:
            raise _bad("draft_token_ids", f"{ids.numel()} ids", f"1 to {vocab - 1} distinct ids in [0, {vocab})")
    cfg = config_for_target(target_config, draft_vocab_size=None if ids is None else ids.numel(), **kwargs)
    torch.manual_seed(seed)
    model = DSparkDrafter(cfg)
    init_weights(model)
    embed, head = target_embeddings(target)
    model.embed_tokens.weight.data.copy_(embed[: cfg.vocab_size].float())
    if ids is not None:
        model.d2t.copy_(ids - torch.arange(ids.numel()))
    set_lm_head(model, head)
    return model


def set_lm_head(model: DSparkDrafter, target_head: torch.Tensor) -> None:
    """Copy the target's LM head rows (only the draft vocabulary's when it is reduced) into the drafter."""
    ids = model.draft_token_ids
    rows = target_head[: model.cfg.vocab_size] if ids is None else target_head[ids.to(target_head.device)]
    model.lm_head.weight.data.copy_(rows.float())


def select_draft_vocab(token_counts: torch.Tensor, size: int, always: set[int] | list[int] = ()) -> torch.Tensor:
    """token_counts [V] -> the ``size`` most frequent target ids (ties: lower id first) plus ``always`` (e.g.
    end-of-turn ids), sorted: a reduced draft vocabulary (EAGLE-3 keeps the 32k most frequent of Llama-3's 128k)."""
    counts = token_counts.double().clone()
    counts[list(always)] = float("inf")  # always kept
    order = torch.sort(-counts, stable=True).indices  # descending count, lower id first among equals
    return order[:size].sort().values


def init_drafter(target_dir: str | Path, out_dir: str | Path, *, seed: int = 0, **kwargs) -> DSparkDrafter:
    """`vllm-dspark init`: :func:`new_drafter` for a target folder, saved to ``out_dir``."""
    model = new_drafter(target_dir, read_target_config(target_dir), seed=seed, **kwargs)
    save_drafter(model, out_dir)
    return model


def init_weights(model: DSparkDrafter, std: float = 0.02) -> None:
    """Small-normal linears, unit norms, zero Markov output (a fresh head starts as no bias)."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)
        elif not name.startswith(("embed_tokens", "lm_head")):
            torch.nn.init.normal_(p, std=std)
    if model.markov_head is not None:
        torch.nn.init.zeros_(model.markov_head.markov_w2.weight)


# ----------------------------------------------------------------------------- CLI
def summary(model: DSparkDrafter, directory: str | Path) -> str:
    cfg = model.cfg
    n_train = sum(v.numel() for v in model.trainable_state_dict().values())
    lines = [
        f"drafter       {directory}",
        f"layers        {cfg.num_hidden_layers} x hidden {cfg.hidden_size} ({cfg.num_attention_heads} heads / "
        f"{cfg.num_key_value_heads} kv, head_dim {cfg.head_dim}, mlp {cfg.intermediate_size})",
        f"target layers {cfg.target_layer_ids} (aux ids {cfg.aux_layer_ids}), target hidden {cfg.ctx_hidden_size}",
        f"vocab         {cfg.vocab_size} (draft {cfg.draft_vocab}), mask token {cfg.mask_token_id}",
        f"rope          {cfg.describe_rope()} (max positions {cfg.max_position_embeddings})",
        f"block         {cfg.block_size} -> up to {cfg.max_draft_tokens} drafts per round "
        f"(sample_from_anchor={cfg.sample_from_anchor})",
        "markov head   " + (f"{cfg.markov_head_type}, rank {cfg.markov_rank}" if cfg.has_markov else "none (ablation)"),
        "confidence    " + ("on" + (" (with Markov term)" if cfg.confidence_head_with_markov else "")
                              if cfg.enable_confidence_head else "off"),
        f"parameters    {n_train / 1e6:.2f} M trainable",
    ]
    return "\n".join(lines)


def check_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="vllm-dspark check", description="Validate a DSpark drafter checkpoint.",
                                 formatter_class=HelpFormatter)
    ap.add_argument("--drafter", required=True, help="drafter directory (config.json + *.safetensors)")
    ap.add_argument("--target", help="target HF folder: check vocab/hidden/layers and borrow embeddings")
    ap.add_argument("-k", "--num-speculative-tokens", type=int, metavar="K",
                    help="check K against the trained block size")
    args = ap.parse_args(argv)
    try:
        model = load_drafter(args.drafter, args.target)
        if args.num_speculative_tokens is not None:
            model.cfg.check_num_speculative_tokens(args.num_speculative_tokens)
    except DSparkConfigError as e:
        print(f"vllm-dspark check: {e}", file=sys.stderr)
        return 2
    print(summary(model, args.drafter))
    if args.target:
        # The drafter rotates as its config says (its trainer's RoPE); a drafter whose RoPE differs from the
        # target's was trained elsewhere or saved wrongly: worth a look, not an error.
        t = read_target_config(args.target)
        theta, params = read_rope(dict(t.get("text_config") or t))
        target_rope = {**params, "rope_theta": theta}
        same = target_rope == model.cfg.rope
        print(f"target rope   {'same' if same else 'DIFFERS: ' + json.dumps(target_rope, sort_keys=True)}")
    print("ok")
    return 0


def init_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="vllm-dspark init", description="Write a fresh (untrained) drafter.",
                                 formatter_class=HelpFormatter)
    ap.add_argument("--target", required=True, help="target HF folder")
    ap.add_argument("--out", required=True, help="output drafter directory")
    ap.add_argument("--layers", type=int, default=2, help="draft transformer layers (paper: 2 beat 5-layer DFlash)")
    ap.add_argument("--markov-rank", type=int, default=256, help="Markov head rank; 0 = Markov-less ablation")
    ap.add_argument("--block-size", type=int, default=7, help="draft tokens per block")
    ap.add_argument("--num-target-layers", type=int, default=5, help="how many target layers feed the drafter")
    ap.add_argument("--seed", type=int, default=0, help="torch seed of the random initialisation")
    args = ap.parse_args(argv)
    try:
        model = init_drafter(args.target, args.out, seed=args.seed, num_layers=args.layers,
                             markov_rank=args.markov_rank, block_size=args.block_size,
                             num_target_layer_ids=args.num_target_layers)
    except DSparkConfigError as e:
        print(f"vllm-dspark init: {e}", file=sys.stderr)
        return 2
    print(summary(model, args.out))
    return 0
