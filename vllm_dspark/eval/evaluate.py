"""`vllm-dspark eval` and `vllm-dspark calibrate`: acceptance of DSpark drafters inside a real vLLM engine.

    vllm-dspark eval --target DIR --drafter DIR [--drafter DIR2 ...] [--label NAME ...] [--prompts mtbench|copy|FILE]
                     [--turn 1|2] [--max-tokens 256] [--temperature 0] [-k K] [--num-prompts N]
                     [--mode fixed|adaptive] [--dspark-settings JSON] --out DIR
    vllm-dspark calibrate --target DIR --drafter DIR [same prompt flags] [--out DIR]

Block lengths default to ``--mode fixed`` (K drafts every round), so every position is measured; ``adaptive``
lets the plugin's load-aware policy choose (positions it skips are then simply not counted).

For each drafter one in-process vLLM engine runs the plugin over the prompts (chat template via ``llm.chat``;
turn 2 = the question's second user turn after the model's own turn-1 answer, generated first in the same
run). Only the measured turn counts. The proposer (``additional_config.dspark.record``) logs every
*verified* round as (request id, drafted, accepted, confidences); the engine is asked for vLLM's per-request
spec-decode metrics too, so the report can say that our accounting equals vLLM's, globally
(``counters_agree``, against the Prometheus counters) and round by round per request (``per_request_agree``).
Drafts proposed in a request's last step are never verified and count on neither side.

``OUT/report.json`` (metric definitions in :mod:`vllm_dspark.eval.metrics`) holds, per drafter label: tau,
conditional acceptance and survival by position, tau per prompt category, both counter sets, the drafter's
config.json, and for a drafter with a confidence head the per-position ECE/AUROC of the predicted survival
(raw, and calibrated when ``calibration.CALIBRATION_FILE`` sits next to the drafter). PNGs: conditional
acceptance (all drafters), survival, and one reliability diagram per drafter with a confidence head.

``calibrate`` runs the same measurement for one drafter, fits sequential temperature scaling on the recorded
confidence logits, writes the calibration file next to the drafter and prints the ECE before/after (on the
data it was fitted on).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vllm_dspark.cli import HelpFormatter
from vllm_dspark.eval.metrics import AcceptanceStats, calibration_report, per_category_tau, reliability_bins
from vllm_dspark.eval.prompts import Prompt, load_prompts

SPEC_METHOD = {"method": "custom_class", "model": "vllm_dspark.DSparkProposer"}
# vLLM Prometheus counter name -> our field name.
_COUNTERS = {
    "vllm:spec_decode_num_drafts": "num_drafts",
    "vllm:spec_decode_num_draft_tokens": "num_draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "num_accepted_tokens",
    "vllm:spec_decode_num_accepted_tokens_per_pos": "accepted_per_pos",
}


# ---------------------------------------------------------------------------------------------------- engine
def prepare_env(kv_cache_gib: float) -> None:
    """In-process engine core (the proposer object must be reachable) and a small CPU KV cache."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{kv_cache_gib:g}")


def dspark_spec(drafter: str | Path, k: int, record: bool = False, settings: dict | None = None) -> dict:
    """``LLM(...)`` kwargs that switch DSpark on with ``k`` speculative tokens (``settings``: more
    ``additional_config["dspark"]`` keys, e.g. ``{"topk": 0}``)."""
    return {"speculative_config": dict(SPEC_METHOD, num_speculative_tokens=int(k)),
            "additional_config": {"dspark": dict(settings or {}, drafter=str(drafter), record=record)}}


def parse_settings(text: str | None) -> dict:
    """``--dspark-settings '{"topk": 0}'`` -> dict (the proposer validates the keys)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--dspark-settings {text!r}: not valid JSON ({e})") from None
    if not isinstance(value, dict) or {"drafter", "record"} & set(value):
        raise SystemExit(f"--dspark-settings {text!r}: expected a JSON object of plugin settings other than "
                         "drafter/record, e.g. '{\"topk\": 0}'")
    return value


def build_llm(target: str, args: argparse.Namespace, **spec: Any):
    from vllm import LLM

    return LLM(str(target), dtype=args.dtype, enforce_eager=True, seed=args.seed, max_model_len=args.max_model_len,
               disable_log_stats=False, **spec)


def default_k(drafter: str | Path) -> int:
    from vllm_dspark.config import DSparkConfig

    return DSparkConfig.load(drafter).max_draft_tokens


def _vllm_counters(llm, k: int) -> dict:
    out = {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0, "accepted_per_pos": [0] * k}
    for m in llm.get_metrics():
        key = _COUNTERS.get(m.name)
        if key == "accepted_per_pos":
            out[key] = [int(v) for v in m.values]
        elif key is not None:
            out[key] = int(m.value)
    return out


def _counter_delta(after: dict, before: dict) -> dict:
    out = {k: after[k] - before[k] for k in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")}
    b = before["accepted_per_pos"] + [0] * (len(after["accepted_per_pos"]) - len(before["accepted_per_pos"]))
    out["accepted_per_pos"] = [x - y for x, y in zip(after["accepted_per_pos"], b)]
    return out


@dataclass
class EvalRun:
    """What one drafter's engine run measured (the turn being evaluated only)."""

    label: str
    drafter: str
    k: int
    categories: list[str]  # per prompt
    rounds: list[tuple[int, int, int, list[float], str]]  # (prompt, drafted, accepted, confidences, kind) per round
    vllm_counters: dict
    per_request_agree: bool
    generated_tokens: int
    seconds: float
    unmatched_rounds: int = 0  # rounds whose request id matched no prompt (should be 0)


def _prompt_index(internal_id: str, index: dict[str, int]) -> int | None:
    from vllm_dspark.integration.compat import external_request_id

    if internal_id in index:
        return index[internal_id]
    return index.get(external_request_id(internal_id))


def run_drafter(target: str, drafter: str, label: str, prompts: list[Prompt], args: argparse.Namespace) -> EvalRun:
    """Build the engine, generate turn 1 (and turn 2), collect the measured turn's rounds and counters."""
    import gc

    from vllm import SamplingParams

    from vllm_dspark.integration.compat import proposer_of

    k = args.k or default_k(drafter)
    settings = {"mode": args.mode, "sources": "drafter", **parse_settings(args.dspark_settings)}  # the drafter alone
    spec = dspark_spec(drafter, k, record=True, settings=settings)
    llm = build_llm(target, args, per_request_spec_decode_metrics="detailed", **spec)
    proposer = proposer_of(llm)
    if proposer is None:
        raise RuntimeError("vllm-dspark eval: the DSpark proposer is not reachable in this process "
                           "(VLLM_ENABLE_V1_MULTIPROCESSING must be 0)")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    conversations = [[{"role": "user", "content": p.turns[0]}] for p in prompts]
    if args.turn == 2:
        first = llm.chat(conversations, params, use_tqdm=_bar(f"{label}: turn 1"))
        conversations = [c + [{"role": "assistant", "content": o.outputs[0].text},
                              {"role": "user", "content": p.turns[1]}]
                         for c, o, p in zip(conversations, first, prompts)]
    start_log = len(proposer.stats.round_log)
    before = _vllm_counters(llm, k)
    t0 = time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=_bar(f"{label}: turn {args.turn}"))
    seconds = time.perf_counter() - t0
    counters = _counter_delta(_vllm_counters(llm, k), before)

    index = {o.request_id: i for i, o in enumerate(outputs)}
    rounds, unmatched = [], 0
    per_req: list[list[tuple[int, int]]] = [[] for _ in prompts]
    for req_id, drafted, accepted, conf, kind in proposer.stats.round_log[start_log:]:
        i = _prompt_index(req_id, index)
        if i is None:
            unmatched += 1
            continue
        rounds.append((i, drafted, accepted, conf, kind))
        per_req[i].append((drafted, accepted))
    agree = unmatched == 0
    for i, o in enumerate(outputs):
        m = o.outputs[0].spec_decode_metrics
        theirs = list(zip(m.per_step_drafted, m.per_step_accepted)) if m is not None else []
        agree &= theirs == per_req[i]
    run = EvalRun(label, str(drafter), k, [p.category for p in prompts], rounds, counters, agree,
                  sum(len(o.outputs[0].token_ids) for o in outputs), seconds, unmatched)
    del proposer, llm
    gc.collect()
    return run


def _bar(desc: str):
    from tqdm import tqdm

    return lambda *a, **kw: tqdm(*a, **dict(kw, desc=desc))


# ------------------------------------------------------------------------------------------------ accounting
def our_counters(run: EvalRun) -> dict:
    """Our rounds in vLLM's counter form (accepted_per_pos[k] = rounds that accepted position k + 1)."""
    d = np.asarray([r[1] for r in run.rounds], dtype=np.int64)
    a = np.asarray([r[2] for r in run.rounds], dtype=np.int64)
    return {"num_drafts": int(d.size), "num_draft_tokens": int(d.sum()), "num_accepted_tokens": int(a.sum()),
            "accepted_per_pos": [int((a > k).sum()) for k in range(run.k)]}


def confidence_arrays(run: EvalRun) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """-> (z [N, K] confidence logits, drafted [N], accepted [N]) of the drafter's own rounds (kind "drafter");
    None without confidences (no head)."""
    rounds = [r for r in run.rounds if r[4] == "drafter"]
    if not rounds or any(len(r[3]) != r[1] for r in rounds):
        return None
    conf = np.full((len(rounds), run.k), 0.5)
    for i, (_, drafted, _, c, _) in enumerate(rounds):
        conf[i, :drafted] = c
    conf = np.clip(conf, 1e-7, 1 - 1e-7)
    drafted = np.asarray([r[1] for r in rounds], dtype=np.int64)
    accepted = np.asarray([r[2] for r in rounds], dtype=np.int64)
    return np.log(conf) - np.log1p(-conf), drafted, accepted


def _reliability(survival: np.ndarray, drafted: np.ndarray, accepted: np.ndarray) -> list:
    out = []
    for k in range(survival.shape[1]):
        m = drafted >= k + 1
        out.append(reliability_bins(survival[m, k], (accepted[m] >= k + 1).astype(np.float64)))
    return out


def calibration_section(run: EvalRun, drafter: str) -> tuple[dict | None, dict]:
    """-> (report section, reliability bins per curve) for a drafter with a confidence head."""
    from vllm_dspark.calibration import CALIBRATION_FILE, apply_temperature, load_calibration

    arrays = confidence_arrays(run)
    if arrays is None:
        return None, {}
    z, drafted, accepted = arrays
    raw = apply_temperature(z, np.ones(run.k))
    section = {"raw": calibration_report(raw, accepted, drafted), "calibrated": None, "temperatures": None,
               "file": None}
    bins = {"raw": _reliability(raw, drafted, accepted)}
    path = Path(drafter) / CALIBRATION_FILE
    if path.is_file():
        temps, _ = load_calibration(path)
        cal = apply_temperature(z, temps)
        section.update(calibrated=calibration_report(cal, accepted, drafted), temperatures=temps[: run.k].tolist(),
                       file=str(path))
        bins["calibrated"] = _reliability(cal, drafted, accepted)
    return section, bins


def drafter_report(run: EvalRun) -> tuple[dict, dict]:
    """-> (the drafter's entry in report.json, reliability bins for its diagram)."""
    d = [r[1] for r in run.rounds]
    a = [r[2] for r in run.rounds]
    stats = AcceptanceStats.from_rounds(d, a, max_k=run.k)
    ours = our_counters(run)
    agree = {key: ours[key] == run.vllm_counters[key] for key in ours}
    cal, bins = calibration_section(run, run.drafter)
    config_path = Path(run.drafter) / "config.json"
    entry = {
        "drafter": run.drafter,
        "k": run.k,
        "num_rounds": stats.num_rounds,
        "tau": stats.tau,
        "acceptance_conditional": stats.conditional.tolist(),
        "acceptance_survival": stats.survival.tolist(),
        # denominators: rounds that drafted >= k tokens (survival) / reached position k (conditional)
        "acceptance_counts": {"drafted_at": stats.drafted_at.tolist(), "reached_at": stats.reached_at.tolist(),
                              "accepted_at": stats.accepted_at.tolist()},
        "per_category_tau": per_category_tau([run.categories[r[0]] for r in run.rounds], d, a),
        "per_source_tau": per_category_tau([r[4] for r in run.rounds], d, a),
        "drafter_config": json.loads(config_path.read_text()) if config_path.is_file() else None,
        "our_counters": ours,
        "vllm_counters": run.vllm_counters,
        "counters_agree": all(agree.values()),
        "counters_agree_by_field": agree,
        "per_request_agree": run.per_request_agree,
        "generated_tokens": run.generated_tokens,
        "seconds": run.seconds,
        "calibration": cal,
    }
    return entry, bins


def json_ready(x: Any) -> Any:
    """Strict JSON: nan/inf -> null, numpy scalars/arrays -> Python."""
    if isinstance(x, dict):
        return {str(k): json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    if isinstance(x, np.ndarray):
        return json_ready(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def measured(header: dict, runs: list[EvalRun]) -> str:
    """What an eval measured, in one line for its plots' titles."""
    ks = sorted({run.k for run in runs})
    prompts = f"{header.get('prompts')} turn {header.get('turn')}" if header.get("turn") else header.get("prompts")
    return (f"{Path(str(header.get('target', '?'))).name}, {prompts}: {header.get('num_prompts')} prompts x "
            f"{header.get('max_tokens')} tokens, K={'/'.join(map(str, ks))}, T={header.get('temperature')}, "
            f"{header.get('mode')} block lengths")


def write_report(out: Path, header: dict, runs: list[EvalRun]) -> dict:
    from vllm_dspark.eval.plots import plot_conditional_acceptance, plot_reliability, plot_survival

    out.mkdir(parents=True, exist_ok=True)
    report = dict(header, drafters={})
    plots = {}
    subtitle = measured(header, runs)
    for run in runs:
        entry, bins = drafter_report(run)
        report["drafters"][run.label] = entry
        if bins:
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run.label)
            plots[f"reliability_{run.label}"] = plot_reliability(
                bins, out / f"reliability_{safe}.png", title=f"Reliability of predicted survival: {run.label} "
                f"(tau {entry['tau']:.2f}, {entry['num_rounds']} rounds)", subtitle=subtitle)
    entries = report["drafters"]
    legend = {lbl: f"{lbl}: tau {e['tau']:.2f}, {e['num_rounds']} rounds" for lbl, e in entries.items()}
    plots["conditional"] = plot_conditional_acceptance(
        {lbl: e["acceptance_conditional"] for lbl, e in entries.items()}, out / "conditional_acceptance.png",
        counts={lbl: e["acceptance_counts"]["reached_at"] for lbl, e in entries.items()}, legend=legend,
        subtitle=subtitle)
    plots["survival"] = plot_survival(
        {lbl: e["acceptance_survival"] for lbl, e in entries.items()}, out / "survival.png",
        counts={lbl: e["acceptance_counts"]["drafted_at"] for lbl, e in entries.items()}, legend=legend,
        subtitle=subtitle)
    report["plots"] = {name: os.path.basename(p) for name, p in plots.items()}
    report = json_ready(report)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "  -  " if v is None else format(v, spec)


def format_table(report: dict) -> str:
    entries = report["drafters"]
    k_max = max(e["k"] for e in entries.values())
    width = max(8, *map(len, entries))
    lines = [f"{'drafter':<{width}}  {'tau':>5}  {'rounds':>6}  conditional acceptance k=1..{k_max}"]
    for label, e in entries.items():
        cond = " ".join(_fmt(v) for v in e["acceptance_conditional"])
        lines.append(f"{label:<{width}}  {_fmt(e['tau']):>5}  {e['num_rounds']:>6}  {cond}")
    for label, e in entries.items():
        cats = ", ".join(f"{c} {_fmt(t)}" for c, t in e["per_category_tau"].items())
        agree = "yes" if e["counters_agree"] and e["per_request_agree"] else "NO"
        lines.append(f"{label}: tau by category: {cats or '-'}; counts agree with vLLM: {agree}")
        cal = e["calibration"]
        if cal is not None:
            after = cal["calibrated"]["ece_mean"] if cal["calibrated"] else None
            lines.append(f"{label}: survival ECE (count-weighted mean over positions): raw "
                         f"{_fmt(cal['raw']['ece_mean'], '.3f')}"
                         + (f" -> calibrated {_fmt(after, '.3f')}" if cal["calibrated"] else ""))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- CLI
def _parser(prog: str, many: bool) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    ap.add_argument("--target", required=True, help="target HF folder")
    ap.add_argument("--drafter", required=True, action="append" if many else "store",
                    help="drafter folder" + (" (repeat to compare several)" if many else ""))
    if many:
        ap.add_argument("--label", action="append", default=None, help="name per --drafter (default: folder name)")
    ap.add_argument("--prompts", default="mtbench",
                    help="mtbench | copy | FILE (.jsonl {prompt|turns, category} or text)")
    ap.add_argument("--turn", type=int, choices=(1, 2), default=1, help="2 = second turn after the model's answer")
    ap.add_argument("--num-prompts", type=int, default=None, help="first N prompts (default: all)")
    ap.add_argument("--max-tokens", type=int, default=256, help="tokens generated per prompt")
    ap.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    ap.add_argument("-k", "--num-speculative-tokens", dest="k", type=int, default=None, metavar="K",
                    help="draft tokens per round (default: the drafter's block size)")
    ap.add_argument("--mode", choices=("fixed", "adaptive"), default="fixed",
                    help="DSpark block lengths: fixed = always K drafts, so every position is measured; "
                         "adaptive = the load-aware policy decides per request")
    ap.add_argument("--dspark-settings", default=None,
                    help='extra additional_config["dspark"] settings as JSON, e.g. \'{"topk": 0}\'')
    ap.add_argument("--out", required=many, default=None, help="output folder (report.json, PNGs)")
    ap.add_argument("--dtype", default="float32", help="target dtype (float32: fastest verification on AVX2 CPUs)")
    ap.add_argument("--max-model-len", type=int, default=None, help="vLLM's max_model_len (default: the target's)")
    ap.add_argument("--kv-cache-gib", type=float, default=2.0, help="VLLM_CPU_KVCACHE_SPACE unless already set")
    ap.add_argument("--seed", type=int, default=0, help="vLLM's seed")
    return ap


def _header(command: str, args: argparse.Namespace, prompts: list[Prompt]) -> dict:
    return {"command": command, "target": str(args.target), "prompts": args.prompts, "num_prompts": len(prompts),
            "turn": args.turn, "max_tokens": args.max_tokens, "temperature": args.temperature, "dtype": args.dtype,
            "seed": args.seed, "mode": args.mode, "dspark_settings": parse_settings(args.dspark_settings),
            "metric_definitions": "tau = mean(accepted + 1) per verified round; conditional_k = P(k accepted | "
                                  "k-1 accepted, k drafted); survival_k = P(>= k accepted | k drafted)"}


def main(argv: list[str]) -> int:
    args = _parser("vllm-dspark eval", many=True).parse_args(argv)
    labels = args.label or [Path(d).name for d in args.drafter]
    if len(labels) != len(args.drafter) or len(set(labels)) != len(labels):
        raise SystemExit(f"--label: expected {len(args.drafter)} distinct names (one per --drafter), got {labels}")
    prompts = load_prompts(args.prompts, args.num_prompts, args.turn)
    prepare_env(args.kv_cache_gib)
    runs = [run_drafter(args.target, d, lbl, prompts, args) for d, lbl in zip(args.drafter, labels)]
    report = write_report(Path(args.out), _header(shlex.join(["vllm-dspark", "eval", *argv]), args, prompts), runs)
    print(format_table(report))
    print(f"report: {Path(args.out) / 'report.json'}")
    return 0 if all(e["counters_agree"] and e["per_request_agree"] for e in report["drafters"].values()) else 1


def calibrate_main(argv: list[str]) -> int:
    from vllm_dspark.calibration import apply_temperature, fit_sequential_temperature, save_calibration

    args = _parser("vllm-dspark calibrate", many=False).parse_args(argv)
    prompts = load_prompts(args.prompts, args.num_prompts, args.turn)
    prepare_env(args.kv_cache_gib)
    label = Path(args.drafter).name
    run = run_drafter(args.target, args.drafter, label, prompts, args)
    arrays = confidence_arrays(run)
    if arrays is None:
        print(f"vllm-dspark calibrate: {args.drafter}: no confidences recorded (no confidence head, or no "
              "verified rounds); nothing to calibrate", file=sys.stderr)
        return 1
    z, drafted, accepted = arrays
    temps = fit_sequential_temperature(z, accepted, drafted=drafted)
    before = calibration_report(apply_temperature(z, np.ones(run.k)), accepted, drafted)
    after = calibration_report(apply_temperature(z, temps), accepted, drafted)
    command = shlex.join(["vllm-dspark", "calibrate", *argv])
    path = save_calibration(args.drafter, temps, meta={
        "command": command, "target": str(args.target), "prompts": args.prompts, "turn": args.turn,
        "num_rounds": len(run.rounds), "ece_before": json_ready(before["ece"]),
        "ece_after": json_ready(after["ece"])})
    print(f"calibration ({len(run.rounds)} rounds, fitted and scored on the same data) -> {path}")
    print(f"{'k':>3}  {'temperature':>11}  {'ECE before':>10}  {'ECE after':>9}  {'rounds':>6}")
    for k in range(run.k):
        print(f"{k + 1:>3}  {temps[k]:>11.3f}  {_fmt(json_ready(before['ece'][k]), '.4f'):>10}  "
              f"{_fmt(json_ready(after['ece'][k]), '.4f'):>9}  {before['count'][k]:>6}")
    print(f"mean ECE: {_fmt(json_ready(before['ece_mean']), '.4f')} -> "
          f"{_fmt(json_ready(after['ece_mean']), '.4f')}")
    if args.out:
        report = write_report(Path(args.out), _header(command, args, prompts), [run])
        print(format_table(report))
    return 0
