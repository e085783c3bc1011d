"""DSparkConfig: the drafter's typed configuration, read from and written to upstream formats.

Formats read:
- DeepSpec / vLLM ``Qwen3DSparkModel`` config.json: a Qwen3 config plus DSpark keys (``block_size``,
  ``mask_token_id``, ``target_layer_ids``, ``markov_rank``, ...). Values may also sit in a nested
  ``dflash_config`` or ``eagle_config`` (vLLM's precedence: dflash_config > eagle_config > top level) and
  under vLLM's aliases ``dspark_target_layer_ids`` (wins over a top-level ``target_layer_ids``, as in vLLM),
  ``dspark_noise_token_id`` and ``dspark_block_size`` (fallbacks).
- speculators ``dspark``: flat config with ``transformer_layer_config`` and ``aux_hidden_state_layer_ids``
  (= target_layer_ids + 1, vLLM's aux-hidden-state indexing where 0 is the embedding output).
Written: always the DeepSpec format (``to_dict``), so vLLM's in-tree loader reads what we save.

RoPE is read as transformers reads it (``RotaryEmbeddingConfigMixin``): ``rope_scaling`` (older configs) or
``rope_parameters`` (transformers 5.x), their ``rope_theta`` over a top-level one, ``type`` as an alias of
``rope_type``, ``original_max_position_embeddings`` defaulting to ``max_position_embeddings`` for the scaled
types; transformers' default theta 1e4 when none is given. Types other than :data:`SUPPORTED_ROPE_TYPES` are refused.

Every validation error is a :class:`DSparkConfigError` naming the field, the value and what was expected.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

ARCHITECTURE = "Qwen3DSparkModel"
KNOWN_ARCHITECTURES = ("Qwen3DSparkModel", "Qwen3OmniDSparkModel")
MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")
SUPPORTED_MARKOV_HEAD_TYPES = ("vanilla",)
# RoPE types the draft layers implement (model/rope.py, vLLM's get_rope math), with the keys each requires.
SUPPORTED_ROPE_TYPES = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
# The most tokens a copied (suffix) draft may verify: past the drafter's block only copies run on, and a loop
# the target is in is accepted whole.
MAX_COPY_TOKENS = 32
DEFAULT_ROPE_THETA = 10_000.0  # transformers' RotaryEmbeddingConfigMixin.default_theta (and vLLM's get_rope)
# Keys that change the rotation in ways the draft layers do not implement: refused, never ignored.
_ROPE_UNSUPPORTED_KEYS = ("mrope_section", "mrope_interleaved", "use_fope", "rope_dim", "alpha")


class DSparkConfigError(ValueError):
    """A drafter config or checkpoint is not what DSpark needs; the message names field, value, expectation."""


def _bad(field_name: str, value: Any, expected: str) -> DSparkConfigError:
    return DSparkConfigError(f"{field_name}={value!r}: expected {expected}")


_ROPE_ORIGINAL_MAX_TYPES = ("llama3", "yarn", "longrope")


def read_rope(raw: Mapping[str, Any]) -> tuple[float, dict[str, Any]]:
    """(rope_theta, rope_parameters without rope_theta) from a HF-style config dict, the way transformers 5.x's
    ``convert_rope_params_to_dict`` / ``standardize_rope_params`` read it. Type and keys are validated later."""
    params = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    name = "rope_scaling" if raw.get("rope_scaling") else "rope_parameters"
    if not isinstance(params, Mapping):
        raise _bad(name, params, "a dict such as {\"rope_type\": \"default\", \"rope_theta\": 1000000.0}")
    if any(isinstance(v, Mapping) for v in params.values()):
        raise _bad(name, dict(params), "one RoPE dict for every layer (per-layer-type RoPE is not supported)")
    params = dict(params)
    theta = params.pop("rope_theta", None)
    if theta is None:
        theta = raw.get("rope_theta", DEFAULT_ROPE_THETA)
    if isinstance(theta, int) and not isinstance(theta, bool):
        theta = float(theta)
    kind = params.pop("type", None)
    params["rope_type"] = params.get("rope_type", kind or "default")
    if params["rope_type"] in _ROPE_ORIGINAL_MAX_TYPES and raw.get("max_position_embeddings") is not None:
        # A top-level original_max_position_embeddings is ignored, as transformers' Qwen3/Llama configs do
        # (only config classes that declare that field give it priority).
        params.setdefault("original_max_position_embeddings", raw["max_position_embeddings"])
    original, max_pos = params.get("original_max_position_embeddings"), raw.get("max_position_embeddings")
    if (params["rope_type"] == "yarn" and params.get("factor") is None
            and all(isinstance(v, (int, float)) and v > 0 for v in (original, max_pos))):
        # transformers: a yarn dict without factor scales max_position_embeddings / original
        params["factor"] = max_pos / original
    return theta, params


@dataclass
class DSparkConfig:
    # Draft transformer (Qwen3-style layers).
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = DEFAULT_ROPE_THETA
    # rope_type and that type's keys (factor, ...), without rope_theta; see the ``rope`` property.
    rope_parameters: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default"})
    max_position_embeddings: int = 32768
    # DSpark.
    block_size: int = 7
    mask_token_id: int = 0
    target_layer_ids: list[int] = field(default_factory=list)
    num_target_layers: int | None = None
    target_hidden_size: int | None = None  # default: hidden_size
    draft_vocab_size: int | None = None  # default: vocab_size
    markov_rank: int = 256
    markov_head_type: str = "vanilla"
    enable_confidence_head: bool = True
    confidence_head_with_markov: bool = True
    # True (DeepSpec/vLLM dense checkpoints): queries [anchor, MASK x (g-1)], every query predicts the
    # next token, so block_size drafts. False (speculators default): [anchor, MASK x g], masks predict.
    sample_from_anchor: bool = True
    # Keys we do not interpret, kept so a round trip loses nothing.
    extra: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------- derived
    @property
    def ctx_hidden_size(self) -> int:
        return self.target_hidden_size or self.hidden_size

    @property
    def draft_vocab(self) -> int:
        return self.draft_vocab_size or self.vocab_size

    @property
    def has_markov(self) -> bool:
        return self.markov_rank > 0

    @property
    def max_draft_tokens(self) -> int:
        """Most speculative tokens one block can propose (the trained block)."""
        return self.block_size if self.sample_from_anchor else self.block_size - 1

    @property
    def rope(self) -> dict[str, Any]:
        """The whole RoPE dict, transformers 5.x's ``rope_parameters``: rope_type, rope_theta, the type's keys."""
        return {**self.rope_parameters, "rope_theta": self.rope_theta}

    def describe_rope(self) -> str:
        rope = self.rope
        keys = ", ".join(f"{k} {rope[k]}" for k in sorted(rope) if k not in ("rope_type", "rope_theta"))
        return f"{rope['rope_type']}, theta {rope['rope_theta']:g}" + (f", {keys}" if keys else "")

    @property
    def aux_layer_ids(self) -> list[int]:
        """vLLM aux-hidden-state indices (0 = embedding output, i+1 = output of layer i)."""
        return [i + 1 for i in self.target_layer_ids]

    # ---------------------------------------------------------------- reading
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "DSparkConfig":
        """Read a DeepSpec/vLLM or speculators config dict (format detected from its keys)."""
        if raw.get("speculators_model_type") is not None:
            return cls._from_speculators(raw)
        return cls._from_deepspec(raw)

    @classmethod
    def load(cls, path: str | Path) -> "DSparkConfig":
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if path.is_file() and path.suffix != ".json":
            raise DSparkConfigError(f"drafter={str(path)!r}: a file, not a directory; expected a drafter "
                                    "checkpoint directory (config.json + *.safetensors)")
        if not file.is_file():
            raise DSparkConfigError(f"config.json: not found at {str(file)!r}: expected a drafter directory")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise DSparkConfigError(f"config.json at {str(file)!r}: not valid JSON ({e})") from None
        return cls.from_dict(raw)

    @classmethod
    def _from_deepspec(cls, raw: Mapping[str, Any]) -> "DSparkConfig":
        archs = raw.get("architectures") or []
        if archs and not any(a in KNOWN_ARCHITECTURES for a in archs):
            # vLLM silently treats an unknown DSpark architecture as DeepSeek-V4; we refuse.
            raise _bad("architectures", archs, f"one of {list(KNOWN_ARCHITECTURES)}")

        def pick(name: str, top_level: tuple[str, ...]) -> Any:
            for section in ("dflash_config", "eagle_config"):
                nested = raw.get(section)
                if isinstance(nested, Mapping) and nested.get(name) is not None:
                    return nested[name]
            for key in top_level:
                if raw.get(key) is not None:
                    return raw[key]
            return None

        consumed = {
            "architectures", "dflash_config", "eagle_config", "dspark_target_layer_ids",
            "dspark_noise_token_id", "dspark_block_size", "model_type", "rope_scaling",
        }
        kwargs: dict[str, Any] = {}
        kwargs["rope_theta"], kwargs["rope_parameters"] = read_rope(raw)
        for f in dataclasses.fields(cls):
            if f.name in ("extra", "rope_theta", "rope_parameters"):
                consumed.add(f.name)
                continue
            # Top-level keys in vLLM 0.32's order: dspark_target_layer_ids wins over target_layer_ids
            # (eagle3_utils.get_eagle3_aux_layers_from_config), the other aliases are fallbacks.
            top_level = {
                "target_layer_ids": ("dspark_target_layer_ids", "target_layer_ids"),
                "mask_token_id": ("mask_token_id", "dspark_noise_token_id"),
                "block_size": ("block_size", "dspark_block_size"),
            }.get(f.name, (f.name,))
            value = pick(f.name, top_level)
            if value is not None:
                kwargs[f.name] = value
            consumed.add(f.name)
        if "head_dim" not in kwargs and "hidden_size" in kwargs and "num_attention_heads" in kwargs:
            kwargs["head_dim"] = kwargs["hidden_size"] // kwargs["num_attention_heads"]
        if "num_key_value_heads" not in kwargs and "num_attention_heads" in kwargs:
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        missing = [n for n in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                               "vocab_size") if n not in kwargs]
        if missing:
            raise _bad(missing[0], None, "an integer in the drafter's config.json")
        if "target_layer_ids" not in kwargs:
            raise _bad("target_layer_ids", None, "a non-empty list of target layer ids (0-based, -1 = embeddings)")
        kwargs["extra"] = {k: v for k, v in raw.items() if k not in consumed}
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    @classmethod
    def _from_speculators(cls, raw: Mapping[str, Any]) -> "DSparkConfig":
        kind = raw.get("speculators_model_type")
        if kind != "dspark":
            raise _bad("speculators_model_type", kind, "'dspark'")
        layer_cfg = raw.get("transformer_layer_config")
        if not isinstance(layer_cfg, Mapping):
            raise _bad("transformer_layer_config", layer_cfg, "a dict with the draft layers' Qwen3 config")
        aux = raw.get("aux_hidden_state_layer_ids")
        if not isinstance(aux, list) or not aux:
            raise _bad("aux_hidden_state_layer_ids", aux, "a non-empty list (target layer ids + 1)")
        merged = {k: v for k, v in layer_cfg.items() if k != "architectures"}
        for key in ("draft_vocab_size", "target_hidden_size", "mask_token_id", "markov_rank", "markov_head_type",
                    "block_size", "enable_confidence_head", "confidence_head_with_markov"):
            if raw.get(key) is not None:
                merged[key] = raw[key]
        merged["target_layer_ids"] = [int(i) - 1 for i in aux]
        merged["sample_from_anchor"] = bool(raw.get("sample_from_anchor", False))
        cfg = cls._from_deepspec(merged)
        cfg.extra = {"speculators_config": raw.get("speculators_config")} if raw.get("speculators_config") else {}
        return cfg

    # ---------------------------------------------------------------- writing
    def to_dict(self) -> dict[str, Any]:
        """DeepSpec / vLLM ``Qwen3DSparkModel`` format."""
        out: dict[str, Any] = {"architectures": [ARCHITECTURE], "model_type": "qwen3"}
        out.update(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        out["num_target_layers"] = self.num_target_layers
        out["rope_parameters"] = self.rope  # transformers 5.x layout; rope_theta stays top-level for older readers
        out.update(hidden_act="silu", attention_bias=False, tie_word_embeddings=False)
        return out

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "config.json").write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "intermediate_size", "vocab_size", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise _bad(name, value, "a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise _bad("num_key_value_heads", self.num_key_value_heads,
                       f"a divisor of num_attention_heads={self.num_attention_heads}")
        if not isinstance(self.markov_rank, int) or self.markov_rank < 0:
            raise _bad("markov_rank", self.markov_rank, "an integer >= 0 (0 = the Markov-less ablation)")
        if self.markov_head_type not in MARKOV_HEAD_TYPES:
            raise _bad("markov_head_type", self.markov_head_type, f"one of {list(MARKOV_HEAD_TYPES)}")
        # -1 is the embedding output (DeepSpec's validate_target_layer_ids; vLLM's aux hidden state 0)
        if not self.target_layer_ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= -1
                                                for i in self.target_layer_ids):
            raise _bad("target_layer_ids", self.target_layer_ids,
                       "a non-empty list of layer ids >= -1 (-1 = the embedding output)")
        if sorted(set(self.target_layer_ids)) != list(self.target_layer_ids):
            raise _bad("target_layer_ids", self.target_layer_ids, "unique ids in increasing order")
        if self.num_target_layers is not None:
            self._check_layer_range(self.num_target_layers, "num_target_layers")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise _bad("mask_token_id", self.mask_token_id, f"a token id in [0, vocab_size={self.vocab_size})")
        if self.draft_vocab_size is not None and not 0 < self.draft_vocab_size <= self.vocab_size:
            raise _bad("draft_vocab_size", self.draft_vocab_size, f"in (0, vocab_size={self.vocab_size}]")
        if self.max_draft_tokens < 1:
            raise _bad("block_size", self.block_size, "at least 2 when sample_from_anchor is false")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise _bad(name, value, "a finite positive number")
        self._validate_rope()

    def _validate_rope(self) -> None:
        rope = self.rope
        kind = rope.get("rope_type")
        if kind not in SUPPORTED_ROPE_TYPES:
            raise _bad("rope_parameters.rope_type", kind,
                       f"one of {list(SUPPORTED_ROPE_TYPES)} (the RoPE types vllm-dspark's draft layers implement)")
        for key in SUPPORTED_ROPE_TYPES[kind]:
            value = rope.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise _bad(f"rope_parameters.{key}", value, f"a finite positive number (required by rope_type "
                           f"{kind!r})")
        if kind == "llama3" and rope["low_freq_factor"] > rope["high_freq_factor"]:
            raise _bad("rope_parameters.low_freq_factor", rope["low_freq_factor"],
                       f"<= high_freq_factor={rope['high_freq_factor']}")
        for key in _ROPE_UNSUPPORTED_KEYS:
            if rope.get(key) not in (None, False):
                raise _bad(f"rope_parameters.{key}", rope[key], f"absent: vllm-dspark implements rope_type {kind!r} "
                           "without it")
        partial = rope.get("partial_rotary_factor", 1.0)
        if partial != 1.0:
            raise _bad("rope_parameters.partial_rotary_factor", partial,
                       "1.0 (absent): the draft layers rotate the whole head dim")

    def _check_layer_range(self, num_layers: int, source: str) -> None:
        for i in self.target_layer_ids:
            if i >= num_layers:
                raise _bad("target_layer_ids", self.target_layer_ids,
                           f"ids < {num_layers} ({source}); {i} is out of range")
            if i == num_layers - 1:
                raise _bad("target_layer_ids", self.target_layer_ids,
                           f"no id equal to the final layer {num_layers - 1} ({source}): its output is the "
                           "final norm's input, DSpark drafts from intermediate layers")

    def check_markov_supported(self) -> None:
        """The runtime implements the vanilla head; other variants are refused with a clear message."""
        if self.has_markov and self.markov_head_type not in SUPPORTED_MARKOV_HEAD_TYPES:
            raise _bad("markov_head_type", self.markov_head_type,
                       f"one of {list(SUPPORTED_MARKOV_HEAD_TYPES)}: the '{self.markov_head_type}' variant "
                       "(DeepSpec code, unused by its configs) is not implemented by vllm-dspark yet")

    def check_num_speculative_tokens(self, k: int, copying: bool = False) -> None:
        """``copying``: suffix drafts are on (sources hybrid or suffix); they may run past the drafter's block,
        up to MAX_COPY_TOKENS (the drafter still drafts at most its block)."""
        top = max(self.max_draft_tokens, MAX_COPY_TOKENS) if copying else self.max_draft_tokens
        if not isinstance(k, int) or k < 1 or k > top:
            why = (f"drafts past the drafter's block of {self.max_draft_tokens} are copied ones" if copying else
                   f"the drafter was trained with block_size={self.block_size}; more tokens would be drafted "
                   f"blind; with sources hybrid or suffix, copied drafts may reach {MAX_COPY_TOKENS}")
            raise _bad("num_speculative_tokens", k, f"an integer in [1, {top}] ({why})")

    def check_target(self, target: Mapping[str, Any] | Any) -> None:
        """Validate against a target's HF config (dict or PretrainedConfig)."""
        get = target.get if isinstance(target, Mapping) else (lambda k, d=None: getattr(target, k, d))
        text = get("text_config")
        if text is not None:  # multimodal wrappers keep the LM config nested
            get = text.get if isinstance(text, Mapping) else (lambda k, d=None: getattr(text, k, d))
        t_vocab, t_hidden, t_layers = get("vocab_size"), get("hidden_size"), get("num_hidden_layers")
        if t_vocab is not None and self.vocab_size != t_vocab:
            raise _bad("vocab_size", self.vocab_size, f"the target's vocab_size={t_vocab} (drafter for another model?)")
        if t_hidden is not None and self.ctx_hidden_size != t_hidden:
            raise _bad("target_hidden_size", self.ctx_hidden_size,
                       f"the target's hidden_size={t_hidden} (drafter for another model?)")
        if t_layers is not None:
            self._check_layer_range(int(t_layers), f"the target has {t_layers} layers")
