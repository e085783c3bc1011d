"""``additional_config["dspark"]``: the plugin's own settings, parsed and validated without torch or vLLM.

Kept apart from the proposer so that `vllm-dspark serve` and the offline preflight can refuse a bad setting
in a fraction of a second, before vLLM starts an engine.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, fields
from typing import Any

from .config import DSparkConfigError


@dataclass
class DSparkSettings:
    """``additional_config["dspark"]``: the plugin's own settings (vLLM rejects extra speculative keys)."""

    drafter: str = ""
    # Bias only the top-k base candidates in the Markov head (0 = dense). On CPU the dense head would cost
    # ~40% of the drafter's LM head (r/H); top-k makes it negligible. q is then the truncated distribution.
    topk: int = 32
    # Hand q to vLLM's rejection sampler for requests with temperature > 0 (speculative sampling).
    probabilistic: bool = True
    # Drafter compute dtype: "auto" = float32 on CPU (no bf16 units on AVX2), the target's dtype on GPU.
    dtype: str = "auto"
    # The drafter's LM head: "auto" = a bfloat16 copy on CPU (the head is memory-bound there and bfloat16 halves
    # its bytes; see DSparkDrafter.set_head_dtype), the drafter's own elsewhere; "same" = the drafter's dtype; or
    # "float32" | "bfloat16" | "float16".
    head_dtype: str = "auto"
    # Run the drafter's full trained block every round and keep the first k drafts (DeepSpec, paper Alg. 1),
    # instead of a block of k slots: attention inside a block is non-causal, so a short block is a shape the
    # drafter never saw in training and drafts other tokens (benchmarks/README.md: full vs short pass).
    full_block: bool = True
    # Memory for drafter context rows kept per prefix block (used when vLLM's prefix caching is on; blocks
    # completed while drafting was paused are kept unprojected, ~4x larger, until a request takes them).
    prefix_cache_mb: int = 256
    # "adaptive": per-request block lengths from the confidence head and the measured cost of verification
    # (paper Alg. 1; needs a confidence head, else fixed); "fixed": always num_speculative_tokens.
    mode: str = "adaptive"
    # Adaptive mode: steps without drafting after a verdict that drafting does not pay (doubled after each further
    # such verdict, up to probe_interval_max; back to probe_interval when it pays again or the batch halves). See
    # policy.SpeedPolicy.
    probe_interval: int = 32
    probe_interval_max: int = 1024
    # Where drafts come from (vllm_dspark.suffix): "hybrid" = per request, the policy picks a suffix draft (copied
    # from the request's text or a recent output; no drafter time), the drafter, or a splice of both, whichever it
    # expects to pay best; "drafter" = the drafter alone (eval and calibrate measure it so); "suffix" = copying alone.
    sources: str = "hybrid"
    # Tokens of recent finished outputs kept for suffix drafts (the oldest half goes when full).
    suffix_cache_tokens: int = 1 << 18
    # Text the target wrote before, copied from like recent outputs but never evicted (vllm_dspark.corpus):
    # comma-separated .jsonl / .jsonl.gz conversations or .txt files, or directories of them (empty: none).
    suffix_corpus: str = ""
    # Keep every proposal (request, anchor position, anchor, drafts) in ``proposer.records``: for tests and
    # debugging only (grows without bound).
    record: bool = False
    # Append one JSON line per engine step (its timings, batch, drafts and tokens) to this file: what the policy saw
    # and did, for `python -m vllm_dspark.eval.step_log FILE` (empty: off).
    step_log: str = ""

    @classmethod
    def from_additional_config(cls, additional: Any) -> "DSparkSettings":
        raw = (additional or {}).get("dspark") if isinstance(additional, dict) else None
        if not isinstance(raw, dict):
            raise DSparkConfigError('additional_config["dspark"]: missing; expected {"drafter": "<drafter dir>", ...} '
                                    "(e.g. --additional-config '{\"dspark\": {\"drafter\": \"DIR\"}}')")
        known = {f.name for f in fields(cls)}
        removed = sorted(set(raw) & set(REMOVED))
        if removed:
            raise DSparkConfigError(f'additional_config["dspark"]["{removed[0]}"]: no longer a setting: '
                                    f"{REMOVED[removed[0]]}")
        unknown = sorted(set(raw) - known)
        if unknown:
            hints = [f"{k!r} (did you mean {nearest!r}?)" if (nearest := nearest_key(k, known)) else repr(k)
                     for k in unknown]
            raise DSparkConfigError(f'additional_config["dspark"]: unknown key(s) {", ".join(hints)}; '
                                    f'expected only {sorted(known)}')
        s = cls(**raw)
        for name, rule in RULES.items():
            value = getattr(s, name)
            if (expected := rule.error(value)) is not None:
                raise DSparkConfigError(f'additional_config["dspark"]["{name}"]={value!r}: {expected}')
        for name, lower in AT_LEAST:
            value, bound = getattr(s, name), getattr(s, lower)
            if value < bound:
                raise DSparkConfigError(f'additional_config["dspark"]["{name}"]={value!r}: '
                                        f'expected >= {lower} ({bound})')
        return s


# Validation, one rule per field (tests/unit/test_settings.py checks that none is missing). Each rule's error()
# returns what was expected, or None when the value is fine.
@dataclass(frozen=True)
class Int:
    """An integer >= min (bools are ints in Python: rejected)."""

    min: int

    def error(self, value: Any) -> str | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= self.min
        return None if ok else f"expected an integer >= {self.min}"


@dataclass(frozen=True)
class Bool:
    def error(self, value: Any) -> str | None:
        return None if isinstance(value, bool) else "expected true or false"


class Choice:
    """One of the given strings."""

    def __init__(self, *choices: str):
        self.choices = choices

    def error(self, value: Any) -> str | None:
        return None if value in self.choices else f"expected {'|'.join(self.choices)}"


@dataclass(frozen=True)
class Text:
    """A non-empty string."""

    expected: str

    def error(self, value: Any) -> str | None:
        return None if isinstance(value, str) and value else f"expected {self.expected}"


@dataclass(frozen=True)
class Str:
    """Any string (empty: the feature is off)."""

    def error(self, value: Any) -> str | None:
        return None if isinstance(value, str) else "expected a file path (a string; empty = off)"


RULES: dict[str, Int | Bool | Choice | Text | Str] = {
    "drafter": Text("a drafter directory"),
    "topk": Int(min=0),
    "probabilistic": Bool(),
    "dtype": Choice("auto", "float32", "bfloat16", "float16"),
    "head_dtype": Choice("auto", "same", "float32", "bfloat16", "float16"),
    "full_block": Bool(),
    "prefix_cache_mb": Int(min=1),
    "mode": Choice("adaptive", "fixed"),
    "probe_interval": Int(min=1),
    "probe_interval_max": Int(min=1),
    "sources": Choice("hybrid", "drafter", "suffix"),
    "suffix_cache_tokens": Int(min=0),
    "suffix_corpus": Str(),
    "record": Bool(),
    "step_log": Str(),
}
# (field, other): field must be >= other; checked after RULES, so both are integers by then.
AT_LEAST: list[tuple[str, str]] = [("probe_interval_max", "probe_interval")]
# Settings that were removed, with what replaced them.
REMOVED: dict[str, str] = {key: "prompt lookup is now suffix drafting, on by default (sources = hybrid; "
                                "sources = drafter turns it off)"
                           for key in ("lookup", "lookup_min", "lookup_max", "lookup_max_batch")}


# One line per setting, for `vllm-dspark serve --help` (the README's table says more).
HELP: dict[str, str] = {
    "drafter": "drafter checkpoint directory (required; set by --drafter)",
    "mode": "adaptive = block lengths from confidence x measured cost, pauses when drafting does not pay; "
            "fixed = always K",
    "probe_interval": "adaptive: steps without drafting before trying again (doubled under load)",
    "probe_interval_max": "adaptive: the longest pause, in steps",
    "topk": "Markov bias over the top-k base candidates only (0 = dense)",
    "probabilistic": "at temperature > 0, sample drafts and hand q to vLLM's rejection sampler",
    "dtype": "drafter dtype: auto | float32 | bfloat16 | float16 (auto: float32 on CPU, the target's on GPU)",
    "head_dtype": "drafter LM head dtype: auto | same | float32 | bfloat16 | float16 (auto: bfloat16 on CPU)",
    "full_block": "run the drafter's whole trained block and keep the first k drafts (false: a block of k slots)",
    "prefix_cache_mb": "memory for drafter context kept per prefix-cache block",
    "sources": "hybrid = per request a suffix draft (copied), the drafter or both, as pays best; drafter; suffix",
    "suffix_cache_tokens": "tokens of recent finished outputs kept for suffix drafts",
    "suffix_corpus": "the target's earlier answers (.jsonl[.gz] conversations, .txt, or directories) to copy from",
    "record": "keep every proposal and round in memory (tests, eval; grows without bound)",
    "step_log": "append a JSON line per engine step to this file (python -m vllm_dspark.eval.step_log FILE)",
}


def settings_help(indent: str = "  ") -> str:
    """The settings with their defaults and HELP lines, one per line."""
    rows = [(f.name, "(required)" if f.name == "drafter" else json.dumps(f.default)) for f in fields(DSparkSettings)]
    width = max(len(f"{n} = {d}") for n, d in rows)
    return "\n".join(f"{indent}{f'{n} = {d}':<{width}}  {HELP.get(n, '')}" for n, d in rows)


def nearest_key(key: str, known: set[str]) -> str | None:
    """The known key a typo most likely meant (case and separators ignored first, then spelling)."""
    norm = {k.lower().replace("-", "_"): k for k in known}
    folded = str(key).lower().replace("-", "_")
    if folded in norm:
        return norm[folded]
    close = difflib.get_close_matches(folded, list(norm), n=1, cutoff=0.6)
    return norm[close[0]] if close else None
