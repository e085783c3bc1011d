"""DSparkProposer: the ``custom_class`` proposer vLLM builds, a thin adapter around the drafter and the policy.

User config (offline ``LLM(...)`` or ``vllm serve``)::

    speculative_config={"method": "custom_class", "model": "vllm_dspark.DSparkProposer",
                        "num_speculative_tokens": K}
    additional_config={"dspark": {"drafter": "/path/to/drafter", ...}}

One engine step, as the compat wrappers drive it: ``on_finished`` (free state; the step starts) -> ``ingest``
(the verified rows into each request's context) -> ``set_batch`` (request ids and sampling params) -> ``propose``
(suffix drafts from each request's text; the policy picks each request's source; ONE batched ``draft_block``
for those that need the drafter; the policy gives each request its length) ->
``take_draft_probs`` (q for the rejection sampler).
"""
from __future__ import annotations

import json
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
from ..corpus import corpus_tokens
from ..context import ContextStore, PrefixCache
from ..drafting import draft_block, noise_keys
from ..preflight import check_dspark
from ..policy import SpeedPolicy, StepReport
from ..settings import DSparkSettings  # noqa: F401 - also imported from here by users and tests
from ..suffix import SuffixDraft, SuffixDrafter
from . import compat, metrics
from .compat import StepRows
from .metrics import ProposerStats

logger = logging.getLogger("vllm_dspark")


def step_line(report: StepReport, step: int) -> str:
    """One step of the step log as a JSON line (``rounds`` summed: drafter rounds and tokens they accepted)."""
    row = {k: round(v, 6) if isinstance(v, float) else v for k, v in vars(report).items() if k != "rounds"}
    row["rounds"], row["accepted"] = len(report.rounds), sum(a for _, a in report.rounds)
    return json.dumps({"step": step, **row}) + "\n"


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
        # per request with drafts in verification: their source ("drafter", "suffix", "splice") and suffix draft
        self._pending: dict[str, tuple[str, SuffixDraft | None]] = {}
        self.suffix = SuffixDrafter(cache_tokens=self.settings.suffix_cache_tokens)
        if self.settings.suffix_corpus and self.settings.sources != "drafter":
            self.suffix.load_corpus(corpus_tokens(self.settings.suffix_corpus, vllm_config.model_config.tokenizer))
        self.adaptive = self.settings.mode == "adaptive" and self.cfg.enable_confidence_head
        # K may exceed the drafter's block (preflight allows it when copying): past it only copied drafts run on.
        self.draft_k = min(self.num_spec_tokens, self.cfg.max_draft_tokens)
        self.policy = SpeedPolicy(self.num_spec_tokens, self.settings.probe_interval, self.settings.probe_interval_max,
                                  drafter_k=self.draft_k)
        cal = Path(self.settings.drafter) / CALIBRATION_FILE
        self.calibration = load_calibration(cal)[0] if cal.exists() else None  # from `vllm-dspark calibrate`
        self._step_start: float | None = None  # when the step in progress started
        self._step: StepReport | None = None  # the step in progress, as timed so far
        self._report: StepReport | None = None  # the step before, complete: for the policy's next decision
        self._looked = 0.0  # when the step's suffix lookups began (0: none ran)
        self._step_log = open(self.settings.step_log, "a", buffering=1) if self.settings.step_log else None

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
            if self._step_log is not None:
                self._step_log.write(step_line(self._report, self.stats.steps))
        self._step_start = now
        if self.store is None:
            return
        for r in req_ids:
            self.store.free(r)
            self._gap_reqs.pop(r, None)
            self._confidence.pop(r, None)
            self._pending.pop(r, None)
            self.suffix.finish(r)
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
        rows, rounds, emitted = [], [], 0
        for i, req_id in enumerate(step.req_ids):
            start, stop, nd = qsl[i], qsl[i + 1], drafts[i]
            ns = len(sampled_token_ids[i]) if i < len(sampled_token_ids) else 0
            emitted += ns
            if nd > 0 and ns > 0:
                stop -= nd + 1 - ns  # rejected rows
                kind, copied = self._pending.pop(req_id, ("drafter", None))
                given = 0 if copied is None else min(nd, len(copied.tokens))
                self.stats.observe_round(req_id, nd, ns - 1, self._confidence.pop(req_id, None),
                                         self.settings.record, kind=kind, copied=given)
                if copied is not None:
                    self.suffix.observe(copied, given, ns - 1)
                if kind == "drafter":  # the drafter's own rounds teach the policy what its confidences are worth
                    rounds.append((nd, ns - 1))
            if stop > start and req_id not in self._gap_reqs:
                rows.append((req_id, step.starts[i], feats[start:stop]))
        if self._step_start is not None:
            self._step = StepReport(period=0.0, forward=t0 - self._step_start, tokens=qsl[-1], batch=n_req,
                                    verified=any(drafts), rounds=rounds, emitted=emitted,
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
        if self._step is not None:
            if drafted:
                self._step.drafter, self._step.drafted = seconds, drafted
            self._step.planned = sum(map(len, out))
            self._step.plain = self.adaptive and self.policy.plain_step
            self._step.looked = bool(self._looked)
        self.stats.draft_seconds += seconds
        metrics.publish(self)
        return out

    def _propose(self, out: list[list[int]], sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray,
                 token_ids_cpu: np.ndarray | None) -> int:
        """Fill ``out`` with drafts; returns the requests the drafter ran for."""
        k = max(0, min(self.num_spec_tokens, self._budget))
        kd = min(k, self.draft_k)  # the drafter's drafts per request
        # A seeded request's output must be a function of its prompt, parameters and seed alone (vLLM users rely
        # on that): it always drafts its full cap from the drafter, with noise keyed by its seed and position; the
        # policy (timing, the batch) plans only the others, and is asked first so that a step it leaves plain
        # costs no per-request work.
        report, self._report = self._report, None
        self.stats.steps += 1
        sources = self.settings.sources
        use_suffix = sources != "drafter" and token_ids_cpu is not None
        self._looked = 0.0  # when this step's suffix lookups began (0: none ran)
        if self.adaptive:
            batch = len(sampled_token_ids) - len(self._seeds)
            drafter_ok = self.policy.begin(report, batch) > 0 and sources != "suffix"
            # copying pauses on its own verdict (judged on steps the drafter does not run)
            use_suffix = use_suffix and not self.policy.plain_step and not self.policy.copies_paused(batch)
        else:  # fixed K: the drafter alone, unless it is told to copy only
            drafter_ok, use_suffix = True, sources == "suffix" and use_suffix
        drafter_ok = drafter_ok and sources != "suffix"
        if not (drafter_ok or use_suffix or self._seeds):
            return 0
        rows, anchors, temps, caps = [], [], [], []
        for i, sampled in enumerate(sampled_token_ids):
            free = i not in self._seeds
            if not sampled or i >= len(self._batch_req_ids) or (free and not (drafter_ok or use_suffix)):
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
                temps.append(t)
        free = [j for j, i in enumerate(rows) if i not in self._seeds]
        seeded = [j for j, i in enumerate(rows) if i in self._seeds]
        if not free and not seeded:
            return 0
        if use_suffix:
            self._looked = time.perf_counter()
        copied = self._suffix_drafts(free, rows, caps, temps, num_tokens_no_spec, token_ids_cpu) if use_suffix else {}
        kind = self._sources(free, copied, caps, k, drafter_ok)
        pure = [j for j in free if kind[j] == "drafter"]
        spliced = [j for j in free if kind[j] == "splice"]
        copy_only = [j for j in free if kind[j] == "suffix"]
        drafted = pure + spliced + seeded  # the drafter's rows, in this order
        req_ids = [self._batch_req_ids[rows[j]] for j in drafted]
        block, tokens, conf = None, [], None
        want_q = False
        if drafted:
            t_flush = time.perf_counter()
            self.store.flush(req_ids)  # context rows deferred while not drafting, projected now
            self.stats.ingest_seconds += time.perf_counter() - t_flush
            device = self.drafter.fc.weight.device
            draft_temps = [temps[j] if self.settings.probabilistic else 0.0 for j in drafted]
            temperature = torch.tensor(draft_temps, dtype=torch.float32, device=device)
            want_q = self.settings.probabilistic and bool((temperature > 0).any())
            seed = torch.tensor(noise_keys(req_ids, [self._seeds.get(rows[j]) for j in drafted],
                                           [int(num_tokens_no_spec[rows[j]]) for j in drafted], self.stats.steps),
                                dtype=torch.int64, device=device)
            prefix = [copied[j].tokens if kind.get(j) == "splice" else [] for j in drafted] if spliced else None
            block = draft_block(self.drafter, self.store.gather(req_ids),
                                torch.tensor([anchors[j] for j in drafted], dtype=torch.int64, device=device),
                                kd, temperature=temperature, seed=seed, topk=self.settings.topk, return_q=want_q,
                                block_drafts=self.cfg.max_draft_tokens if self.settings.full_block else None,
                                prefix=prefix)
            tokens = [t[:kd] for t in block.tokens.tolist()]
            conf = block.confidence.tolist() if block.confidence is not None else None
        order = pure + spliced + copy_only + seeded  # free rows first: the policy plans them
        ran = len(pure) + len(spliced)
        tokens = tokens[:ran] + [copied[j].tokens for j in copy_only] + tokens[ran:]  # the seeded rows' come last
        lengths = [min(caps[j], len(tokens[pos])) for pos, j in enumerate(order)]
        planned = ran + len(copy_only)
        if self.adaptive and planned:
            survival = self._survival(block, len(pure), [copied[j] for j in spliced],
                                      [copied[j] for j in copy_only], k)
            lengths[:planned] = self.policy.lengths(survival, lengths[:planned], len(free), drafted=len(pure),
                                                    runs=len(pure) + len(spliced))
            if self._step is not None:
                self._step.expected = self.policy.last_expected
        if self.adaptive and self._looked and not drafted:
            self.policy.judge_copies(time.perf_counter() - self._looked, len(sampled_token_ids) - len(self._seeds))
        q_rows, at = [], {j: pos for pos, j in enumerate(drafted)}
        for pos, j in enumerate(order):
            i, req_id = rows[j], self._batch_req_ids[rows[j]]
            out[i] = tokens[pos][:lengths[pos]]
            source = kind.get(j, "drafter")
            if source == "drafter" and conf is not None:
                self._confidence[req_id] = conf[at[j]]
            if out[i]:
                self._pending[req_id] = (source, copied.get(j) if source != "drafter" else None)
            if source == "suffix" and want_q:
                q_rows.append((req_id, tokens[pos]))
            if self.settings.record:
                self.records.append({"req_id": req_id, "position": int(num_tokens_no_spec[i]) - 1, "anchor": anchors[j],
                                     "drafts": out[i], "source": source,
                                     "origin": copied[j].origin if source != "drafter" else None})
            self.stats.length_hist[len(out[i])] = self.stats.length_hist.get(len(out[i]), 0) + 1
        self.stats.drafted_requests += len(order)
        if self._step is not None:
            self._step.copied = sum(1 for j in copy_only if out[rows[j]])
        if want_q:
            self._last_probs = self._draft_probs(block, req_ids, q_rows, k)
        return len(drafted)

    def _suffix_drafts(self, free, rows, caps, temps, num_tokens, token_ids) -> dict[int, SuffixDraft]:
        """{row index: its suffix draft} for the free rows whose text (or a recent output) has one."""
        found = {}
        for j in free:
            i = rows[j]
            d = self.suffix.propose(self._batch_req_ids[i], token_ids[i, :int(num_tokens[i])], caps[j], temps[j] > 0)
            if d is not None:
                found[j] = d
        return found

    def _sources(self, free: list[int], copied: dict[int, SuffixDraft], caps: list[int], k: int,
                 drafter_ok: bool) -> dict[int, str]:
        """Per free row: "drafter", "splice", "suffix" or "none" (no drafts this step)."""
        if not free:
            return {}
        if not self.adaptive:
            return {j: "drafter" if drafter_ok else ("suffix" if j in copied else "none") for j in free}
        survival = np.zeros((len(free), k))
        lengths = np.zeros(len(free), dtype=np.int64)
        for r, j in enumerate(free):
            if j in copied:
                n = min(len(copied[j].tokens), k)
                survival[r, :n], lengths[r] = copied[j].survival[:n], n
        codes = self.policy.sources(survival, lengths, [caps[j] for j in free], len(free), drafter=drafter_ok)
        names = ("suffix", "drafter", "splice")
        return {j: "none" if c == 0 and j not in copied else names[c] for j, c in zip(free, codes.tolist())}

    def _survival(self, block, pure: int, spliced: list[SuffixDraft], copy_only: list[SuffixDraft],
                  k: int) -> np.ndarray:
        """[planned rows, k] survival the policy plans with: the drafter's calibrated confidences (its own rows),
        each splice's suffix survival and then the drafter's past it, then the suffix drafts' own."""
        n = pure + len(spliced)
        drafter = np.zeros((n, k))
        if n:
            kd = min(k, block.confidence_logit.shape[1])
            drafter[:, :kd] = survival(block.confidence_logit[:n, :kd].float().cpu().numpy(), self.calibration)
        out = np.zeros((n + len(copy_only), k))
        out[:n] = drafter
        for r, d in enumerate(spliced, start=pure):
            m = len(d.tokens)  # the given positions' confidence logit is +30: the drafter's product starts past them
            out[r, :m], out[r, m:] = d.survival[:m], d.survival[m - 1] * drafter[r, m:]
        for r, d in enumerate(copy_only, start=n):
            m = min(len(d.tokens), k)
            out[r, :m] = d.survival[:m]
        return out

    def _draft_probs(self, block, req_ids: list[str], q_rows: list[tuple[str, list[int]]], k: int):
        """q for vLLM's rejection sampler, [rows, k, V]: the drafter's rows, then one-hot rows for copied drafts
        (vLLM takes q for every drafting request or for none; copies may run past the drafter's block)."""
        q = block.dense_q(self.cfg.vocab_size)
        if q.shape[1] < k:
            q = torch.cat([q, q.new_zeros(q.shape[0], k - q.shape[1], q.shape[2])], dim=1)
        if q_rows:
            one_hot = q.new_zeros(len(q_rows), q.shape[1], q.shape[2])
            for r, (_, toks) in enumerate(q_rows):
                n = min(len(toks), q.shape[1])
                one_hot[r, torch.arange(n), torch.tensor(toks[:n])] = 1.0
            q = torch.cat([q, one_hot])
        return q, req_ids + [r for r, _ in q_rows]

    def take_draft_probs(self) -> tuple[torch.Tensor, list[str]] | None:
        probs, self._last_probs = self._last_probs, None
        return probs
