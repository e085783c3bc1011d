"""DSparkProposer: the ``custom_class`` proposer vLLM builds, wrapping the core drafter.

User config (offline ``LLM(...)`` or ``vllm serve``)::

    speculative_config={"method": "custom_class", "model": "vllm_dspark.DSparkProposer",
                        "num_speculative_tokens": K}
    additional_config={"dspark": {"drafter": "/path/to/drafter", ...}}

One engine step, as the compat wrappers drive it: ``on_finished`` (free state) -> ``ingest`` (project the
verified rows into each request's context, once) -> ``set_batch`` (request ids and sampling params of the
batch) -> ``propose`` (ONE batched ``draft_block`` for every request that can draft) -> ``take_draft_probs``
(q for the rejection sampler).
"""
from __future__ import annotations

import logging
import time
import zlib
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..checkpoint import load_drafter, read_weights, validate_weights
from ..config import DSparkConfig
from ..context import ContextGapError, ContextStore, PrefixCache
from ..scheduling import (CALIBRATION_FILE, DraftPause, LinearCost, PayoffMeter, apply_temperature,
                          load_calibration, plan_block_lengths)
from ..drafting import draft_block
from ..lookup import LookupStats, prompt_lookup
from ..settings import DSparkSettings  # noqa: F401 - also imported from here by users and tests
from .. import use_vllm_log_handlers
from . import compat, metrics
from .compat import StepRows

logger = logging.getLogger("vllm_dspark")


@dataclass
class _StepTiming:
    """One engine step as the proposer times it (start = the runner's state update, forward until ingest)."""

    start: float
    forward: float
    batch: int  # requests in the step
    tokens: int  # tokens it emitted
    verified: bool  # it verified drafts
    prefill: bool  # a prompt chunk was part of it
    predicted: float | None = None  # payoff the model predicted for its drafts
    drafter: float = 0.0  # drafter seconds, when it drafted for the next step
    drafted: bool = False
    probe: bool = False  # it drafted a sample of the batch after a pause


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
    # With ``record``: one (req_id, drafted, accepted, confidences of the verified positions) per round, in
    # verification order (req_id = vLLM's engine-internal request id, as in ``records``).
    round_log: list[tuple[str, int, int, list[float]]] = field(default_factory=list)
    # Rounds whose drafts came from prompt lookup (counted in num_rounds/drafted_at/accepted_at too, so that
    # those agree with vLLM's counters; never in round_log, the drafter's calibration data).
    lookup_rounds: int = 0
    lookup_drafted: int = 0
    lookup_accepted: int = 0

    @property
    def rounds(self) -> list[tuple[int, int, list[float]]]:
        """``round_log`` without the request ids: (drafted, accepted, confidences) per round."""
        return [entry[1:] for entry in self.round_log]

    def observe_round(self, req_id: str, drafted: int, accepted: int, confidence: list[float] | None,
                      keep: bool) -> None:
        while len(self.drafted_at) < drafted:
            self.drafted_at.append(0)
            self.accepted_at.append(0)
        self.num_rounds += 1
        for k in range(drafted):
            self.drafted_at[k] += 1
            self.accepted_at[k] += k < accepted
        if keep:
            self.round_log.append((req_id, drafted, accepted, list(confidence or [])[:drafted]))


def seed_key(seed: int, position: int) -> int:
    """The draft-noise key of a seeded request drafting from ``position``: distinct per (seed, position), the
    same in every run, batch and process (``markov_head`` mixes both 32-bit halves)."""
    return (((int(seed) & 0x7FFFFFFF) + 1) << 32) | (position & 0xFFFFFFFF)


def probe_rows(deferred: list[int], turn: int, n: int) -> list[int]:
    """The ``n`` rows a probe drafts: those with the fewest deferred context rows (a probe projects its rows'
    whole deferred context first: at 32 requests paused for hundreds of steps, ~900 rows for 4 fresh requests),
    ties taken in turn from row ``turn``; in row order."""
    b = len(deferred)
    order = sorted(range(b), key=lambda j: (deferred[j], (j - turn) % b))
    return sorted(order[:n])


@dataclass
class _WithOverhead:
    """The target's step cost plus the seconds a step costs besides its forward, as the plan evaluates it."""

    cost: LinearCost
    overhead: float

    def __call__(self, num_tokens: int) -> float:
        return 1.0 / (self.cost.seconds(num_tokens) + self.overhead)

    def sps_many(self, num_tokens) -> np.ndarray:
        return self.cost.sps_many(num_tokens, self.overhead)


class DSparkProposer:
    def __init__(self, vllm_config: Any):
        use_vllm_log_handlers()
        compat.install()
        self.vllm_config = vllm_config
        self.settings = DSparkSettings.from_additional_config(vllm_config.additional_config)
        spec = vllm_config.speculative_config
        self.num_spec_tokens = int(spec.num_speculative_tokens)
        self.cfg = DSparkConfig.load(self.settings.drafter)
        self.cfg.check_target(vllm_config.model_config.hf_config)
        self.cfg.check_num_speculative_tokens(self.num_spec_tokens)
        validate_weights(self.cfg, read_weights(self.settings.drafter))  # fail before any weight loading
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        # With vLLM's prefix cache on, a request whose prompt hits it gets no hidden states for the cached
        # part: we keep drafter context per block of the same size, keyed the same way (context.PrefixCache).
        cache = vllm_config.cache_config
        self._prefix_block_size = int(cache.block_size) if getattr(cache, "enable_prefix_caching", False) else 0
        self.drafter = None
        self.store: ContextStore | None = None
        self.pending_rows: StepRows | None = None
        self.stats = ProposerStats()
        self._batch_req_ids: list[str] = []
        self._seeds: dict[int, int] = {}
        self._temperature: torch.Tensor | None = None
        self._budget = self.num_spec_tokens
        self._last_probs: tuple[torch.Tensor, list[str]] | None = None
        self._round = 0
        self._gap_reqs: dict[str, str] = {}  # requests that never draft again -> why (logged once)
        self._gap_logged: set[str] = set()  # at most GAP_LOG_REQUESTS ids
        self.records: list[dict] = []
        self.adaptive = self.settings.mode == "adaptive" and self.cfg.enable_confidence_head
        self.cost = LinearCost()  # target step time vs verified tokens, learned online from real steps
        self.calibration = None  # per-position confidence temperatures (vllm-dspark calibrate), if fitted
        cal = Path(self.settings.drafter) / CALIBRATION_FILE
        if cal.exists():
            self.calibration = load_calibration(cal)[0]
        self._g = self.num_spec_tokens  # positions drafted this step (trimmed under load)
        # Drafting itself costs time (on CPU the drafter's LM head is a large share of a step): when the
        # best plan including it is slower than not speculating, stop drafting and probe again later, with a
        # sample of the batch. Drafter seconds vs requests drafted, a fixed part + a part per request (~4:1
        # measured for SmolLM2's drafter on this CPU), learned online like the target's cost.
        self.draft_cost = LinearCost(overhead_tokens=4.0)
        self.net_ratio: float | None = None  # running tokens/s with drafting (drafter included) / without
        self._pause = DraftPause(self.settings.probe_interval, self.settings.probe_interval_max)
        self._probe_steps = 0  # steps drafted since the pause ended (small batches, see _plan)
        self._step_t0: float | None = None
        # The engine's own time per step outside the runner (output processing, scheduling): a step costs it
        # whatever it verifies, so it counts in steps/s like the forward's fixed part. EMA, seconds.
        self.step_overhead = 0.0
        self._step_end: float | None = None  # when our part of the previous step ended
        self._last_forward = 0.0
        # Whole engine step periods (start to next start) less the forward and the drafter: what else a step
        # costs, measured apart for steps that draft or verify drafts (bookkeeping, projecting context rows, the
        # engine's handling of drafts; vs requests in the batch) and for plain steps. The pieces timed above
        # miss part of it: on SmolLM2 (this CPU) a drafting step took 2 ms (1 request) to 4 ms (4 requests) more
        # than forward + drafter + the engine's gap, a plain step 0.5 ms; at 4 requests drafting steps measured
        # 0.92x the tokens/s of plain ones while the pieces predicted a gain.
        self.draft_rest = LinearCost(overhead_tokens=4.0)
        self.plain_rest: float | None = None  # EMA over plain steps
        self._timing: _StepTiming | None = None  # the step in progress
        # The same whole steps as tokens/s, drafting vs plain, per batch size: corrects the predicted payoff.
        self.payoff = PayoffMeter()
        self._last_ratio: float | None = None  # the payoff predicted for the drafts planned last
        self._payoff_logged: set[int] = set()  # batch sizes whose measured payoff was logged
        self._confidence: dict[str, list[float]] = {}  # per request: confidences of its pending drafts
        self._looked_up: set[str] = set()  # requests whose pending drafts came from prompt lookup
        self.lookup_stats = LookupStats(self.num_spec_tokens)

    # ------------------------------------------------------------------ setup
    @property
    def aux_layer_ids(self) -> list[int]:
        return self.cfg.aux_layer_ids

    def load_model(self, target_model: Any) -> None:
        """Called by the CPU runner with the target; the compat wrapper binds on every backend."""

    def bind_target(self, target_model: torch.nn.Module, vllm_config: Any) -> None:
        if self.drafter is not None:
            return
        device = next(target_model.parameters()).device
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        dtype = dtypes.get(
            self.settings.dtype, torch.float32 if device.type == "cpu" else vllm_config.model_config.dtype)
        # Under tensor parallelism the target's embedding and LM head are vocab-sharded: take the full
        # matrices from the target's checkpoint files instead (the drafter is replicated on every rank).
        source = target_model
        if int(getattr(vllm_config.parallel_config, "tensor_parallel_size", 1)) > 1:
            source = vllm_config.model_config.model
        self.drafter = load_drafter(self.settings.drafter, source, dtype=dtype, device=device)
        head = self.settings.head_dtype
        head_dtype = dtypes.get(head, torch.bfloat16 if head == "auto" and device.type == "cpu" else None)
        self.drafter.set_head_dtype(head_dtype, release=True)
        prefix = None
        if self._prefix_block_size:
            prefix = PrefixCache(self._prefix_block_size, self.settings.prefix_cache_mb * 2**20)
        self.store = ContextStore(self.drafter, prefix_cache=prefix)
        logger.info("vllm-dspark: drafter %s loaded (%d layers, markov rank %d, K=%d, topk=%d, %s, LM head %s)",
                    self.settings.drafter, self.cfg.num_hidden_layers, self.cfg.markov_rank, self.num_spec_tokens,
                    self.settings.topk, dtype, head_dtype or dtype)

    # ------------------------------------------------------------------ step hooks
    def on_finished(self, req_ids) -> None:
        now = self._step_t0 = time.perf_counter()  # a step starts: its forward is timed until ingest
        if self._step_end is not None:
            gap, self._step_end = now - self._step_end, None
            if self._paused(gap):  # the previous step's period is not a step's cost: not observed
                self._timing = None
            else:  # clamped: the first gap may be a pause too
                gap = min(gap, self._last_forward)
                self.step_overhead = gap if self.step_overhead == 0.0 else 0.9 * self.step_overhead + 0.1 * gap
        if self._timing is not None:
            self._observe_period(now)
        if self.store is None:
            return
        for r in req_ids:
            self.store.free(r)
            self._gap_reqs.pop(r, None)
            self._confidence.pop(r, None)
            self._looked_up.discard(r)
        if req_ids:
            metrics.publish(self, force=not self.store.slots)  # an idle engine reports 0 active at once

    # A gap between our part of one step and the next step's start longer than this many forwards, and than
    # PAUSE_OVERHEADS times the engine's usual gap, is the engine waiting (idle between generate() calls, or
    # paused while another engine in the process steps: `vllm-dspark bench` interleaves engines in time slices),
    # not what a step costs.
    PAUSE_FORWARDS = 0.5
    PAUSE_OVERHEADS = 4.0

    def _paused(self, gap: float) -> bool:
        return self.step_overhead > 0.0 and gap > max(self.PAUSE_FORWARDS * self._last_forward,
                                                      self.PAUSE_OVERHEADS * self.step_overhead)

    @property
    def num_active_requests(self) -> int:
        return 0 if self.store is None else len(self.store)

    def ingest(self, step: StepRows, sampled_token_ids: list[list[int]]) -> None:
        """Append the verified rows of this step to each request's context (one batched projection)."""
        if self.store is None:
            return
        try:
            self._ingest(step, sampled_token_ids)
        except Exception:  # noqa: BLE001 - contexts of this step's requests may now have holes: stop drafting them
            self._gap_reqs.update(dict.fromkeys(step.req_ids, "its context update failed"))
            self._fault("context update")

    def _ingest(self, step: StepRows, sampled_token_ids: list[list[int]]) -> None:
        t0 = time.perf_counter()
        qsl = step.query_start_loc.tolist()
        n_req = len(step.req_ids)
        drafts = list(step.num_draft_tokens[:n_req]) + [0] * (n_req - len(step.num_draft_tokens))
        if self._step_t0 is not None:
            self._last_forward = t0 - self._step_t0
            self.cost.observe(qsl[-1], self._last_forward)
            self._timing = _StepTiming(
                self._step_t0, self._last_forward, n_req, sum(len(s) for s in sampled_token_ids),
                verified=any(drafts), prefill=any(qsl[i + 1] - qsl[i] > 1 + drafts[i] for i in range(n_req)),
                predicted=self._last_ratio)
            self._step_t0 = None
        feats = torch.cat(step.aux_hidden_states, dim=-1)  # [T, L*Ht], a fresh tensor: rows are views of it
        rows = []
        for i, req_id in enumerate(step.req_ids):
            start, stop, nd = qsl[i], qsl[i + 1], drafts[i]
            ns = len(sampled_token_ids[i]) if i < len(sampled_token_ids) else 0
            if nd > 0 and ns > 0:
                stop -= nd + 1 - ns  # rejected rows
                looked_up = req_id in self._looked_up
                self.stats.observe_round(req_id, nd, ns - 1, self._confidence.pop(req_id, None),
                                         self.settings.record and not looked_up)
                if looked_up:
                    self._looked_up.discard(req_id)
                    self.lookup_stats.observe(nd, ns - 1)
                    self.stats.lookup_rounds += 1
                    self.stats.lookup_drafted += nd
                    self.stats.lookup_accepted += ns - 1
            if stop > start and req_id not in self._gap_reqs:
                rows.append((req_id, step.starts[i], feats[start:stop]))
        index = {r: i for i, r in enumerate(step.req_ids)}
        ready = [r for r in rows if r[1] <= self.store.length(r[0])]
        self._append(ready, step, index)
        # A start beyond the context means vLLM's prefix cache served the first `pos` tokens, possibly from
        # blocks another request computes in this very step (the children of an n > 1 request, each served
        # part of the prompt): take those rows from our own prefix cache, appending each request's new rows
        # at once so that the blocks they complete serve the next one; shortest cached prefix first, and
        # again while that makes progress. If a hole remains, never draft for that request.
        late = sorted((r for r in rows if r[1] > self.store.length(r[0])), key=lambda r: r[1])
        progress = True
        while late and progress:
            progress, waiting = False, []
            for req_id, pos, f in late:
                if self.store.fill_from_prefix_cache(req_id, step.token_ids[index[req_id], :pos]) >= pos:
                    self._append([(req_id, pos, f)], step, index)
                    progress = True
                else:
                    waiting.append((req_id, pos, f))
            late = waiting
        for req_id, pos, _ in late:
            self._gap_reqs[req_id] = (f"vLLM's prefix cache served its first {pos} tokens and the drafter's "
                                      "prefix cache does not hold them all")
        self.stats.ingest_seconds += time.perf_counter() - t0
        self._step_end = time.perf_counter()

    def _append(self, rows, step: StepRows, index: dict[str, int]) -> None:
        try:
            # projected when drafting next reads them (store.flush); views of this step's own feature tensor
            self.store.append(rows, defer=True, owned=True)
        except ContextGapError:  # defensive: callers only pass rows that start inside the context
            self.stats.faults += 1
            return
        for req_id, pos, f in rows:
            self.store.publish_blocks(req_id, step.token_ids[index[req_id], :pos + f.shape[0]])

    def set_batch(self, req_ids: list[str], sampling_metadata: Any, budget: int,
                  seeds: dict[int, int] | None = None) -> None:
        """``seeds``: {batch row: SamplingParams.seed} of the seeded requests (see ``_propose``)."""
        self._batch_req_ids = req_ids
        self._seeds = seeds or {}
        self._budget = int(budget) if budget else self.num_spec_tokens
        temp = None
        if sampling_metadata is not None and not sampling_metadata.all_greedy:
            temp = sampling_metadata.temperature
        self._temperature = temp

    # ------------------------------------------------------------------ drafting
    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray,
                token_ids_cpu: np.ndarray, slot_mappings: Any = None, **_: Any) -> list[list[int]]:
        try:
            return self._propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)
        finally:
            self._step_end = time.perf_counter()

    def _propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray,
                 token_ids_cpu: np.ndarray | None = None) -> list[list[int]]:
        self._last_probs = None
        out: list[list[int]] = [[] for _ in sampled_token_ids]
        if self.store is None:
            return out
        t0 = time.perf_counter()
        # A seeded request's output must be a function of its prompt, parameters and seed alone (vLLM users
        # rely on that): it always drafts the full K (vLLM draws its verification randomness per draft from the
        # request's generator), with draft noise keyed by its seed and position; the adaptive policy (pauses,
        # probes, trimmed blocks, prompt lookup: timing and the batch) plans only the other requests.
        seeded = self._seeds
        paused = False
        if self.adaptive and self._pause.active(self.stats.steps, len(sampled_token_ids)):
            paused = True
        elif self.adaptive and self.payoff.loses(len(self._batch_req_ids), self.stats.steps):
            # Drafting steps of this batch size measured slower (in tokens/s) than plain ones, lately: pause at
            # once, growing, instead of a probe every probe_interval steps (at 4 requests on SmolLM2 / this CPU:
            # ~2% of throughput); once that measurement is stale a probe drafts again and renews it.
            self._pause.not_worth_it(self.stats.steps, len(sampled_token_ids))
            paused = True
        if paused and not seeded:
            self.stats.steps += 1
            return out
        full = max(0, min(self.num_spec_tokens, self._budget))
        k = 0 if paused else min(full, self._g) if self.adaptive else full
        rows, anchors, temps = [], [], []
        for i, sampled in enumerate(sampled_token_ids):
            if not sampled or i >= len(self._batch_req_ids):
                continue
            req_id = self._batch_req_ids[i]
            n = int(num_tokens_no_spec[i])  # tokens so far, the new anchor included
            if req_id in self._gap_reqs or self.store.length(req_id) != n - 1:
                self._skip(req_id, n - 1)
                continue
            width = full if i in seeded else k
            if n + width > self.max_model_len or width == 0:
                continue
            rows.append(i)
            anchors.append(int(sampled[-1]))
            # Without q handed to the sampler, draft greedily: vLLM then treats each draft as one-hot
            # (still lossless; it accepts x with probability p(x)).
            sampled_t = 0.0 if self._temperature is None else float(self._temperature[i])
            temps.append(sampled_t if self.settings.probabilistic else 0.0)
        self.stats.steps += 1
        if not rows:
            return out
        fixed = [j for j, i in enumerate(rows) if i in seeded]
        free = [j for j, i in enumerate(rows) if i not in seeded]
        batch = len(free)  # the requests the adaptive policy plans
        probe = self.adaptive and self._pause.probing and batch > self.PROBE_ROWS
        if probe:
            # After a pause, draft for a few requests only: their confidences stand for the batch's, and a
            # probe of the whole batch would cost more than a target step under load.
            keep = probe_rows([self.store.deferred_rows(self._batch_req_ids[rows[j]]) for j in free], self._round,
                              self.PROBE_ROWS)
            free = [free[x] for x in keep]
        looked = {} if probe else {free[x]: d for x, d in self._lookup(
            [rows[j] for j in free], [temps[j] for j in free], num_tokens_no_spec, token_ids_cpu).items()}
        # The drafter serves the rows prompt lookup did not; their deferred rows (several steps' worth when the
        # adaptive policy paused drafting) are projected here, outside the drafter's timing.
        drafted_free = [j for j in free if j not in looked]
        drafted = drafted_free + fixed
        width = full if fixed else k
        req_ids = [self._batch_req_ids[rows[j]] for j in drafted]
        t_flush = time.perf_counter()
        self.store.flush(req_ids)
        t0 += time.perf_counter() - t_flush
        self.stats.ingest_seconds += time.perf_counter() - t_flush
        device = self.drafter.fc.weight.device
        temperature = torch.tensor([temps[j] for j in drafted], dtype=torch.float32, device=device)
        want_q = self.settings.probabilistic and bool((temperature > 0).any())
        self._round += 1
        seed = torch.tensor([seed_key(seeded[rows[j]], int(num_tokens_no_spec[rows[j]])) if rows[j] in seeded
                             else (zlib.crc32(r.encode()) * 1_000_003 + self._round) & 0x7FFFFFFF
                             for j, r in zip(drafted, req_ids)], dtype=torch.int64, device=device)
        block, tokens, conf = None, [], None
        nf, n_looked = len(drafted_free), len(looked)
        order = drafted_free + list(looked) + fixed  # the drafter's free rows, prompt lookup's, the seeded ones
        try:
            if drafted:
                block = draft_block(self.drafter, self.store.gather(req_ids),
                                    torch.tensor([anchors[j] for j in drafted], dtype=torch.int64, device=device),
                                    width, temperature=temperature, seed=seed, topk=self.settings.topk,
                                    return_q=want_q,
                                    block_drafts=self.cfg.max_draft_tokens if self.settings.full_block else None)
                tokens = block.tokens.tolist()
                conf = block.confidence.tolist() if block.confidence is not None else None
            tokens = [t[:k] for t in tokens[:nf]] + list(looked.values()) + tokens[nf:]
            logit = block.confidence_logit if block is not None and nf else None
            logit = None if logit is None else logit[:nf, :k]  # the free rows' (a drafter may have no head)
            if self.adaptive and (logit is not None or (looked and not drafted_free)):
                lengths = self._plan(logit, [int(num_tokens_no_spec[rows[j]]) for j in order[:nf + n_looked]], k,
                                     time.perf_counter() - t0, batch, lookup=[len(d) for d in looked.values()])
                tokens = [t[:n] for t, n in zip(tokens, lengths)] + tokens[len(lengths):]
        except Exception:  # noqa: BLE001 - a drafter fault must never take the engine down
            self._fault("drafting")
            return out
        for pos, j in enumerate(order):
            i, req_id = rows[j], self._batch_req_ids[rows[j]]
            out[i] = tokens[pos]
            from_lookup = nf <= pos < nf + n_looked
            if not from_lookup:
                if conf is not None:
                    self._confidence[req_id] = conf[pos if pos < nf else pos - n_looked]
            elif tokens[pos]:
                self._looked_up.add(req_id)
            if self.settings.record:
                self.records.append({"req_id": req_id, "position": int(num_tokens_no_spec[i]) - 1,
                                     "anchor": anchors[j], "drafts": tokens[pos],
                                     "source": "lookup" if from_lookup else "drafter"})
            n = len(tokens[pos])
            self.stats.length_hist[n] = self.stats.length_hist.get(n, 0) + 1
        self.stats.drafted_requests += len(order)
        if want_q:
            self._last_probs = (self._dense_q(block, len(req_ids)), req_ids)
        self.stats.draft_seconds += time.perf_counter() - t0
        metrics.publish(self)
        return out

    def _lookup(self, rows: list[int], temps: list[float], num_tokens: np.ndarray,
                token_ids: np.ndarray | None) -> dict[int, list[int]]:
        """Prompt-lookup drafts {index into rows: tokens} for the rows whose text has a match. Only in all-greedy
        batches: vLLM's rejection sampler takes the drafter's q for every drafting request or for none."""
        if (not self.settings.lookup or token_ids is None or any(t > 0 for t in temps)
                or len(rows) > self.settings.lookup_max_batch):
            return {}
        k = min(self.num_spec_tokens, self._budget)
        looked = {}
        for j, i in enumerate(rows):
            n = int(num_tokens[i])
            d = prompt_lookup(token_ids[i, :n], self.settings.lookup_min, self.settings.lookup_max,
                              min(k, self.max_model_len - n))
            if d:
                looked[j] = d
        return looked

    GAP_LOG_REQUESTS = 3  # requests whose missing context is logged (then only counted)

    def _skip(self, req_id: str, want: int) -> None:
        """A request without a complete drafter context does not draft this step (output is unaffected);
        counted (``vllm_dspark:skipped_no_context_total``), and the first few requests are logged with why."""
        self.stats.skipped_gap += 1
        if req_id in self._gap_logged or len(self._gap_logged) >= self.GAP_LOG_REQUESTS:
            return
        self._gap_logged.add(req_id)
        why = self._gap_reqs.get(req_id) or "rows of an earlier step were not delivered"
        logger.info("vllm-dspark: request %s does not draft: its drafter context has %d rows, %d expected (%s)",
                    req_id, self.store.length(req_id), want, why)

    def _fault(self, where: str) -> None:
        """Fall back to no speculation for this step: one warning with the traceback, then a counter
        (``stats.faults``, exported as ``vllm_dspark:drafter_faults``)."""
        self.stats.faults += 1
        if self.stats.faults == 1:
            logger.warning("vllm-dspark: the drafter failed during %s; this step runs without speculation "
                           "(output is unaffected). Later faults are only counted.", where, exc_info=True)

    PROBE_ROWS = 4  # requests drafted by a probe after a pause
    # No verdict before the target's cost model has this many steps: fitted on a prefill and a step or two
    # it underestimated a decode step ~3x on SmolLM2 and paused every engine's first 40 steps at concurrency 1.
    WARMUP_STEPS = 16
    # Batches of at most SMALL_BATCH requests draft SMALL_PROBE_STEPS steps after a pause before the next verdict
    # and keep their running average (bench, SmolLM2: with batches up to 4 counted small, c=4 fell to 0.92x).
    SMALL_BATCH = 2
    SMALL_PROBE_STEPS = 8
    NET_RATIO_ALPHA = 0.05  # weight of one request's drafting step in the running average of its payoff
    # Keep drafting only while it is predicted to pay at least this much (tokens/s with drafting / without):
    # near break-even the gain is within the cost model's error, and drafting also costs what the model does
    # not see (its Python bookkeeping, upstream's rejection sampler instead of the plain sampler).
    MIN_NET_RATIO = 1.0

    def _plan(self, confidence_logit: torch.Tensor | None, num_tokens: list[int], k: int, draft_seconds: float,
              batch: int, lookup: list[int] = ()) -> list[int]:
        """Per-request draft lengths maximising expected tokens x steps/s (paper Alg. 1, early stop; this
        step's drafting is paid for already), then whether to keep drafting: the plan's tokens/s with the
        drafter's time included against not speculating, as a running average over drafting steps (one
        unlucky block must not stop drafting). ``batch`` > rows drafted: a probe, whose rows stand for the
        whole batch (tiled); it decides whether to draft again and verifies nothing itself.

        ``lookup``: lengths of the prompt-lookup drafts of the last rows (after the drafter's rows, which have
        ``confidence_logit``); their survival is the lookup drafts' measured acceptance."""
        width = max([k, *lookup])
        survival = np.zeros((len(num_tokens), width))
        caps = np.array([max(0, min(k, self.max_model_len - n)) for n in num_tokens])
        n_drafter = len(num_tokens) - len(lookup)
        if n_drafter:
            z = confidence_logit.float().cpu().numpy()
            if self.calibration is not None:
                survival[:n_drafter, :z.shape[1]] = apply_temperature(z, self.calibration[: z.shape[1]])
            else:
                survival[:n_drafter, :z.shape[1]] = np.cumprod(1.0 / (1.0 + np.exp(-z)), axis=1)
        for j, n in enumerate(lookup):
            survival[n_drafter + j] = self.lookup_stats.survival(n)[:width]
            caps[n_drafter + j] = n
        r = len(caps)
        if n_drafter:
            self.draft_cost.observe(n_drafter, draft_seconds)
        probe = batch > r
        if probe:
            survival, caps = np.resize(survival, (batch, survival.shape[1])), np.resize(caps, batch)
        overhead, plain_overhead = self._overheads(batch)
        plan = plan_block_lengths(survival, _WithOverhead(self.cost, overhead), caps, scan=True)
        lengths = plan.lengths.tolist()
        # Draft no more positions next step than could be chosen now, +2 to grow back when load falls: a block
        # one longer may not pay where two do (a CPU may verify 3 tokens faster than 2), and with +1 a request
        # that chose 0 drafts would then only ever be offered that one.
        self._g = max(1, min(self.num_spec_tokens, max(lengths, default=0) + 2))
        drafter_seconds = self.draft_cost.seconds(batch * n_drafter // r) if n_drafter else 0.0
        with_drafts = plan.expected_tokens / (self.cost.seconds(plan.num_tokens) + overhead + drafter_seconds)
        ratio = with_drafts * (self.cost.seconds(batch) + plain_overhead) / batch  # vs not speculating
        # After a pause a big batch's probe stands alone (the load may have changed); a small batch keeps its
        # running average, which a single step moves little: it drafts SMALL_PROBE_STEPS steps before a verdict
        # (a verdict on the first step's ratio alone followed that one block's confidence: at concurrency 1 the
        # shipped drafter then paused in 2 of 3 steps although drafting paid +26% where it ran).
        small = batch <= self.SMALL_BATCH
        fresh = probe or self.net_ratio is None or (self._pause.probing and not small)
        # One step's ratio averages over its requests: weigh it by the batch (a big batch's verdict is firm, and
        # drafting it at a loss is costly), a single request's by 1/20.
        alpha = min(1.0, self.NET_RATIO_ALPHA * batch)
        self.net_ratio = ratio if fresh else (1 - alpha) * self.net_ratio + alpha * ratio
        if self._timing is not None:  # this step drafts: its period counts as a drafting step's
            t = self._timing
            t.drafter, t.drafted, t.probe, t.predicted = draft_seconds, True, probe, ratio
        self._last_ratio = None if probe else ratio
        if self._pause.probing and small and self._probe_steps < self.SMALL_PROBE_STEPS - 1:
            self._probe_steps += 1
            return lengths
        if self.cost.count < self.WARMUP_STEPS:  # the cost model has seen a prefill and a few steps: no verdict
            return lengths
        self._probe_steps = 0
        requests = len(self._batch_req_ids)
        if self.payoff.wants_plain(requests, self.stats.steps):  # measure plain steps of this batch size
            self._pause.not_worth_it(self.stats.steps, batch, grow=False)
            return [0] * r if probe else lengths
        correction = self.payoff.correction(requests)
        if correction is not None and requests not in self._payoff_logged:
            self._payoff_logged.add(requests)
            logger.info("vllm-dspark: measured at %d requests: drafting steps %.2fx the tokens/s of plain steps "
                        "(the cost model predicted %.2fx); later pause verdicts are corrected by that",
                        requests, self.payoff.measured(requests), self.payoff.measured(requests) / correction)
        # A small batch whose drafting steps measurably pay keeps drafting: its predicted payoff follows one or two
        # requests' confidences, and pausing on them cost more than it saved (c=1: 23% of steps plain, 1.09x vs
        # fixed K=2's 1.12x). The measurement goes on in every drafting step, so it stops once drafting does not pay.
        if small and self.payoff.pays(requests):
            self._pause.worth_it()
        elif self.net_ratio * (correction or 1.0) <= self.MIN_NET_RATIO:
            self._pause.not_worth_it(self.stats.steps, batch, grow=batch > self.PROBE_ROWS)
        else:
            self._pause.worth_it()
        return [0] * r if probe else lengths

    REST_MIN_STEPS = 4  # measured step rests are used once this many steps of the kind were seen

    def _observe_period(self, now: float) -> None:
        """Fold in the step timed by ``self._timing``, which ended at ``now`` (the next step's start)."""
        t, self._timing = self._timing, None
        # Clamped: an idle engine between two generate() calls is not a step's cost.
        rest = min(now - t.start - t.forward - t.drafter, t.forward)
        drafting = t.verified or t.drafted
        if drafting:
            self.draft_rest.observe(t.batch, max(rest, 1e-6))
        else:
            self.plain_rest = rest if self.plain_rest is None else 0.9 * self.plain_rest + 0.1 * rest
        if not (t.prefill or t.probe):
            self.payoff.observe(t.batch, drafting, t.tokens, t.forward + t.drafter + rest, t.predicted,
                                self.stats.steps)

    def _overheads(self, batch: int) -> tuple[float, float]:
        """Seconds a step costs besides the target's forward (and the drafter): (drafting step, plain step)."""
        plain = self.step_overhead if self.plain_rest is None else max(self.plain_rest, 0.0)
        drafting = self.draft_rest.seconds(batch) if len(self.draft_rest) >= self.REST_MIN_STEPS else plain
        return drafting, plain

    def _dense_q(self, block, b: int) -> torch.Tensor:
        """q as [B, K, V] float32 rows (top-k q scattered into zeros)."""
        if block.q is not None:
            return block.q.float().contiguous()
        q = torch.zeros(b, block.q_probs.shape[1], self.cfg.vocab_size, dtype=torch.float32,
                        device=block.q_probs.device)
        return q.scatter_(2, block.q_ids, block.q_probs.float())

    def take_draft_probs(self) -> tuple[torch.Tensor, list[str]] | None:
        probs, self._last_probs = self._last_probs, None
        return probs
