"""``vllm_dspark:`` metrics on the server's ``/metrics`` and offline.

The proposer lives in vLLM's engine/worker process; ``/metrics`` is served by the API-server process. The
proposer therefore publishes a small JSON snapshot of its counters (at most every ``PUBLISH_INTERVAL_S``)
into a per-deployment directory, and a Prometheus collector registered by the plugin in every process
(``register()`` -> :func:`install`) reads the snapshots when scraped. The directory is created by the first
process that registers and handed to vLLM's child processes through ``VLLM_DSPARK_METRICS_DIR``.
Offline, :func:`read_metrics` returns the same numbers as a dict (``llm.get_metrics()`` keeps only ``vllm:``).

Exported (K = draft positions):
- ``vllm_dspark:drafted_tokens_total{position}`` / ``vllm_dspark:accepted_tokens_total{position}``: verified and
  accepted drafts per position (1-based); ``vllm_dspark:acceptance_conditional{position}``: P(k accepted |
  k-1 accepted); ``vllm_dspark:rounds_total``: verification rounds.
- ``vllm_dspark:source_drafted_tokens_total{source,position}`` / ``source_accepted_tokens_total{source,position}``:
  the same per source of the tokens (``drafter``, ``suffix``: copied); ``vllm_dspark:source_rounds_total{source}``:
  rounds by where their drafts came from (``drafter``, ``suffix``, ``splice``).
- ``vllm_dspark:block_length_total{length}``: how often each draft length was chosen (adaptive mode).
- ``vllm_dspark:draft_seconds_total``, ``vllm_dspark:draft_steps_total``, ``vllm_dspark:drafter_ms_per_step``:
  drafter time (context update + drafting).
- ``vllm_dspark:active_requests``: requests holding drafter context (returns to 0 when traffic stops).
- ``vllm_dspark:drafter_faults_total``, ``vllm_dspark:skipped_no_context_total``.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("vllm_dspark")


@dataclass
class ProposerStats:
    """Counters the metrics layer reads (nothing is printed in the step path)."""

    steps: int = 0
    drafted_requests: int = 0
    draft_seconds: float = 0.0
    ingest_seconds: float = 0.0
    skipped_gap: int = 0
    faults: int = 0
    length_hist: dict[int, int] = field(default_factory=dict)
    # Verification outcomes, from the sampled counts vLLM hands back (our own accounting; agrees with vLLM's
    # spec-decode counters): rounds, and per draft position k (0-based) how often it was verified/accepted.
    num_rounds: int = 0
    drafted_at: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)
    # With ``record``: one (req_id, drafted, accepted, confidences of the verified positions, kind) per round, in
    # verification order (req_id = vLLM's engine-internal request id, as in ``records``; confidences only for
    # the drafter's own rounds, kind "drafter").
    round_log: list[tuple[str, int, int, list[float], str]] = field(default_factory=list)
    # Per source of the draft tokens ("drafter", "suffix": copied), per position k: verified / accepted; and
    # rounds per kind ("drafter", "suffix", "splice": copied tokens then the drafter's). All rounds count in
    # num_rounds/drafted_at/accepted_at too (they agree with vLLM's counters).
    source_drafted: dict[str, list[int]] = field(default_factory=dict)
    source_accepted: dict[str, list[int]] = field(default_factory=dict)
    kind_rounds: dict[str, int] = field(default_factory=dict)

    GAP_LOG_REQUESTS = 3  # requests whose missing context is logged (then only counted)
    _gap_logged: set[str] = field(default_factory=set)  # at most GAP_LOG_REQUESTS ids

    def skip(self, req_id: str, have: int, want: int, why: str) -> None:
        """A request without a complete drafter context does not draft this step (output is unaffected);
        counted (``vllm_dspark:skipped_no_context_total``), and the first few requests are logged with why."""
        self.skipped_gap += 1
        if req_id in self._gap_logged or len(self._gap_logged) >= self.GAP_LOG_REQUESTS:
            return
        self._gap_logged.add(req_id)
        logger.info("vllm-dspark: request %s does not draft: its drafter context has %d rows, %d expected (%s)",
                    req_id, have, want, why)

    def fault(self, where: str) -> None:
        """A step falls back to no speculation: one warning with the traceback, then a counter (``faults``,
        exported as ``vllm_dspark:drafter_faults``)."""
        self.faults += 1
        if self.faults == 1:
            logger.warning("vllm-dspark: the drafter failed during %s; this step runs without speculation "
                           "(output is unaffected). Later faults are only counted.", where, exc_info=True)

    @property
    def rounds(self) -> list[tuple[int, int, list[float]]]:
        """``round_log`` without the request ids: (drafted, accepted, confidences, kind) per round."""
        return [entry[1:] for entry in self.round_log]

    def observe_round(self, req_id: str, drafted: int, accepted: int, confidence: list[float] | None,
                      keep: bool, kind: str = "drafter", copied: int = 0) -> None:
        """One verified round: ``drafted`` drafts, the first ``accepted`` accepted, the first ``copied`` of them
        copied (suffix drafts), the rest the drafter's."""
        self.kind_rounds[kind] = self.kind_rounds.get(kind, 0) + 1
        for k in range(drafted):
            source = "suffix" if k < copied else "drafter"
            d, a = self.source_drafted.setdefault(source, []), self.source_accepted.setdefault(source, [])
            while len(d) <= k:
                d.append(0)
                a.append(0)
            d[k] += 1
            a[k] += k < accepted
        while len(self.drafted_at) < drafted:
            self.drafted_at.append(0)
            self.accepted_at.append(0)
        self.num_rounds += 1
        for k in range(drafted):
            self.drafted_at[k] += 1
            self.accepted_at[k] += k < accepted
        if keep:
            conf = list(confidence or [])[:drafted] if kind == "drafter" else []
            self.round_log.append((req_id, drafted, accepted, conf, kind))


METRICS_DIR_ENV = "VLLM_DSPARK_METRICS_DIR"
PUBLISH_INTERVAL_S = 0.5
_INSTALLED = False


def metrics_dir() -> Path:
    """This deployment's snapshot directory (created, and exported to child processes, on first use)."""
    path = os.environ.get(METRICS_DIR_ENV)
    if not path:
        path = tempfile.mkdtemp(prefix="vllm-dspark-metrics-")
        os.environ[METRICS_DIR_ENV] = path
        atexit.register(shutil.rmtree, path, True)
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


def snapshot(proposer: Any) -> dict[str, Any]:
    s = proposer.stats
    return {
        "pid": os.getpid(), "time": time.time(), "rounds": s.num_rounds, "drafted_at": list(s.drafted_at),
        "accepted_at": list(s.accepted_at), "length_hist": {str(k): v for k, v in s.length_hist.items()},
        "draft_seconds": s.draft_seconds + s.ingest_seconds, "steps": s.steps, "faults": s.faults,
        "skipped_no_context": s.skipped_gap, "active_requests": proposer.num_active_requests,
        "source_drafted": s.source_drafted, "source_accepted": s.source_accepted, "kind_rounds": s.kind_rounds,
    }


def publish(proposer: Any, force: bool = False) -> None:
    """Write this process's snapshot (atomic rename), at most every PUBLISH_INTERVAL_S unless forced."""
    now = time.monotonic()
    if not force and now - getattr(proposer, "_metrics_published", 0.0) < PUBLISH_INTERVAL_S:
        return
    proposer._metrics_published = now
    directory = metrics_dir()
    tmp = directory / f".{os.getpid()}.json.tmp"
    tmp.write_text(json.dumps(snapshot(proposer)))
    tmp.replace(directory / f"{os.getpid()}.json")


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # field 4, after the parenthesised command name


def _ours(pid: int) -> bool:
    """A snapshot counts for this process if its writer is this process or one of its descendants: the
    directory is inherited by every deployment started below the one that created it (a test session that
    starts servers, say), and each /metrics must report its own engine only. Without /proc: if alive."""
    me = os.getpid()
    if not Path("/proc/self/stat").exists():
        try:
            os.kill(pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    while pid and pid > 1:
        if pid == me:
            return True
        pid = _parent(pid)
    return False


def read_metrics(directory: str | Path | None = None) -> dict[str, Any]:
    """Sum of the snapshots written by this process and its descendants (one proposer per engine)."""
    directory = Path(directory or os.environ.get(METRICS_DIR_ENV) or "")
    total: dict[str, Any] = {"rounds": 0, "drafted_at": [], "accepted_at": [], "length_hist": {},
                             "draft_seconds": 0.0, "steps": 0, "faults": 0, "skipped_no_context": 0,
                             "active_requests": 0, "source_drafted": {}, "source_accepted": {}, "kind_rounds": {}}
    if not directory.is_dir():
        return total
    for file in directory.glob("*.json"):
        try:
            snap = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not _ours(int(snap.get("pid", -1))):
            continue
        for key in ("rounds", "draft_seconds", "steps", "faults", "skipped_no_context", "active_requests"):
            total[key] += snap.get(key, 0)
        for key in ("drafted_at", "accepted_at"):
            total[key] = _add_lists(total[key], snap[key])
        for key in ("source_drafted", "source_accepted"):
            for source, vals in snap.get(key, {}).items():
                total[key][source] = _add_lists(total[key].get(source, []), vals)
        for kind, n in snap.get("kind_rounds", {}).items():
            total["kind_rounds"][kind] = total["kind_rounds"].get(kind, 0) + n
        for k, v in snap["length_hist"].items():
            total["length_hist"][k] = total["length_hist"].get(k, 0) + v
    return total


def _add_lists(a: list[int], b: list[int]) -> list[int]:
    """Element-wise sum, the shorter padded with zeros."""
    n = max(len(a), len(b))
    return [x + y for x, y in zip(a + [0] * (n - len(a)), b + [0] * (n - len(b)))]


class DSparkCollector:
    """Prometheus collector over the snapshot directory (registered once per process)."""

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        m = read_metrics()
        drafted = CounterMetricFamily("vllm_dspark:drafted_tokens", "Verified draft tokens by position",
                                      labels=["position"])
        accepted = CounterMetricFamily("vllm_dspark:accepted_tokens", "Accepted draft tokens by position",
                                       labels=["position"])
        conditional = GaugeMetricFamily("vllm_dspark:acceptance_conditional",
                                        "P(position k accepted | k-1 accepted)", labels=["position"])
        prev = None
        for k, (d, a) in enumerate(zip(m["drafted_at"], m["accepted_at"]), start=1):
            drafted.add_metric([str(k)], d)
            accepted.add_metric([str(k)], a)
            # Conditional on reaching k: rounds that accepted k-1 and drafted k.
            reached = d if prev is None else min(prev, d)
            conditional.add_metric([str(k)], a / reached if reached else 0.0)
            prev = a
        yield drafted
        yield accepted
        yield conditional
        by_drafted = CounterMetricFamily("vllm_dspark:source_drafted_tokens",
                                         "Verified draft tokens by source (drafter, suffix) and position",
                                         labels=["source", "position"])
        by_accepted = CounterMetricFamily("vllm_dspark:source_accepted_tokens",
                                          "Accepted draft tokens by source (drafter, suffix) and position",
                                          labels=["source", "position"])
        for source, vals in sorted(m["source_drafted"].items()):
            for k, (d, a) in enumerate(zip(vals, m["source_accepted"].get(source, [])), start=1):
                by_drafted.add_metric([source, str(k)], d)
                by_accepted.add_metric([source, str(k)], a)
        yield by_drafted
        yield by_accepted
        kinds = CounterMetricFamily("vllm_dspark:source_rounds", "Verification rounds by where their drafts came "
                                    "from (drafter, suffix, splice)", labels=["source"])
        for kind, n in sorted(m["kind_rounds"].items()):
            kinds.add_metric([kind], n)
        yield kinds
        lengths = CounterMetricFamily("vllm_dspark:block_length", "Chosen draft lengths", labels=["length"])
        for k, v in sorted(m["length_hist"].items(), key=lambda kv: int(kv[0])):
            lengths.add_metric([k], v)
        yield lengths
        for name, doc, key in COUNTERS:
            yield CounterMetricFamily(f"vllm_dspark:{name}", doc, value=m[key])
        yield GaugeMetricFamily("vllm_dspark:drafter_ms_per_step", "Mean drafter milliseconds per step",
                                value=1000.0 * m["draft_seconds"] / m["steps"] if m["steps"] else 0.0)
        yield GaugeMetricFamily("vllm_dspark:active_requests", "Requests holding drafter context",
                                value=m["active_requests"])


# (metric name, help, read_metrics key) of the plain counters
COUNTERS = [
    ("rounds", "Verification rounds", "rounds"),
    ("draft_seconds", "Drafter seconds", "draft_seconds"),
    ("draft_steps", "Engine steps seen by the drafter", "steps"),
    ("drafter_faults", "Drafter failures (steps without speculation)", "faults"),
    ("skipped_no_context", "Proposals skipped: no complete context", "skipped_no_context"),
]


def install() -> None:
    """register() step: make the snapshot directory known to child processes and register the collector."""
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    metrics_dir()
    try:
        from prometheus_client import REGISTRY
    except ImportError:  # vLLM always has it; the core library does not need it
        return
    REGISTRY.register(DSparkCollector())
