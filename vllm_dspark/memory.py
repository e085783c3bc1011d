"""KV-cache size for CPU engines started by this package's examples and `vllm-dspark serve`.

vLLM's CPU backend otherwise reserves ``gpu_memory_utilization`` (0.92) of the node's *total* memory and
refuses to start when less than that is available ("Available memory on node 0 ... is less than desired CPU
memory utilization"), i.e. on any machine where other processes use more than 8% of the memory. An explicit
KV-cache size skips that check: a quarter of the memory available now, at most 4 GiB (~90k tokens of
SmolLM2-135M in float32), at least 256 MiB. The user's own choice wins: ``VLLM_CPU_KVCACHE_SPACE`` (GiB),
``kv_cache_memory_bytes`` / ``--kv-cache-memory-bytes``, or ``--gpu-memory-utilization``.
"""
from __future__ import annotations

import os

GiB = 1 << 30
MAX_BYTES = 4 * GiB
MIN_BYTES = GiB // 4
SHARE = 0.25  # of the memory available at start: the model, activations and other processes need the rest
USER_ENV = "VLLM_CPU_KVCACHE_SPACE"


def available_bytes() -> int:
    """Memory available to a new allocation now (psutil, else /proc/meminfo's MemAvailable)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    raise RuntimeError("cannot tell how much memory is available (no psutil, no /proc/meminfo)")


def kv_cache_bytes(available: int | None = None) -> int:
    """The default KV-cache size for ``available`` bytes of free memory (measured now when None)."""
    available = available_bytes() if available is None else int(available)
    return int(max(MIN_BYTES, min(MAX_BYTES, SHARE * available)))


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def llm_kwargs(available: int | None = None) -> dict:
    """``LLM(...)`` keyword arguments sizing the KV cache on CPU: ``{"kv_cache_memory_bytes": n}``; empty on
    other platforms and when the user set ``VLLM_CPU_KVCACHE_SPACE`` (vLLM reads it itself)."""
    if os.environ.get(USER_ENV) or not on_cpu():
        return {}
    return {"kv_cache_memory_bytes": kv_cache_bytes(available)}


def describe(n: int, available: int | None = None) -> str:
    available = available_bytes() if available is None else available
    return (f"KV cache {n / GiB:.2f} GiB ({SHARE:.0%} of the {available / GiB:.1f} GiB available, at most "
            f"{MAX_BYTES / GiB:.0f} GiB)")
