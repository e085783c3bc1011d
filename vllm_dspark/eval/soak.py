"""`vllm-dspark soak`: long mixed traffic against a DSpark server, checked against a server without speculation.

    vllm-dspark soak --target DIR --drafter DIR --requests N --out DIR [--concurrency 8] [--max-model-len 512]
                     [--max-tokens 64] [--kv-cache-gib 1] [--num-gpu-blocks N] [--block-size B] [-k K] [--seed 0]

What it does:

* Starts TWO OpenAI-compatible servers on free 127.0.0.1 ports, each in its own process group: ``vllm-dspark
  serve TARGET --drafter DIR`` (vLLM's default prefix caching left ON: the plugin keeps drafter context per
  prefix block) and the same target without speculation (the reference). ``--num-gpu-blocks`` shrinks the
  DSpark server's KV cache so the scheduler must preempt.
* Sends N requests with at most ``--concurrency`` in flight, a seeded mix of kinds (:data:`KINDS`): plain and
  streamed greedy completions, chat, stop strings, ``max_tokens=1``, prompts filling the context up to
  ``max_model_len``, sampled (T > 0, seeded) with ``n > 1``, and streams the client closes after a few chunks.
* Every greedy request goes to both servers; speculation is lossless, so the generated token ids (vLLM's
  ``return_token_ids``) must be identical. Differences are counted in ``greedy_mismatches``.
* Errors: any HTTP error status or exception, except the aborts we cause on purpose.
* Memory: RSS of each server's process tree (API server, engine core) sampled every second; ``rss_growth_mb``
  is the DSpark server's growth over the second half of the run (the reference server's growth is reported
  next to it, to tell vLLM's own drift from ours). One bounded cache is shrunk for the run, in both servers:
  oneDNN's global primitive cache (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, default 1024), which vLLM's CPU
  matmuls fill with one primitive per (weight shape, number of rows) seen, ~0.36 MB each for SmolLM2: RSS
  climbs ~370 MB until it is full, and faster with speculation (verified blocks make more distinct row
  counts). At ``--onednn-cache-capacity 64`` (0: oneDNN's default) it fills within minutes, so growth
  after that is ours or vLLM's, not a cache warming up.
* Leaked per-request drafter state: after the run, a final batch, then a few sequential requests, then
  ``vllm_dspark:active_requests`` from ``/metrics`` (should be 0); ``null`` when the server does not export it.

Writes ``OUT/report.json`` and the two server logs; prints a summary table. All traffic stays on 127.0.0.1.

This module holds the traffic plan, the report and the command line; the server processes, RSS sampling and
the client side are in :mod:`vllm_dspark.eval.soak_servers`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vllm_dspark.cli import HelpFormatter
from vllm_dspark.eval.soak_servers import (Job, Result, RssSampler, Server, _server_counters, free_port,
                                           metric_value, rss_growth_mb, run_traffic, server_command)

# Kind -> share of the traffic. Greedy kinds (soak_servers.GREEDY_KINDS) are also sent to the reference server
# and compared.
KINDS: dict[str, float] = {
    "greedy": 0.20,         # completion, token-id prompt
    "greedy_stream": 0.12,  # the same, streamed
    "chat": 0.08,           # chat completion (the target's chat template), greedy
    "stop": 0.10,           # greedy with stop strings
    "max_tokens_1": 0.08,   # one token: prefill only, the drafter never verifies
    "long_prompt": 0.08,    # prompt + max_tokens == max_model_len: drafting is cut near the end
    "sampled": 0.12,        # T in [0.5, 1.2], seeded, top_p sometimes
    "n_best": 0.08,         # n = 2..3, T > 0, seeded
    "abort": 0.14,          # streamed, the client closes the stream after 1-3 chunks
}
STOP_STRINGS = (".", " the", "e", ",", "\n", "s ")
# A prefix many prompts share: with prefix caching on, later requests hit the cache mid-run.
SHARED_PREFIX = "You are a helpful assistant. Answer briefly and clearly, in plain words. "


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    errors: int = 0
    aborted: int = 0
    compared: int = 0
    mismatches: int = 0
    latencies: list[float] = field(default_factory=list)


# ----------------------------------------------------------------------------- planning
def plan_jobs(n: int, rng: random.Random, prompts: list[list[int]], texts: list[str], tokens_pool: list[int],
              max_model_len: int, max_tokens: int, has_chat: bool, seed: int) -> list[Job]:
    """``n`` jobs of the kinds in :data:`KINDS` (chat dropped when the target has no chat template)."""
    kinds = {k: w for k, w in KINDS.items() if has_chat or k != "chat"}
    names, weights = list(kinds), list(kinds.values())
    jobs = []
    for i in range(n):
        kind = rng.choices(names, weights)[0]
        mt = rng.randint(max(1, max_tokens // 4), max_tokens)
        job = Job(i, kind, prompt=rng.choice(prompts), max_tokens=mt)
        if kind == "greedy_stream":
            job.stream = True
        elif kind == "chat":
            job.prompt = None
            job.messages = [{"role": "user", "content": rng.choice(texts)}]
            job.stream = rng.random() < 0.5
        elif kind == "stop":
            job.stop = rng.sample(STOP_STRINGS, k=rng.randint(1, 2))
            job.stream = rng.random() < 0.3
        elif kind == "max_tokens_1":
            job.max_tokens = 1
            job.stream = rng.random() < 0.3
        elif kind == "long_prompt":
            job.max_tokens = min(mt, max(1, max_model_len // 8))
            length = max_model_len - job.max_tokens - rng.randint(0, 2)
            start = rng.randrange(len(tokens_pool))
            job.prompt = [tokens_pool[(start + j) % len(tokens_pool)] for j in range(length)]
        elif kind in ("sampled", "n_best", "abort"):
            job.temperature = round(rng.uniform(0.5, 1.2), 2)
            job.top_p = rng.choice((1.0, 1.0, 0.9))
            job.seed = seed * 1_000_003 + i
            if kind == "n_best":
                job.n = rng.randint(2, 3)
            if kind == "abort":
                job.stream = True
                job.max_tokens = max(max_tokens, 8)
                job.abort_after = rng.randint(1, 3)
                if rng.random() < 0.4:  # a greedy stream cut short: its state must be freed as well
                    job.temperature, job.seed = 0.0, None
        jobs.append(job)
    return jobs


def build_prompts(target: str, max_model_len: int,
                  max_tokens: int) -> tuple[list[list[int]], list[str], list[int], bool]:
    """Token-id prompts (MT-Bench turns, some behind a shared prefix), their texts, a long token pool for
    near-``max_model_len`` prompts, and whether the tokenizer has a chat template."""
    from transformers import AutoTokenizer

    from vllm_dspark.eval.prompts import load_prompts

    tok = AutoTokenizer.from_pretrained(target)
    texts = [p.turns[0] for p in load_prompts("mtbench")]
    limit = max(8, max_model_len - max_tokens - 1)
    prompts = []
    for i, text in enumerate(texts):
        full = (SHARED_PREFIX + text) if i % 2 else text
        prompts.append(tok(full, add_special_tokens=True, verbose=False)["input_ids"][:limit])
    pool = tok(" ".join(texts), add_special_tokens=False, verbose=False)["input_ids"]
    short = [t for t, p in zip(texts, prompts) if len(p) < limit // 2]  # chat templates add tokens
    return prompts, short or texts[:1], pool, bool(getattr(tok, "chat_template", None))


# ----------------------------------------------------------------------------- report
def summarize(jobs: list[Job], results: list[Result]) -> dict[str, Tally]:
    tallies: dict[str, Tally] = {}
    for job, res in zip(jobs, results):
        t = tallies.setdefault(job.kind, Tally())
        t.sent += 1
        t.ok += res.ok
        t.errors += res.error is not None
        t.aborted += res.aborted
        t.compared += job.compared and res.ok
        t.mismatches += res.mismatch is not None
        t.latencies.append(res.latency_s)
    return dict(sorted(tallies.items()))


def format_table(report: dict) -> str:
    rows = [f"{'kind':<14}{'sent':>6}{'ok':>6}{'errors':>8}{'aborted':>9}{'compared':>10}{'mismatch':>10}"
            f"{'p50 s':>8}{'max s':>8}"]
    for kind, t in report["per_kind"].items():
        rows.append(f"{kind:<14}{t['sent']:>6}{t['ok']:>6}{t['errors']:>8}{t['aborted']:>9}{t['compared']:>10}"
                    f"{t['mismatches']:>10}{t['latency_p50_s']:>8.2f}{t['latency_max_s']:>8.2f}")
    fmt = lambda v: "n/a" if v is None else v  # noqa: E731
    rows += [
        "",
        f"requests {report['requests']}  errors {report['errors']}  greedy mismatches {report['greedy_mismatches']}"
        f" / {report['greedy_compared']}  aborted {report['aborted']}",
        f"duration {report['duration_s']:.1f} s  ({report['requests'] / max(report['duration_s'], 1e-9):.2f} req/s)"
        f"  generated tokens {report['generated_tokens']}",
        f"RSS DSpark server {fmt(report['rss_start_mb'])} -> {fmt(report['rss_end_mb'])} MB (peak "
        f"{fmt(report['rss_peak_mb'])}), growth over 2nd half {fmt(report['rss_growth_mb'])} MB; reference server "
        f"growth {fmt(report['reference_rss_growth_mb'])} MB",
        f"connection retries {report.get('connection_retries') or 0}  "
        f"leaked drafter states {fmt(report['leaked_states'])}  preemptions {fmt(report['server']['preemptions'])}"
        f"  drafts {fmt(report['server']['spec_decode_num_drafts'])}  acceptance "
        f"{fmt(report['server']['acceptance_rate'])}  drafter faults {fmt(report['server']['drafter_faults'])}",
    ]
    return "\n".join(rows)


# ----------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vllm-dspark soak", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--target", required=True, help="target HF folder")
    ap.add_argument("--drafter", required=True, help="DSpark drafter directory")
    ap.add_argument("--requests", type=int, required=True, help="requests in the main run")
    ap.add_argument("--out", required=True, help="output directory (report.json, server logs)")
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight at most")
    ap.add_argument("--max-model-len", type=int, default=512, help="vLLM's max_model_len of both servers")
    ap.add_argument("--max-tokens", type=int, default=64, help="largest max_tokens of a request")
    ap.add_argument("--kv-cache-gib", type=float, default=1.0, help="VLLM_CPU_KVCACHE_SPACE of each server")
    ap.add_argument("--num-gpu-blocks", type=int, help="KV blocks of the DSpark server (small: forces preemption)")
    ap.add_argument("--block-size", type=int, help="KV block size of both servers (vLLM's default when unset)")
    ap.add_argument("-k", "--num-speculative-tokens", dest="k", type=int, metavar="K",
                    help="speculative tokens (default: the drafter's trained block)")
    ap.add_argument("--prefix-cache-mb", type=int, default=None,
                    help="the DSpark server's drafter prefix cache (default 256 MB; it fills as distinct prompts "
                         "arrive, so a smaller one shows the RSS plateau in a shorter run)")
    ap.add_argument("--onednn-cache-capacity", type=int, default=64,
                    help="ONEDNN_PRIMITIVE_CACHE_CAPACITY of both servers (a bounded cache that otherwise fills "
                         "for ~1 h and looks like growth; 0: oneDNN's default, 1024)")
    ap.add_argument("--dtype", default="float32", help="target dtype of both servers")
    ap.add_argument("--seed", type=int, default=0, help="the traffic's random choices and the servers' seed")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    ap.add_argument("--startup-timeout", type=float, default=600.0, help="seconds for both servers to be healthy")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        raise SystemExit("--requests and --concurrency must be positive")
    if args.onednn_cache_capacity < 0:
        raise SystemExit(f"--onednn-cache-capacity {args.onednn_cache_capacity}: expected >= 0 "
                         "(0: oneDNN's default)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    prompts, texts, pool, has_chat = build_prompts(args.target, args.max_model_len, args.max_tokens)
    jobs = plan_jobs(args.requests, rng, prompts, texts, pool, args.max_model_len, args.max_tokens, has_chat,
                     args.seed)
    # The drain batch: short greedy requests after the main run, then a few one at a time, so finished
    # requests are reported to the runner (it frees drafter state on the step after a request finishes).
    drain = [Job(args.requests + i, "greedy", prompt=prompts[i % len(prompts)], max_tokens=4)
             for i in range(args.concurrency + 3)]

    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=f"{args.kv_cache_gib:g}")
    if args.onednn_cache_capacity:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(args.onednn_cache_capacity)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # real servers: vLLM's default engine-core process
    servers: list[Server] = []
    sampler = None
    try:
        dspark = Server("dspark", server_command(args, port := free_port(), args.drafter), port,
                        out / "dspark-server.log", env)
        servers.append(dspark)
        base = Server("reference", server_command(args, port := free_port(), None), port,
                      out / "reference-server.log", env)
        servers.append(base)
        t_start = time.monotonic()
        for s in servers:
            s.wait_healthy(max(1.0, args.startup_timeout - (time.monotonic() - t_start)))
        startup_s = time.monotonic() - t_start

        sampler = RssSampler({"dspark": dspark.proc.pid, "reference": base.proc.pid})
        sampler.start()
        t0 = time.monotonic()
        retries: dict[str, int] = {}
        results = asyncio.run(run_traffic(jobs, dspark.url, base.url, args.concurrency, args.timeout,
                                          not args.no_progress, retries))
        t1 = time.monotonic()
        drain_results = asyncio.run(run_traffic(drain[: args.concurrency], dspark.url, base.url, args.concurrency,
                                                args.timeout, False, retries))
        drain_results += asyncio.run(run_traffic(drain[args.concurrency:], dspark.url, base.url, 1, args.timeout,
                                                 False, retries))
        time.sleep(2.0)  # the proposer publishes its snapshot at most every 0.5 s
        metrics = dspark.metrics()
        sampler.stop()

        tallies = summarize(jobs, results)
        active = metric_value(metrics, "vllm_dspark:active_requests")
        rss = [r for _, r in sampler.samples["dspark"] if r]
        all_results = results + drain_results
        report = {
            "requests": len(jobs),
            "errors": sum(r.error is not None for r in all_results),
            "greedy_mismatches": sum(r.mismatch is not None for r in all_results),
            "greedy_compared": sum(t.compared for t in tallies.values()),
            "aborted": sum(r.aborted for r in results),
            "connection_retries": retries,  # per server: requests re-sent once after a connection error
            "leaked_states": None if active is None else int(active),
            "leaked_states_note": (
                "vllm_dspark:active_requests after the run and a drain batch (0 = no leak)" if active is not None
                else "the DSpark server exports no vllm_dspark:active_requests metric: leak not measured"),
            "rss_growth_mb": rss_growth_mb(sampler.samples["dspark"], t0, t1),
            "reference_rss_growth_mb": rss_growth_mb(sampler.samples["reference"], t0, t1),
            "rss_start_mb": round(rss[0] / 2**20, 1) if rss else None,
            "rss_end_mb": round(rss[-1] / 2**20, 1) if rss else None,
            "rss_peak_mb": round(max(rss) / 2**20, 1) if rss else None,
            "onednn_primitive_cache_capacity": env.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "default (1024)"),
            "duration_s": round(t1 - t0, 2),
            "startup_s": round(startup_s, 1),
            "generated_tokens": sum(r.tokens for r in results),
            "per_kind": {k: {"sent": t.sent, "ok": t.ok, "errors": t.errors, "aborted": t.aborted,
                             "compared": t.compared, "mismatches": t.mismatches,
                             "latency_p50_s": round(statistics.median(t.latencies), 3),
                             "latency_max_s": round(max(t.latencies), 3)} for k, t in tallies.items()},
            "server": _server_counters(metrics),
            "error_samples": [{"index": r.index, "kind": r.kind, "error": r.error}
                              for r in all_results if r.error][:20],
            "mismatch_samples": [r.mismatch for r in all_results if r.mismatch][:10],
            "rss_samples_mb": {name: [(round(t - t0, 1), round(r / 2**20, 1)) for t, r in s]
                               for name, s in sampler.samples.items()},
            "args": {k: v for k, v in vars(args).items()},
            "jobs": [asdict(j) | {"prompt_len": len(j.prompt) if j.prompt else None, "prompt": None}
                     for j in jobs],
        }
    finally:
        if sampler is not None:
            sampler.stop()
        for s in servers:
            s.stop()
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    print(f"report: {out / 'report.json'}")
    return 0 if report["errors"] == 0 and report["greedy_mismatches"] == 0 else 1
