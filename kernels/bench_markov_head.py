"""Benchmark the fused Markov head (``markov_head``) against its eager torch reference.

GPU (default): B=256, r=256, g=7, bf16, V in {152064, 49152}; dense sampling with q, dense greedy without q,
and top-k. For each case: correctness against the reference, time per block (CUDA events, warmup, median),
achieved bandwidth over the minimal bytes moved, % of the HBM roofline (H200: 4.8 TB/s; --peak-gbs), and the
speedup over the eager reference.

    python -m vllm_dspark_kernels.bench_markov_head [--sync step|grid] [--peak-gbs 4800]
    python -m vllm_dspark_kernels.bench_markov_head --cpu     # the torch reference on CPU (our CPU drafter)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from vllm_dspark_kernels import markov_head, markov_head_reference

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Case:
    name: str
    topk: int
    temperature: float  # 0 = greedy
    return_q: bool


CASES = [
    Case("dense  T=1  q", 0, 1.0, True),
    Case("dense  greedy", 0, 0.0, False),
    Case("top-k  T=1  q", 64, 1.0, True),
]


def make_inputs(B, g, V, r, dtype, device, temperature, seed=0):
    """Random head inputs (positional, in markov_head's order), generated on ``device``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    base = (torch.randn(B, g, V, generator=gen, device=device) * 3).to(dtype)  # [B, g, V]
    w1 = (torch.randn(V, r, generator=gen, device=device) * 0.5).to(dtype)  # [V, r]
    w2 = (torch.randn(V, r, generator=gen, device=device) * 0.1).to(dtype)  # [V, r]
    anchor = torch.randint(0, V, (B,), generator=gen, device=device)  # [B]
    temp = torch.full((B,), temperature, dtype=torch.float32, device=device)  # [B]
    seeds = torch.randint(0, 2**62, (B,), generator=gen, device=device)  # [B]
    return base, w1, w2, anchor, temp, seeds


def min_bytes(B, g, V, r, elt, case: Case) -> int:
    """Bytes a perfect implementation must move: every input read once, w2 once per step, outputs once."""
    tokens = B * g * 8
    w1_rows = B * g * r * elt
    base = B * g * V * elt  # top-k reads all base logits too, to find the candidates
    if case.topk:
        k = case.topk
        return base + w1_rows + B * g * k * r * elt + (B * g * k * (4 + 8) if case.return_q else 0) + tokens
    return base + w1_rows + g * V * r * elt + (B * g * V * 4 if case.return_q else 0) + tokens


def time_cuda(fn, warmup, iters) -> float:
    """Median milliseconds per call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_cpu(fn, warmup, iters) -> tuple[float, float]:
    """(min, median) milliseconds per call; the min is the better estimate on a shared machine."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times), statistics.median(times)


def check(out, ref, case: Case) -> str:
    agree = (out.tokens == ref.tokens).float().mean().item()
    msg = f"tokens agree {agree:6.1%}"
    q, q_ref = (out.q_probs, ref.q_probs) if case.topk else (out.q, ref.q)
    if q is not None:
        msg += f", max|q - q_ref| {(q - q_ref).abs().max().item():.1e}"
    return msg


def run_gpu(args) -> int:
    if not torch.cuda.is_available():
        print("bench_markov_head: no CUDA device here. The GPU benchmark needs one; "
              "run with --cpu to time the torch reference on this machine.", file=sys.stderr)
        return 2
    from vllm_dspark_kernels.markov_head_triton import markov_head_triton  # imports triton

    dev = torch.device("cuda")
    dtype = _DTYPES[args.dtype]
    elt = torch.finfo(dtype).bits // 8
    syncs = ["step", "grid"] if args.sync == "both" else [args.sync]
    print(f"{torch.cuda.get_device_name(dev)}: B={args.batch} g={args.gamma} r={args.rank} {args.dtype}, "
          f"peak {args.peak_gbs:.0f} GB/s, median of {args.iters}. Dense sync: step = g+1 launches, "
          "grid = one launch with a grid barrier (if a grid run hangs, rerun with --sync step)")
    print(f"{'V':>7} {'case':<15} {'sync':<5} {'kernel ms':>9} {'GB/s':>7} {'% peak':>7} {'roofline ms':>11} "
          f"{'eager ms':>9} {'speedup':>7}  check")
    for V in args.vocab:
        for case in CASES:
            inputs = make_inputs(args.batch, args.gamma, V, args.rank, dtype, dev, case.temperature)
            kw = dict(topk=case.topk, return_q=case.return_q)
            eager = lambda: markov_head_reference(*inputs, **kw)  # noqa: E731
            ref = eager()
            ms_eager = time_cuda(eager, max(1, args.warmup // 4), max(3, args.iters // 4))
            nbytes = min_bytes(args.batch, args.gamma, V, args.rank, elt, case)
            for sync in (syncs if not case.topk else ["-"]):
                kern = lambda: markov_head_triton(*inputs, **kw, sync=None if sync == "-" else sync)  # noqa: E731
                status = check(kern(), ref, case)
                ms = time_cuda(kern, args.warmup, args.iters)
                gbs = nbytes / ms / 1e6
                print(f"{V:>7} {case.name:<15} {sync:<5} {ms:9.3f} {gbs:7.0f} {gbs / args.peak_gbs:7.1%} "
                      f"{nbytes / args.peak_gbs / 1e6:11.3f} {ms_eager:9.3f} {ms_eager / ms:6.1f}x  {status}",
                      flush=True)
            del inputs, ref
            torch.cuda.empty_cache()
    return 0


def run_cpu(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    B, g, r, V = args.cpu_batch, args.gamma, args.rank, args.cpu_vocab
    print(f"torch reference on CPU ({torch.get_num_threads()} threads): B={B} g={g} r={r} V={V}, "
          f"{args.cpu_iters} runs")
    print(f"{'dtype':<5} {'case':<18} {'min ms':>8} {'median ms':>9}")
    for dtype_name in ("fp32", "bf16"):
        for case in (Case("dense  T=1  q", 0, 1.0, True), Case("dense  T=1", 0, 1.0, False),
                     Case("dense  greedy", 0, 0.0, False), Case(f"top-{args.topk} T=1  q", args.topk, 1.0, True),
                     Case(f"top-{args.topk} greedy", args.topk, 0.0, False)):
            inputs = make_inputs(B, g, V, r, _DTYPES[dtype_name], "cpu", case.temperature)
            best, median = time_cpu(
                lambda: markov_head(*inputs, topk=case.topk, return_q=case.return_q, impl="torch"), 1, args.cpu_iters)
            print(f"{dtype_name:<5} {case.name:<18} {best:8.1f} {median:9.1f}", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="time the torch reference on CPU instead")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rank", type=int, default=256)
    p.add_argument("--gamma", type=int, default=7)
    p.add_argument("--vocab", type=int, nargs="+", default=[152064, 49152])
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--sync", choices=["step", "grid", "both"], default="both",
                   help="dense kernel: g+1 launches (step), one launch with a grid barrier (grid), or both")
    p.add_argument("--peak-gbs", type=float, default=4800.0, help="HBM bandwidth roofline in GB/s (H200: 4800)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--cpu-batch", type=int, default=16)
    p.add_argument("--cpu-vocab", type=int, default=49152)
    p.add_argument("--cpu-iters", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="--cpu: torch threads (0 = torch's default)")
    args = p.parse_args(argv)
    for case in CASES:
        if case.topk:
            case.topk = args.topk
    return run_cpu(args) if args.cpu else run_gpu(args)


if __name__ == "__main__":
    sys.exit(main())
