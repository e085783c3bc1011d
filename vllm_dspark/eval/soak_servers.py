"""The soak's two servers and the traffic sent to them: ``vllm-dspark serve`` processes, their ``/metrics`` and
RSS, one request (:class:`Job`) and its outcome (:class:`Result`), and the openai client side that sends each
job, retried once after a dropped connection, to the DSpark server and, for greedy kinds, the reference.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_NAME = "soak"
HOST = "127.0.0.1"
# Kinds (soak.KINDS) also sent to the reference server and compared: greedy, so their output must match.
GREEDY_KINDS = ("greedy", "greedy_stream", "chat", "stop", "max_tokens_1", "long_prompt")


@dataclass
class Job:
    """One planned request (everything random is drawn up front, from ``--seed``)."""

    index: int
    kind: str
    prompt: list[int] | None = None  # completion prompt as token ids (exact lengths, no re-tokenisation)
    messages: list[dict] | None = None  # chat
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stop: list[str] | None = None
    abort_after: int | None = None  # chunks read before the client closes the stream

    @property
    def compared(self) -> bool:
        return self.kind in GREEDY_KINDS


@dataclass
class Result:
    index: int
    kind: str
    ok: bool = False
    aborted: bool = False
    error: str | None = None
    latency_s: float = 0.0
    tokens: int = 0
    mismatch: dict | None = None


# ----------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def server_command(args: argparse.Namespace, port: int, drafter: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "vllm_dspark.cli", "serve", args.target, "--host", HOST, "--port", str(port),
           "--served-model-name", MODEL_NAME, "--dtype", args.dtype, "--enforce-eager",
           "--max-model-len", str(args.max_model_len), "--seed", str(args.seed), "--disable-uvicorn-access-log"]
    if args.block_size:
        cmd += ["--block-size", str(args.block_size)]
    if drafter is not None:
        cmd += ["--drafter", drafter]
        if args.k is not None:
            cmd += ["-k", str(args.k)]
        if args.num_gpu_blocks:
            cmd += ["--num-gpu-blocks-override", str(args.num_gpu_blocks)]
        if args.prefix_cache_mb is not None:
            cmd += ["--additional-config", json.dumps({"dspark": {"prefix_cache_mb": args.prefix_cache_mb}})]
    return cmd


class Server:
    """A ``vllm-dspark serve`` child in its own process group, logging to a file."""

    def __init__(self, name: str, cmd: list[str], port: int, log: Path, env: dict[str, str]):
        self.name, self.port, self.log = name, port, log
        self.url = f"http://{HOST}:{port}"
        with log.open("w") as f:
            self.proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited with {self.proc.returncode} during startup; "
                                   f"log {self.log}:\n{self.log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1)
        raise RuntimeError(f"{self.name} server not healthy after {timeout:.0f} s; log {self.log}:\n"
                           f"{self.log.read_text()[-4000:]}")

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:
            return response.read().decode()

    def stop(self) -> None:
        """SIGTERM the process group (API server, engine core), then SIGKILL whatever is left."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


def metric_value(text: str, name: str) -> float | None:
    """Sum of the samples of one Prometheus metric (all label sets); None when absent."""
    values = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key = line.split("{", 1)[0].split(" ", 1)[0]
        if key == name:
            try:
                values.append(float(line.rsplit(" ", 1)[-1]))
            except ValueError:
                pass
    return sum(values) if values else None


def _server_counters(text: str) -> dict[str, Any]:
    drafts = metric_value(text, "vllm:spec_decode_num_draft_tokens_total")
    accepted = metric_value(text, "vllm:spec_decode_num_accepted_tokens_total")
    return {
        "preemptions": metric_value(text, "vllm:num_preemptions_total"),
        "requests_running": metric_value(text, "vllm:num_requests_running"),
        "requests_waiting": metric_value(text, "vllm:num_requests_waiting"),
        "spec_decode_num_drafts": metric_value(text, "vllm:spec_decode_num_drafts_total"),
        "acceptance_rate": round(accepted / drafts, 3) if drafts and accepted is not None else None,
        "drafter_faults": metric_value(text, "vllm_dspark:drafter_faults_total"),
        "skipped_no_context": metric_value(text, "vllm_dspark:skipped_no_context_total"),
        "prefix_cache_hits": metric_value(text, "vllm:prefix_cache_hits_total"),
    }


# ----------------------------------------------------------------------------- memory
def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (psutil when installed, else /proc)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo, page = 0, [pid], os.sysconf("SC_PAGE_SIZE")
    while todo:
        p = todo.pop()
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            pass
        todo += children.get(p, [])
    return total


class RssSampler(threading.Thread):
    """Samples (time, rss bytes) of each server tree every ``interval`` seconds until stopped."""

    def __init__(self, pids: dict[str, int], interval: float = 1.0):
        super().__init__(daemon=True)
        self.pids, self.interval = pids, interval
        self.samples: dict[str, list[tuple[float, int]]] = {name: [] for name in pids}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            now = time.monotonic()
            for name, pid in self.pids.items():
                self.samples[name].append((now, tree_rss_bytes(pid)))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


def rss_growth_mb(samples: list[tuple[float, int]], t0: float, t1: float) -> float | None:
    """RSS growth over the second half of [t0, t1]: median of its last tenth minus median of its first tenth
    (medians, so one sample taken mid-allocation does not decide)."""
    half = [(t, r) for t, r in samples if (t0 + t1) / 2 <= t <= t1]
    if len(half) < 2:
        return None
    tenth = max(1, len(half) // 10)
    first = statistics.median(r for _, r in half[:tenth])
    last = statistics.median(r for _, r in half[-tenth:])
    return round((last - first) / 2**20, 1)


# ----------------------------------------------------------------------------- traffic
def _field(obj: Any, name: str) -> Any:
    """A vLLM extension field of an openai response object (kept in pydantic's extras)."""
    value = getattr(obj, name, None)
    if value is None and getattr(obj, "model_extra", None):
        value = obj.model_extra.get(name)
    return value


async def run_job(client, job: Job) -> tuple[list[str], list[list[int] | None]]:
    """Send one job; returns the text and token ids of each choice (aborted streams: what was read)."""
    extra = {"return_token_ids": True}
    common = dict(model=MODEL_NAME, max_tokens=job.max_tokens, temperature=job.temperature, top_p=job.top_p,
                  n=job.n, stream=job.stream, extra_body=extra)
    if job.seed is not None:
        common["seed"] = job.seed
    if job.stop:
        common["stop"] = job.stop
    if job.messages is not None:
        response = await client.chat.completions.create(messages=job.messages, **common)
    else:
        response = await client.completions.create(prompt=job.prompt, **common)
    texts, ids = [""] * job.n, [[] for _ in range(job.n)]
    if not job.stream:
        for c in response.choices:
            texts[c.index] = (c.message.content or "") if job.messages is not None else c.text
            ids[c.index] = _field(c, "token_ids")
        return texts, ids
    chunks = 0
    try:
        async for chunk in response:
            for c in chunk.choices:
                piece = (c.delta.content or "") if job.messages is not None else c.text
                texts[c.index] += piece or ""
                delta_ids = _field(c, "token_ids")
                if delta_ids is None:
                    ids[c.index] = None
                elif ids[c.index] is not None:
                    ids[c.index] += list(delta_ids)
            chunks += 1
            if job.abort_after is not None and chunks >= job.abort_after:
                break
    finally:
        await response.close()
    if job.abort_after is not None and chunks >= job.abort_after:
        raise _Aborted
    return texts, ids


class _Aborted(Exception):
    """The client closed the stream on purpose."""


def _describe(e: BaseException) -> str:
    status = getattr(e, "status_code", None)
    head = f"HTTP {status}" if status is not None else type(e).__name__
    cause = e.__cause__ or e.__context__
    why = f" ({type(cause).__name__}: {str(cause)[:200]})" if cause is not None and not status else ""
    return f"{head}: {str(e)[:300]}{why}"


class _ServerFailed(Exception):
    """A request to one of the two servers failed; ``server`` names it."""

    def __init__(self, server: str, error: BaseException):
        super().__init__(f"{server} server: {_describe(error)}")
        self.server = server


async def _send(client, server: str, job: Job, retries: dict[str, int]) -> tuple[list[str], list[list[int] | None]]:
    """run_job, once more if no connection could be made or the server closed an idle pooled connection
    before answering (any HTTP client retries that; counted in ``retries``); other errors name the server."""
    import openai

    for attempt in range(2):
        try:
            return await run_job(client, job)
        except _Aborted:
            raise
        except openai.APIConnectionError as e:
            if attempt == 0 and not isinstance(e, openai.APITimeoutError):
                retries[server] = retries.get(server, 0) + 1
                continue
            raise _ServerFailed(server, e) from e
        except Exception as e:  # noqa: BLE001 - reported with the server's name
            raise _ServerFailed(server, e) from e
    raise AssertionError("unreachable")


async def run_traffic(jobs: list[Job], dspark_url: str, base_url: str, concurrency: int, timeout: float,
                      progress: bool, retries: dict[str, int] | None = None) -> list[Result]:
    import openai
    from tqdm import tqdm

    spec = openai.AsyncOpenAI(base_url=dspark_url + "/v1", api_key="unused", timeout=timeout, max_retries=0)
    base = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", timeout=timeout, max_retries=0)
    gate = asyncio.Semaphore(concurrency)
    retries = {} if retries is None else retries
    bar = tqdm(total=len(jobs), desc="soak", unit="req", disable=not progress, dynamic_ncols=True)

    async def one(job: Job) -> Result:
        res = Result(job.index, job.kind)
        async with gate:
            t0 = time.perf_counter()
            try:
                if job.compared:
                    (got_t, got_i), (want_t, want_i) = await asyncio.gather(
                        _send(spec, "dspark", job, retries), _send(base, "reference", job, retries))
                    same_ids = got_i[0] is None or want_i[0] is None or got_i[0] == want_i[0]
                    if not (same_ids and got_t[0] == want_t[0]):
                        res.mismatch = {"index": job.index, "kind": job.kind, "dspark_ids": got_i[0],
                                        "reference_ids": want_i[0], "dspark_text": got_t[0][:200],
                                        "reference_text": want_t[0][:200]}
                else:
                    got_t, got_i = await _send(spec, "dspark", job, retries)
                res.tokens = sum(len(i or []) for i in got_i)
                res.ok = True
            except _Aborted:
                res.aborted = True
            except _ServerFailed as e:  # every failure is a finding: count it and go on
                res.error = str(e)
            except Exception as e:  # noqa: BLE001
                res.error = _describe(e)
            res.latency_s = time.perf_counter() - t0
        bar.update(1)
        return res

    try:
        return list(await asyncio.gather(*(one(j) for j in jobs)))
    finally:
        bar.close()
        await spec.close()
        await base.close()
