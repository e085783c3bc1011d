"""DSparkProposer: the ``custom_class`` proposer vLLM builds, a thin adapter around the drafter and the policy.

User config (offline ``LLM(...)`` or ``vllm serve``)::

    speculative_config={"method": "custom_class", "model": "vllm_dspark.DSparkProposer",
                        "num_speculative_tokens": K}
    additional_config={"dspark": {"drafter": "/path/to/drafter", ...}}

One engine step, as the compat wrappers drive it: ``on_finished`` (free state; the step starts) -> ``ingest``
(the verified rows into each request's context) -> ``set_batch`` (request ids and sampling params) -> ``propose``
(the policy says whether to draft; ONE batched ``draft_block``; the policy gives each request its length) ->
``take_draft_probs`` (q for the rejection sampler).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import use_vllm_log_handlers
from ..calibration import CALIBRATION_FILE, load_calibration, survival
from ..checkpoint import load_drafter, resolve_dtypes
from ..config import DSparkConfig
from ..context import ContextStore, PrefixCache
from ..drafting import draft_block, noise_keys
from ..lookup import LookupStats, lookup_drafts
from ..preflight import check_dspark
from ..policy import SpeedPolicy, StepReport
from ..settings import DSparkSettings  # noqa: F401 - also imported from here by users and tests
from . import compat, metrics
from .compat import StepRows
from .metrics import ProposerStats

logger = logging.getLogger("vllm_dspark")


class DSparkProposer:
    def __init__(self, vllm_config: Any):
        use_vllm_log_handlers()
        compat.install()
        self.vllm_config = vllm_config
        self.num_spec_tokens = int(vllm_config.speculative_config.num_speculative_tokens)
        # the preflight's checks again (settings, drafter, K, target, weights): fail before any weight loading
        self.settings = check_dspark(vllm_config.additional_config, self.num_spec_tokens,
                                     vllm_config.model_config.hf_config)
        self.cfg = DSparkConfig.load(self.settings.drafter)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        # With vLLM's prefix cache on, a request whose prompt hits it gets no hidden states for the cached
        # part: we keep drafter context per block of the same size, keyed the same way (context.PrefixCache).
        cache = vllm_config.cache_config
        self._prefix_block_size = int(cache.block_size) if getattr(cache, "enable_prefix_caching", False) else 0
        self.drafter = None
        self.store: ContextStore | None = None
        self.stats = ProposerStats()
        self.records: list[dict] = []
        self._batch_req_ids: list[str] = []
        self._seeds: dict[int, int] = {}
        self._temperature: torch.Tensor | None = None
        self._budget = self.num_spec_tokens
        self._last_probs: tuple[torch.Tensor, list[str]] | None = None
        self._gap_reqs: dict[str, str] = {}  # requests that never draft again -> why (logged once)
        self._confidence: dict[str, list[float]] = {}  # per request: confidences of its pending drafts
        self._looked_up: set[str] = set()  # requests whose pending drafts came from prompt lookup
        self.lookup_stats = LookupStats(self.num_spec_tokens)
        self.adaptive = self.settings.mode == "adaptive" and self.cfg.enable_confidence_head
        self.policy = SpeedPolicy(self.num_spec_tokens, self.settings.probe_interval, self.settings.probe_interval_max)
        cal = Path(self.settings.drafter) / CALIBRATION_FILE
        self.calibration = load_calibration(cal)[0] if cal.exists() else None  # from `vllm-dspark calibrate`
        self._step_start: float | None = None  # when the step in progress started
        self._step: StepReport | None = None  # the step in progress, as timed so far
        self._report: StepReport | None = None  # the step before, complete: for the policy's next decision

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
        dtype, head_dtype = resolve_dtypes(self.settings.dtype, self.settings.head_dtype, device,
                                           vllm_config.model_config.dtype)
        # Under tensor parallelism the target's embedding and LM head are vocab-sharded: take the full
        # matrices from the target's checkpoint files instead (the drafter is replicated on every rank).
        tp = int(getattr(vllm_config.parallel_config, "tensor_parallel_size", 1))
        source = vllm_config.model_config.model if tp > 1 else target_model
        self.drafter = load_drafter(self.settings.drafter, source, dtype=dtype, device=device)
        self.drafter.set_head_dtype(head_dtype, release=True)
        size = self._prefix_block_size
        self.store = ContextStore(self.drafter, prefix_cache=PrefixCache(
            size, self.settings.prefix_cache_mb * 2**20) if size else None)
        logger.info("vllm-dspark: drafter %s loaded (%d layers, markov rank %d, K=%d, topk=%d, %s, LM head %s)",
                    self.settings.drafter, self.cfg.num_hidden_layers, self.cfg.markov_rank, self.num_spec_tokens,
                    self.settings.topk, dtype, head_dtype or dtype)

    @property
    def num_active_requests(self) -> int:
        return 0 if self.store is None else len(self.store)

    # ------------------------------------------------------------------ step hooks
    def on_finished(self, req_ids) -> None:
        now = time.perf_counter()  # a step starts: the step before ends here
        if self._step is not None:
            self._step.period = now - self._step_start
            self._report, self._step = self._step, None
        self._step_start = now
        if self.store is None:
            return
        for r in req_ids:
            self.store.free(r)
            self._gap_reqs.pop(r, None)
            self._confidence.pop(r, None)
            self._looked_up.discard(r)
        if req_ids:
            metrics.publish(self, force=not self.store.slots)  # an idle engine reports 0 active at once

    def ingest(self, step: StepRows, sampled_token_ids: list[list[int]]) -> None:
        """Append the verified rows of this step to each request's context (one batched projection)."""
        if self.store is None:
            return
        try:
            self._ingest(step, sampled_token_ids)
        except Exception:  # noqa: BLE001 - contexts of this step's requests may now have holes: stop drafting them
            self._gap_reqs.update(dict.fromkeys(step.req_ids, "its context update failed"))
            self.stats.fault("context update")

    def _ingest(self, step: StepRows, sampled_token_ids: list[list[int]]) -> None:
        t0 = time.perf_counter()
        qsl = step.query_start_loc.tolist()
        n_req = len(step.req_ids)
        drafts = list(step.num_draft_tokens[:n_req]) + [0] * (n_req - len(step.num_draft_tokens))
        feats = torch.cat(step.aux_hidden_states, dim=-1)  # [T, L*Ht], a fresh tensor: rows are views of it
        rows, rounds = [], []
        for i, req_id in enumerate(step.req_ids):
            start, stop, nd = qsl[i], qsl[i + 1], drafts[i]
            ns = len(sampled_token_ids[i]) if i < len(sampled_token_ids) else 0
            if nd > 0 and ns > 0:
                stop -= nd + 1 - ns  # rejected rows
                looked_up = req_id in self._looked_up
                self._looked_up.discard(req_id)
                self.stats.observe_round(req_id, nd, ns - 1, self._confidence.pop(req_id, None),
                                         self.settings.record and not looked_up, lookup=looked_up)
                if looked_up:
                    self.lookup_stats.observe(nd, ns - 1)
                else:
                    rounds.append((nd, ns - 1))
            if stop > start and req_id not in self._gap_reqs:
                rows.append((req_id, step.starts[i], feats[start:stop]))
        if self._step_start is not None:
            self._step = StepReport(period=0.0, forward=t0 - self._step_start, tokens=qsl[-1], batch=n_req,
                                    verified=any(drafts), rounds=rounds,
                                    prefill=any(qsl[i + 1] - qsl[i] > 1 + drafts[i] for i in range(n_req)))
        index = {r: i for i, r in enumerate(step.req_ids)}
        for req_id, pos in self.store.append_step(rows, lambda r: step.token_ids[index[r]]):
            self._gap_reqs[req_id] = (f"vLLM's prefix cache served its first {pos} tokens and the drafter's "
                                      "prefix cache does not hold them all")
        self.stats.ingest_seconds += time.perf_counter() - t0

    def set_batch(self, req_ids: list[str], sampling_metadata: Any, budget: int,
                  seeds: dict[int, int] | None = None) -> None:
        """``seeds``: {batch row: SamplingParams.seed} of the seeded requests (see ``_propose``)."""
        self._batch_req_ids = req_ids
        self._seeds = seeds or {}
        self._budget = int(budget) if budget else self.num_spec_tokens
        greedy = sampling_metadata is None or sampling_metadata.all_greedy
        self._temperature = None if greedy else sampling_metadata.temperature

    # ------------------------------------------------------------------ drafting
    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray,
                token_ids_cpu: np.ndarray, slot_mappings: Any = None, **_: Any) -> list[list[int]]:
        self._last_probs = None
        out: list[list[int]] = [[] for _ in sampled_token_ids]
        if self.store is None:
            return out
        t0 = time.perf_counter()
        try:
            drafted = self._propose(out, sampled_token_ids, num_tokens_no_spec, token_ids_cpu)
        except Exception:  # noqa: BLE001 - a drafter fault must never take the engine down
            self.stats.fault("drafting")
            out, drafted = [[] for _ in sampled_token_ids], 0
        seconds = time.perf_counter() - t0
        if drafted and self._step is not None:
            self._step.drafter, self._step.drafted = seconds, drafted
        self.stats.draft_seconds += seconds
        metrics.publish(self)
        return out

    def _propose(self, out: list[list[int]], sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray,
                 token_ids_cpu: np.ndarray | None) -> int:
        """Fill ``out`` with drafts; returns the requests the drafter ran for."""
        k = max(0, min(self.num_spec_tokens, self._budget))
        # A seeded request's output must be a function of its prompt, parameters and seed alone (vLLM users rely
        # on that): it always drafts its full cap, with noise keyed by its seed and position; the policy (timing,
        # the batch) plans only the others, and is asked first so that a paused step costs no per-request work.
        report, self._report = self._report, None
        self.stats.steps += 1
        plan = not self.adaptive or self.policy.begin(report, len(sampled_token_ids) - len(self._seeds)) > 0
        if not plan and not self._seeds:
            return 0
        rows, anchors, temps, caps = [], [], [], []
        for i, sampled in enumerate(sampled_token_ids):
            if not sampled or i >= len(self._batch_req_ids) or not (plan or i in self._seeds):
                continue
            req_id = self._batch_req_ids[i]
            n = int(num_tokens_no_spec[i])  # tokens so far, the new anchor included
            if req_id in self._gap_reqs or self.store.length(req_id) != n - 1:
                why = self._gap_reqs.get(req_id) or "rows of an earlier step were not delivered"
                self.stats.skip(req_id, self.store.length(req_id), n - 1, why)
            elif min(k, self.max_model_len - n) > 0:
                rows.append(i)
                anchors.append(int(sampled[-1]))
                caps.append(min(k, self.max_model_len - n))
                # Without q handed to the sampler, draft greedily: vLLM then treats each draft as one-hot
                # (still lossless; it accepts x with probability p(x)).
                t = 0.0 if self._temperature is None else float(self._temperature[i])
                temps.append(t if self.settings.probabilistic else 0.0)
        seeded = [j for j, i in enumerate(rows) if i in self._seeds]
        free = [j for j, i in enumerate(rows) if i not in self._seeds]
        if not free and not seeded:
            return 0
        looked = self._lookup(free, rows, caps, temps, num_tokens_no_spec, token_ids_cpu)
        drafted = [j for j in free if j not in looked] + seeded
        order = [j for j in free if j not in looked] + list(looked) + seeded  # as `tokens` below lists them
        req_ids = [self._batch_req_ids[rows[j]] for j in drafted]
        t_flush = time.perf_counter()
        self.store.flush(req_ids)  # context rows deferred while not drafting, projected now
        self.stats.ingest_seconds += time.perf_counter() - t_flush
        device = self.drafter.fc.weight.device
        temperature = torch.tensor([temps[j] for j in drafted], dtype=torch.float32, device=device)
        want_q = self.settings.probabilistic and bool((temperature > 0).any())
        seed = torch.tensor(noise_keys(req_ids, [self._seeds.get(rows[j]) for j in drafted],
                                       [int(num_tokens_no_spec[rows[j]]) for j in drafted], self.stats.steps),
                            dtype=torch.int64, device=device)
        block, tokens, conf = None, [], None
        nf = len(drafted) - len(seeded)  # the drafter's free rows come first
        if drafted:
            block = draft_block(self.drafter, self.store.gather(req_ids),
                                torch.tensor([anchors[j] for j in drafted], dtype=torch.int64, device=device),
                                k, temperature=temperature, seed=seed, topk=self.settings.topk, return_q=want_q,
                                block_drafts=self.cfg.max_draft_tokens if self.settings.full_block else None)
            tokens = [t[:k] for t in block.tokens.tolist()]
            conf = block.confidence.tolist() if block.confidence is not None else None
        tokens = tokens[:nf] + list(looked.values()) + tokens[nf:]
        lengths = [min(caps[j], len(looked[j])) if j in looked else caps[j] for j in order]
        planned = nf + len(looked)  # the free rows: the drafter's (with a confidence head when adaptive), lookup's
        if self.adaptive and planned:
            survival = self._survival(block, nf, [len(d) for d in looked.values()], k)
            lengths[:planned] = self.policy.lengths(survival, lengths[:planned], len(free), drafted=nf)
        for pos, j in enumerate(order):
            i, req_id = rows[j], self._batch_req_ids[rows[j]]
            out[i] = tokens[pos][:lengths[pos]]
            from_lookup = nf <= pos < nf + len(looked)
            if not from_lookup and conf is not None:
                self._confidence[req_id] = conf[pos if pos < nf else pos - len(looked)]
            elif from_lookup and out[i]:
                self._looked_up.add(req_id)
            if self.settings.record:
                self.records.append({"req_id": req_id, "position": int(num_tokens_no_spec[i]) - 1, "anchor": anchors[j],
                                     "drafts": out[i], "source": "lookup" if from_lookup else "drafter"})
            self.stats.length_hist[len(out[i])] = self.stats.length_hist.get(len(out[i]), 0) + 1
        self.stats.drafted_requests += len(order)
        if want_q:
            self._last_probs = (block.dense_q(self.cfg.vocab_size), req_ids)
        return len(drafted)

    def _survival(self, block, nf: int, lookup: list[int], k: int) -> np.ndarray:
        """[free rows, k] survival the policy plans with: the drafter's calibrated confidences, then prompt lookup's
        measured acceptance for its rows."""
        rows = [survival(block.confidence_logit[:nf, :k].float().cpu().numpy(), self.calibration)] if nf else []
        return np.concatenate(rows + [self.lookup_stats.survival(n)[None, :k] for n in lookup])

    def _lookup(self, free: list[int], rows: list[int], caps: list[int], temps: list[float], num_tokens: np.ndarray,
                token_ids: np.ndarray | None) -> dict[int, list[int]]:
        """Prompt-lookup drafts {row index: tokens} for the free rows whose text has a match. Only in all-greedy
        batches: vLLM's rejection sampler takes the drafter's q for every drafting request or for none."""
        s = self.settings
        if not s.lookup or token_ids is None or any(t > 0 for t in temps) or len(free) > s.lookup_max_batch:
            return {}
        found = lookup_drafts(token_ids, num_tokens, [rows[j] for j in free], s.lookup_min, s.lookup_max,
                              [caps[j] for j in free])
        return {free[x]: d for x, d in found.items()}

    def take_draft_probs(self) -> tuple[torch.Tensor, list[str]] | None:
        probs, self._last_probs = self._last_probs, None
        return probs
