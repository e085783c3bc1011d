"""`vllm-dspark` command line: one subcommand per job, each implemented where its logic lives.

Every entry names a ``module:function`` taking ``argv: list[str]`` and returning an exit code; modules are
imported only when their subcommand runs, so `vllm-dspark check` never imports vLLM.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("vllm_dspark.integration.serve:main", "run vLLM's OpenAI server (DSpark on with --drafter)"),
    "check": ("vllm_dspark.checkpoint:check_main", "validate a drafter checkpoint (optionally vs a target)"),
    "init": ("vllm_dspark.checkpoint:init_main", "write a fresh, untrained drafter for a target"),
    "convert-smollm2": ("vllm_dspark.assets:convert_main", "convert the packaged SmolLM2 GGUF to an HF folder"),
    "gen-data": ("vllm_dspark.train.data:main", "regenerate assistant answers with the target (training data)"),
    "train": ("vllm_dspark.train.trainer:main", "distil a DSpark drafter for a target, online"),
    "eval": ("vllm_dspark.eval.evaluate:main", "acceptance length, per-position acceptance, calibration"),
    "calibrate": ("vllm_dspark.eval.evaluate:calibrate_main", "fit confidence temperatures from eval data"),
    "bench": ("vllm_dspark.eval.bench:main", "end-to-end tokens/s: none vs ngram vs DSpark, interleaved"),
    "soak": ("vllm_dspark.eval.soak:main", "long mixed-traffic run against the server; leaks and mismatches"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every subcommand's help shows each option's default, except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.required:
            return action.help or ""
        return super()._get_help_string(action)


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: vllm-dspark COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"vllm-dspark: unknown command {name!r}; expected one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, func = COMMANDS[name][0].split(":")
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
