"""Checks that run before vLLM starts an engine: the same ones the proposer makes at load time, in seconds.

A bad drafter path, a drafter trained for another model, a wrong K or an unknown ``additional_config`` key
would otherwise surface 30-40 s later from inside the engine core, wrapped by vLLM in several tracebacks.
`vllm-dspark serve` calls :func:`check_dspark` on its arguments; every process's plugin registration wraps
vLLM's config creation with it (``compat.install_preflight``), which covers offline ``LLM(...)``.
No torch until the weights are read, so the common mistakes are refused before that import.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from .config import DSparkConfig, DSparkConfigError
from .settings import DSparkSettings

PROPOSER = "vllm_dspark.DSparkProposer"


def target_config(model: str | Path) -> dict[str, Any] | None:
    """The config.json of a local target folder; None for anything else (a hub id is vLLM's to resolve)."""
    file = Path(model).expanduser() / "config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # vLLM reports its own target's problems


def check_dspark(additional_config: Any, num_speculative_tokens: Any, target: Mapping[str, Any] | Any | None,
                 *, weights: bool = True) -> DSparkSettings:
    """Validate DSpark's settings, the drafter checkpoint, K, and the drafter against the target's HF config
    (a dict or a PretrainedConfig; None skips that check). Raises :class:`DSparkConfigError` naming what is
    wrong; returns the parsed settings."""
    settings = DSparkSettings.from_additional_config(additional_config)
    drafter = Path(settings.drafter).expanduser()
    if not drafter.is_dir():
        what = "a file, not a directory" if drafter.is_file() else "no such directory"
        raise DSparkConfigError(f'additional_config["dspark"]["drafter"]={settings.drafter!r}: {what}; expected '
                                "a drafter checkpoint directory (config.json + *.safetensors)")
    cfg = DSparkConfig.load(drafter)
    if target is not None:
        cfg.check_target(target)
    cfg.check_num_speculative_tokens(num_speculative_tokens, copying=settings.sources != "drafter")
    if settings.suffix_corpus:
        from .corpus import corpus_files

        corpus_files(settings.suffix_corpus)
    if weights:
        from .checkpoint import read_weights, validate_weights

        validate_weights(cfg, read_weights(drafter))
    return settings


def is_dspark(speculative_config: Any) -> bool:
    """Whether a speculative config (dict or vLLM's SpeculativeConfig) selects the DSpark proposer."""
    get = speculative_config.get if isinstance(speculative_config, Mapping) else (
        lambda k: getattr(speculative_config, k, None))
    return speculative_config is not None and get("model") == PROPOSER


def install() -> None:
    """register() step: run :func:`check_dspark` where vLLM builds its config (see compat.install_preflight)."""
    from .integration.compat import install_preflight

    install_preflight()
