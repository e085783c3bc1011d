"""`vllm-dspark bench`: end-to-end decode throughput through vLLM, no speculation vs ngram vs DSpark.

    vllm-dspark bench --target DIR --drafter DIR [--ablation DIR] [--methods none,ngram,dspark,...]
                      [--concurrency 1,4,16] [--num-prompts N] [--max-tokens 128] [--rounds 3] [-k K] --out DIR

Design (what makes the numbers comparable):

* **One engine per method, built once, all alive together** in this process (in-process engine cores, each
  with its own small CPU KV cache, ``--kv-cache-gib``). In-process engines bind no OpenMP threads of their
  own (vLLM only pins threads for engine-core subprocesses), so idle engines cost memory, not CPU. On a
  machine where they do not fit, ``--rebuild`` builds each method's engine for its cell and drops it after.
* **Interleaved in time slices** (default, ``--interleave slices``): for round r, for concurrency c, every
  method's closed loop over the same prompts runs at once, the engines taking turns in ``--slice-seconds``
  slices (A B C A B C ...; who goes first rotates with the round), each timed only while it runs. The machine's
  drift (other jobs, neighbours on the host) then hits every method alike within the run, not just between runs
  (back-to-back whole cells, ``--interleave cells``, spread 4-9% on these 2-core machines). tokens/s are medians
  over rounds, ratios to no speculation the median of each round's ratio. A paused engine only waits: our
  proposer does not count the wait as a step's cost, so its load-aware policy sees the steps it would see alone.
* **Concurrency is a closed loop** on the engine: at most c requests are in flight; whenever one finishes the
  next prompt is added at once (what a serving benchmark's ``max_concurrency`` does), driven through
  ``LLMEngine.add_request`` / ``step``. Unlike waves of c prompts this leaves no slots idle waiting for a
  wave's slowest request, and unlike ``max_num_seqs=c`` it needs no engine per concurrency.
* Prompts: the same chat-templated turn-1 prompts (token ids rendered once) for every cell; greedy,
  ``max_tokens``, EOS honoured. tokens/s = generated tokens / wall seconds of the cell (prefill included).
* Speculation is lossless for greedy decoding, so within a (round, concurrency) every method must emit the
  same tokens: ``outputs_identical`` (first mismatches listed when not).
* tau for speculative methods comes from vLLM's per-request spec-decode metrics (pooled over the cell's
  rounds), which stay per engine where Prometheus counters would be shared by all engines in the process.

Methods are a registry ``name -> engine kwargs`` (:data:`METHODS`): ``none``, ``ngram`` (K=4, lookup 2-4),
``dspark`` (plugin defaults: hybrid drafting, load-aware block lengths when the drafter has a confidence head, at
most K), ``dspark-drafter`` / ``dspark-suffix`` (one source alone: the drafter, or copying), ``dspark-corpus`` /
``dspark-suffix-corpus`` (the hybrid / copying, also from ``--suffix-corpus``), ``dspark-kN`` (the
drafter, always N drafts: fixed K = N), ``dspark-adaptive-kN`` (load-aware with at most N), and the drafter alone
for the ``--ablation`` drafter (``dspark-ablation``, ``dspark-ablation-kN``). ``ngram-kN`` sets ngram's K.
E.g. ``--methods none,ngram,dspark,dspark-k3,dspark-k7``. (``dspark-fixed[-kN]`` is kept as an alias of fixed K.)
``NAME@LABEL`` runs another engine of method NAME (``--methods none,none@b,dspark``: the A/A ratio none@b / none
is the bench's own noise).
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import re
import shlex
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vllm_dspark.cli import HelpFormatter
from vllm_dspark.eval.evaluate import default_k, dspark_spec, json_ready, prepare_env
from vllm_dspark.eval.loop import ClosedLoop, generate_closed_loop, generate_interleaved  # noqa: F401 - re-exported
from vllm_dspark.eval.prompts import load_prompts
from vllm_dspark.eval.step_log import attach, format_summary, load, summary

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


def _none(args: argparse.Namespace, k: int | None) -> dict:
    if k is not None:
        raise SystemExit("--methods: 'none' takes no -kN suffix")
    return {}


def _ngram(args: argparse.Namespace, k: int | None) -> dict:
    return {"speculative_config": dict(NGRAM, num_speculative_tokens=k or NGRAM["num_speculative_tokens"])}


def _dspark_from(option: str, corpus: bool = False, **settings: Any
                 ) -> Callable[[argparse.Namespace, int | None], dict]:
    def build(args: argparse.Namespace, k: int | None) -> dict:
        drafter = getattr(args, option)
        if not drafter:
            raise SystemExit(f"--methods: this method needs --{option.replace('_', '-')} DIR")
        extra = dict(settings)
        if corpus:
            if not args.suffix_corpus:
                raise SystemExit("--methods: the *-corpus methods need --suffix-corpus PATH")
            extra["suffix_corpus"] = args.suffix_corpus
        return dspark_spec(drafter, k or args.k or default_k(drafter), settings=extra)
    return build


# name -> (args, k override or None) -> LLM(...) kwargs
METHODS: dict[str, Callable[[argparse.Namespace, int | None], dict]] = {
    "none": _none,
    "ngram": _ngram,
    # The plugin's defaults: hybrid drafting (per request a suffix draft, the drafter or a splice), load-aware
    # block lengths when the drafter has a confidence head.
    "dspark": _dspark_from("drafter"),
    "dspark-adaptive": _dspark_from("drafter"),  # explicit name for "dspark-adaptive-kN"
    "dspark-fixed": _dspark_from("drafter", mode="fixed"),  # always K drafts, the drafter's
    # One source alone, load-aware: the drafter (its quality), or copying (suffix drafts; the drafter never runs).
    "dspark-drafter": _dspark_from("drafter", sources="drafter"),
    "dspark-suffix": _dspark_from("drafter", sources="suffix"),
    "dspark-suffix-fixed": _dspark_from("drafter", sources="suffix", mode="fixed"),
    # The same, also copying from --suffix-corpus (the target's earlier answers).
    "dspark-corpus": _dspark_from("drafter", corpus=True),
    "dspark-suffix-corpus": _dspark_from("drafter", corpus=True, sources="suffix"),
    # A markov_rank=0 drafter (DFlash-style), alone, same modes.
    "dspark-ablation": _dspark_from("ablation", sources="drafter"),
    "dspark-ablation-adaptive": _dspark_from("ablation", sources="drafter"),
    "dspark-ablation-fixed": _dspark_from("ablation", sources="drafter", mode="fixed"),
}
# "dspark-kN" means fixed K = N (issue naming: adaptive is "dspark", fixed K runs are "dspark-k3", "dspark-k7").
_FIXED_WITH_K = {"dspark": "dspark-fixed", "dspark-drafter": "dspark-fixed", "dspark-ablation": "dspark-ablation-fixed",
                 "dspark-suffix": "dspark-suffix-fixed"}
_K_SUFFIX = re.compile(r"^(?P<base>.+)-k(?P<k>[1-9][0-9]*)$")


def method_kwargs(name: str, args: argparse.Namespace) -> dict:
    """Engine kwargs of a method name; ``NAME@LABEL`` is another engine of method NAME (``none,none@b``: an A/A
    run, which shows how far two identical engines' ratio strays from 1 on this machine)."""
    name = name.split("@", 1)[0]
    if name in METHODS:
        return METHODS[name](args, None)
    m = _K_SUFFIX.match(name)
    if m and m["base"] in METHODS:
        return METHODS[_FIXED_WITH_K.get(m["base"], m["base"])](args, int(m["k"]))
    raise SystemExit(f"--methods: unknown method {name!r}; expected one of {sorted(METHODS)}, optionally with a "
                     "-kN suffix (e.g. dspark-k3)")


# ---------------------------------------------------------------------------------------------------- engine
def build_engine(target: str, kwargs: dict, args: argparse.Namespace):
    from vllm import LLM

    extra = {"per_request_spec_decode_metrics": "summary"} if "speculative_config" in kwargs else {}
    return LLM(str(target), dtype=args.dtype, enforce_eager=True, seed=args.seed, max_model_len=args.max_model_len,
               disable_log_stats=False, **kwargs, **extra)


def guard_llvmlite() -> None:
    """Keep later in-process engines alive once numba is loaded (vLLM 0.32, CPU).

    vLLM's ngram proposer imports numba (llvmlite). Every engine built afterwards in the same process runs
    ``vllm.triton_utils.dispatcher._rebind_kernels``, which calls ``vars(x).get(...)`` on each module
    attribute that has a ``__dict__``; llvmlite's lazy ``ffi.lib`` answers the ``__dict__`` lookup with a
    wrapped C function, so engine start-up dies with "'_lib_fn_wrapper' object has no attribute 'get'".
    Seeding the wrapper's function table with a real (empty) ``__dict__`` makes the scan skip it; llvmlite
    never looks that name up itself. Idempotent; a no-op without llvmlite.
    """
    import importlib.util

    if importlib.util.find_spec("llvmlite") is None:
        return
    from llvmlite.binding import ffi

    fntab = getattr(ffi.lib, "_fntab", None)
    if isinstance(fntab, dict):
        fntab.setdefault("__dict__", {})


def _tokenizer(target: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(target))


def _spec_totals(outputs: list) -> tuple[int, int] | None:
    """(verification rounds, accepted drafts) over the outputs, from vLLM's per-request metrics."""
    rounds = accepted = 0
    found = False
    for o in outputs:
        m = o.outputs[0].spec_decode_metrics
        if m is not None:
            found = True
            rounds += sum(m.histogram)
            accepted += sum(j * n for j, n in enumerate(m.histogram))
    return (rounds, accepted) if found else None


# ------------------------------------------------------------------------------------------------------- run
def _parse_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise SystemExit(f"{flag} {text!r}: expected comma-separated positive integers")
    return values


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vllm-dspark bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--target", required=True, help="target HF folder")
    ap.add_argument("--drafter", default=None, help="DSpark drafter folder (method 'dspark')")
    ap.add_argument("--ablation", default=None, help="markov_rank=0 drafter folder (method 'dspark-ablation')")
    ap.add_argument("--methods", default=None,
                    help="comma-separated, from " + ", ".join(METHODS) + " (+ -kN suffix); default: none,ngram,"
                         "dspark (+ dspark-ablation with --ablation)")
    ap.add_argument("--suffix-corpus", default="",
                    help="the target's earlier answers (setting suffix_corpus) for the *-corpus methods, e.g. "
                         "data/smollm2 for SmolLM2")
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated maximum requests in flight")
    ap.add_argument("--prompts", default="mtbench", help="mtbench | copy | FILE (turn-1 prompts)")
    ap.add_argument("--num-prompts", type=int, default=16, help="prompts per cell (closed loop)")
    ap.add_argument("--min-prompts", type=int, default=0,
                    help="cells at concurrency c use min(--num-prompts, max(this, 2c)) prompts, so c=1 cells do "
                         "not take hours; 0 = every cell uses all --num-prompts")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every cell; ratios are medians over rounds")
    ap.add_argument("-k", "--num-speculative-tokens", dest="k", type=int, default=None, metavar="K",
                    help="DSpark draft tokens (default: the drafter's block size)")
    ap.add_argument("--warmup-tokens", type=int, default=8, help="untimed warm-up generation per engine (0: none)")
    ap.add_argument("--interleave", choices=("slices", "cells"), default="slices",
                    help="slices: a round's methods run together, taking turns in time slices (drift cancels "
                         "within the run); cells: each method's run in turn")
    ap.add_argument("--slice-seconds", type=float, default=1.0, help="time slice with --interleave slices")
    ap.add_argument("--ramp", action="store_true",
                    help="requests join one per engine step (the first c spread over c steps): no engine moves in "
                         "lockstep waves, as on a server at steady state (default: the first c join at once)")
    ap.add_argument("--rebuild", action="store_true",
                    help="build each engine per cell (when all do not fit; implies --interleave cells)")
    ap.add_argument("--out", required=True, help="output folder (report.json, PNGs)")
    ap.add_argument("--dtype", default="float32", help="target dtype of every engine")
    ap.add_argument("--max-model-len", type=int, default=2048, help="vLLM's max_model_len of every engine")
    ap.add_argument("--kv-cache-gib", type=float, default=1.0, help="VLLM_CPU_KVCACHE_SPACE per engine, unless set")
    ap.add_argument("--seed", type=int, default=0, help="vLLM's seed of every engine")
    ap.add_argument("--step-logs", action="store_true",
                    help="DSpark engines log every step to OUT/steps-METHOD.jsonl; per batch size, plain vs speculative")
    return ap


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    names = args.methods.split(",") if args.methods else \
        ["none", "ngram", "dspark"] + (["dspark-ablation"] if args.ablation else [])
    names = [n.strip() for n in names if n.strip()]
    if len(set(names)) != len(names):
        raise SystemExit(f"--methods {args.methods!r}: duplicate names")
    specs = {n: method_kwargs(n, args) for n in names}
    step_logs = attach(specs, Path(args.out)) if args.step_logs else {}
    conc = _parse_ints(args.concurrency, "--concurrency")
    if args.rounds < 1:
        raise SystemExit(f"--rounds {args.rounds}: expected >= 1")
    if not args.slice_seconds > 0:
        raise SystemExit(f"--slice-seconds {args.slice_seconds}: expected > 0")
    if args.rebuild:
        args.interleave = "cells"
    prompts = load_prompts(args.prompts, args.num_prompts, 1)
    prepare_env(args.kv_cache_gib)
    guard_llvmlite()

    from tqdm import tqdm
    from vllm import SamplingParams

    tokenizer = _tokenizer(args.target)
    token_prompts = [{"prompt_token_ids": tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": p.turns[0]}], add_generation_prompt=True, tokenize=False),
        add_special_tokens=False)} for p in prompts]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=False)
    warm = SamplingParams(max_tokens=args.warmup_tokens, temperature=0.0) if args.warmup_tokens > 0 else None
    engines: dict[str, Any] = {}

    def engine(name: str):
        if name not in engines:
            engines[name] = build_engine(args.target, specs[name], args)
            if warm is not None:  # untimed: first-step allocations, lazy init
                generate_closed_loop(engines[name], token_prompts[: max(conc)], warm, max(conc))
        return engines[name]

    if not args.rebuild:
        for n in tqdm(names, desc="building engines"):
            engine(n)
    samples: dict[tuple[str, int], list[dict]] = {(n, c): [] for c in conc for n in names}
    mismatches: list[dict] = []
    reference: dict[tuple[int, int], tuple[str, list[list[int]]]] = {}

    def record(r: int, c: int, n: str, outputs: list, seconds: float) -> None:
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
        generated = sum(map(len, tokens))
        samples[(n, c)].append({"tokens_per_s": generated / seconds, "seconds": seconds, "generated": generated,
                                "spec": _spec_totals(outputs)})
        ref_name, ref = reference.setdefault((r, c), (n, tokens))
        for i, (a, b) in enumerate(zip(tokens, ref)):
            if a != b and len(mismatches) < 20:
                mismatches.append({"round": r + 1, "concurrency": c, "method": n, "reference": ref_name, "prompt": i,
                                   "first_diff": next(j for j, (x, y) in enumerate(zip(a + [-1], b + [-2])) if x != y)})

    if args.interleave == "slices":
        groups = [(r, c) for r in range(args.rounds) for c in conc]
        for r, c in tqdm(groups, desc="bench (round, concurrency), methods in time slices"):
            order = names[r % len(names):] + names[:r % len(names)]  # who goes first rotates
            for n in order:
                forget_outputs(engines[n])
            results = generate_interleaved({n: engines[n] for n in order}, token_prompts[: cell_prompts(args, c)],
                                           params, c, args.slice_seconds, ramp=args.ramp)
            for n in names:
                record(r, c, n, *results[n])
    else:
        cells = [(r, c, n) for r in range(args.rounds) for c in conc for n in names]
        for r, c, n in tqdm(cells, desc="bench cells (round, concurrency, method)"):
            llm = engine(n)
            forget_outputs(llm)
            record(r, c, n, *generate_closed_loop(llm, token_prompts[: cell_prompts(args, c)], params, c,
                                                  ramp=args.ramp))
            if args.rebuild:
                del llm
                engines.pop(n)
                gc.collect()

    report = _report(args, argv, names, specs, conc, samples, mismatches)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from vllm_dspark.eval.plots import plot_throughput, plot_throughput_vs_concurrency

    cfg = report["config"]
    subtitle = (f"{Path(cfg['target']).name}, {cfg['prompts']}: up to {cfg['num_prompts']} prompts x "
                f"{cfg['max_tokens']} tokens, greedy, K={args.k or 'the drafter block'}, median of {cfg['rounds']} "
                "rounds")
    report["plots"] = {"throughput": Path(plot_throughput(report["results"], out / "throughput.png",
                                                          subtitle=subtitle)).name,
                       "throughput_vs_concurrency": Path(plot_throughput_vs_concurrency(
                           report["results"], out / "throughput_vs_concurrency.png", subtitle=subtitle)).name}
    (out / "report.json").write_text(json.dumps(json_ready(report), indent=2) + "\n")
    print(format_table(report))
    print(f"report: {out / 'report.json'}")
    for n, path in step_logs.items():
        print(f"\n{n}: {path}\n{format_summary(summary(load([str(path)])))}")
    return 0 if report["outputs_identical"] else 1


def forget_outputs(llm) -> None:
    """Every cell (and the warm-up) generates the same prompts: a suffix cache holding their earlier answers would
    copy them whole. Each cell starts with an empty one (what the engine learned about costs and acceptance stays)."""
    from vllm_dspark.integration.compat import proposer_of

    proposer = proposer_of(llm)
    if proposer is not None and hasattr(proposer, "suffix"):
        proposer.suffix.forget_outputs()


def cell_prompts(args: argparse.Namespace, concurrency: int) -> int:
    """Prompts one cell generates: all of them, or with --min-prompts M, min(all, max(M, 2 x concurrency))."""
    if not args.min_prompts:
        return args.num_prompts
    return min(args.num_prompts, max(args.min_prompts, 2 * concurrency))


def _report(args, argv, names, specs, conc, samples, mismatches) -> dict:
    results = []
    for c in conc:
        for n in names:
            cell = samples[(n, c)]
            spec = [s["spec"] for s in cell if s["spec"] is not None]
            rounds = sum(s[0] for s in spec)
            results.append({
                "method": n, "concurrency": c,
                "tokens_per_s": statistics.median(s["tokens_per_s"] for s in cell),
                "samples": [s["tokens_per_s"] for s in cell],
                "seconds": [s["seconds"] for s in cell],
                "generated_tokens": [s["generated"] for s in cell],
                # Verified rounds and tokens per round incl. the bonus; None for no speculation (tau is also
                # None for a speculative method that never drafted, e.g. ngram without n-gram matches).
                "spec_rounds": rounds if spec else None,
                "spec_rounds_per_round": [s["spec"][0] if s["spec"] is not None else None for s in cell],
                "tau": 1.0 + sum(s[1] for s in spec) / rounds if rounds else None,
            })
    baseline = "none" if "none" in names else names[0]
    # Paired: a round's cells of one concurrency run back to back, so each round's ratio cancels the machine's
    # slow drift (a cell of no speculation spread 73-107 tokens/s over one 16-minute run on these machines).
    per_round = {n: {str(c): [s["tokens_per_s"] / b["tokens_per_s"] for s, b in
                              zip(samples[(n, c)], samples[(baseline, c)])] for c in conc}
                 for n in names if n != baseline}
    ratios = {n: {c: statistics.median(v) for c, v in cells.items()} for n, cells in per_round.items()}
    return {
        "results": results,
        "baseline": baseline,
        "ratios": ratios,
        "ratios_per_round": per_round,
        "outputs_identical": not mismatches,
        "mismatches": mismatches,
        "config": {"target": str(args.target), "drafter": args.drafter, "ablation": args.ablation,
                   "methods": specs, "concurrency": conc, "prompts": args.prompts, "num_prompts": args.num_prompts,
                   "max_tokens": args.max_tokens, "rounds": args.rounds, "dtype": args.dtype,
                   "max_model_len": args.max_model_len, "kv_cache_gib": args.kv_cache_gib, "seed": args.seed,
                   "concurrency_mode": "closed loop: at most c requests in flight, next prompt added on finish"
                                       + (", at most one joining per step" if args.ramp else ""),
                   "order": ("for round, for concurrency: the methods' closed loops together, taking turns in "
                             f"time slices of {args.slice_seconds} s" if args.interleave == "slices" else
                             "for round, for concurrency, for method (cells in turn)")
                            + "; tokens/s: median over rounds; ratios: median over rounds of the round's ratio to "
                              "the baseline",
                   "engines": "rebuilt per cell" if args.rebuild else "one per method, built once, all alive"},
        "command": shlex.join(["vllm-dspark", "bench", *argv]),
    }


def format_table(report: dict) -> str:
    conc = report["config"]["concurrency"]
    rows = {}
    for r in report["results"]:
        ratio = report["ratios"].get(r["method"], {}).get(str(r["concurrency"]))
        tau = f" tau {r['tau']:.2f}" if r["tau"] is not None else ""
        rows.setdefault(r["method"], {})[r["concurrency"]] = \
            f"{r['tokens_per_s']:.1f}" + (f" ({ratio:.2f}x{tau})" if ratio is not None else "")
    width = max(8, *map(len, rows))
    col = max(12, *(len(v) for cells in rows.values() for v in cells.values()))
    lines = [f"tokens/s, median of {report['config']['rounds']} round(s); (ratio to {report['baseline']}: median of "
             "the rounds' ratios; tau)",
             f"{'method':<{width}}  " + "  ".join(f"{'c=' + str(c):>{col}}" for c in conc)]
    for name, cells in rows.items():
        lines.append(f"{name:<{width}}  " + "  ".join(f"{cells.get(c, '-'):>{col}}" for c in conc))
    lines.append("greedy outputs identical across methods: " + ("yes" if report["outputs_identical"] else
                                                             f"NO ({len(report['mismatches'])}+ mismatches)"))
    return "\n".join(lines)
