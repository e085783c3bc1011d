"""The speed policy: for each step, whether the batch drafts and how many drafts each request verifies.

It sees what each step cost (:class:`StepReport`, folded into the one :class:`StepCost`), what the drafter's
confidences expect at each position, and what verification accepted of it. Before drafting it compares the best
fixed block length's expected tokens per second, drafter included, with not speculating; after drafting it gives
each request its length from the drafter's confidences (paper Algorithm 1) against the same cost model. Imports
neither vLLM nor the proposer: ``vllm_dspark.policy.simulator`` drives it in tests.
"""

from __future__ import annotations

import numpy as np

from .cost import StepCost, StepReport
from .plan import plan_block_lengths

__all__ = ["DraftPause", "SpeedPolicy"]


class DraftPause:
    """Stop drafting for a while after a verdict that it does not pay: ``base`` steps, doubled after each further
    such verdict up to ``cap`` (a probe drafts, which under load costs more than it saves, so a fixed interval
    would cost a fixed share of throughput). A verdict for drafting resets it; so does the batch falling to half
    the size it had when the pause began (load fell: probe at once)."""

    def __init__(self, base: int, cap: int):
        if not 1 <= base <= cap:
            raise ValueError(f"DraftPause: expected 1 <= base <= cap; got base={base}, cap={cap}")
        self.base, self.cap = base, cap
        self.interval = base  # the length of the next pause
        self.until = 0  # first step allowed to draft
        self.batch = 0  # requests in the batch whose verdict began the pause

    def active(self, step: int, batch: int) -> bool:
        if step >= self.until:
            return False
        if 2 * batch <= self.batch:
            self.until, self.interval = 0, self.base
            return False
        return True

    def not_worth_it(self, step: int, batch: int, grow_to: int | None = None) -> None:
        """Pause from ``step``; the next pause doubles up to ``grow_to`` (default ``cap``; ``base``: no growth)."""
        cap = self.cap if grow_to is None else max(self.base, min(grow_to, self.cap))
        self.interval = min(self.interval, cap)
        self.until = step + self.interval
        self.interval = min(2 * self.interval, cap)
        self.batch = batch

    def worth_it(self) -> None:
        self.until, self.interval = 0, self.base


class SpeedPolicy:
    """``begin(report, batch)`` once per step before drafting: the report of the step before (None if there was
    none) and the requests the policy plans; returns the drafts to run per request (0: this step does not draft).
    ``lengths(survival, caps, batch)`` after drafting: how many drafts each request verifies."""

    # No verdict before the forward's cost has this many steps (one prefill and a step or two underestimated a
    # decode step ~3x on SmolLM2 and paused every engine's first steps).
    WARMUP_STEPS = 16
    # After a pause, draft until PROBE_ROWS blocks (at most PROBE_STEPS steps) were drafted before the next
    # verdict: what the drafter expects moves only while it drafts, and a verdict on one block would follow that
    # block's luck; under load one step has the blocks, and each probe step there costs more than it saves.
    PROBE_ROWS = 16
    PROBE_STEPS = 4
    # A batch size that drafted SPEC_STEPS steps without plain steps of its own (or with only stale ones, older
    # than PLAIN_EVERY steps) runs PLAIN_STEPS plain steps: the cost of not speculating is then measured, not
    # extrapolated (on this CPU a decode step of 1 token is slower than its line through larger steps).
    SPEC_STEPS = 32
    PLAIN_STEPS = 16
    PLAIN_EVERY = 4096
    # Drafter rows whose confidences make up the expected survival per position (EMA weight 1/EXPECT_ROWS per
    # row): ~64 blocks, a few steps under load, a couple of seconds at one request.
    EXPECT_ROWS = 64.0
    # A verdict against drafting this far below break-even grows the pause; nearer, the next pause stays short
    # (the verdict is within the cost model's noise, and probing is then cheap).
    GROW_BELOW = 0.95
    # Batches up to SMALL_BATCH requests pause at most SMALL_PAUSE steps: whether drafting pays for one or two
    # requests turns on what they write, which changes fast, and their probes cost little.
    SMALL_BATCH = 2
    SMALL_PAUSE = 64

    # Copying's verdict, every COPY_WINDOW steps whose lookups ran without the drafter: the seconds their plans
    # expected to save against the seconds the lookups and plans took, as EMAs over ~COPY_HORIZON such steps per
    # batch-size octave (copies come in bursts: one window without any says little). Where lookups cost more,
    # they pause like the drafter (DraftPause: doubling, at most SMALL_PAUSE for small batches, ended by the batch
    # halving).
    COPY_WINDOW = 16
    COPY_HORIZON = 256.0

    # Pseudo-counts pulling a position's trust towards the position before it (the first: towards 1): a late
    # position is verified rarely, its few outcomes would swing it, and a head's error carries over.
    TRUST_PRIOR = 5.0

    def __init__(self, k: int, pause_base: int = 32, pause_cap: int = 1024, drafter_k: int | None = None):
        """``k``: the most drafts a request verifies; ``drafter_k`` (default k): the most the drafter drafts (past
        it only copied drafts run on)."""
        if k < 1 or (drafter_k is not None and not 1 <= drafter_k <= k):
            raise ValueError(f"SpeedPolicy: expected 1 <= drafter_k <= k, got k={k}, drafter_k={drafter_k}")
        self.k = k
        self.drafter_k = k if drafter_k is None else drafter_k
        self.cost = StepCost()
        self.pause = DraftPause(pause_base, pause_cap)
        self.expected: np.ndarray | None = None  # [K] mean survival per position the drafter's confidences give
        self._expect_rows = 0.0  # rows it averages (up to EXPECT_ROWS)
        # Per position, drafts accepted / the survival the plans counted on for them (EMA sums): how far the
        # confidences bear out, i.e. an online calibration.
        self._accepted, self._counted = np.zeros(k), np.zeros(k)
        # step -> survival the plan of that step counted on; its drafts are verified in the next step, whose
        # report comes to the step after that
        self._counting: dict[int, np.ndarray] = {}
        self.step = 0
        self._probe_left = 0
        self._plain_until = 0
        self._seen: dict[int, list[int]] = {}  # batch -> [speculative steps, plain steps, step of the last plain]
        self.plain_step = False  # this step measures what not speculating costs: no drafts from any source
        self.last_expected = 0.0  # accepted drafts the last plan expected (lengths)
        self.last_saved = 0.0  # seconds the last plan expected to save against not speculating (lengths)
        self.copy_pause = DraftPause(pause_base, pause_cap)
        self._copy: dict[int, list] = {}  # batch octave -> [steps judged, EMA seconds saved, EMA seconds spent]

    # ------------------------------------------------------------------------------------------------ observe
    def observe(self, report: StepReport) -> None:
        self.cost.observe(report)
        counted = self._counting.pop(self.step - 1, None)
        self._counting = {s: c for s, c in self._counting.items() if s >= self.step}
        if report.verified and counted is not None:
            decay = 0.995  # ~140 verifying steps
            accepted = np.zeros(self.k)
            for _, a in report.rounds:
                accepted[:min(a, self.k)] += 1
            self._accepted = decay * self._accepted + accepted
            self._counted = decay * self._counted + counted
        if not report.prefill:
            seen = self._seen.setdefault(report.batch, [0, 0, 0])
            if report.speculative:
                seen[0] += 1
            else:
                seen[1], seen[2] = seen[1] + 1, self.step

    def trust(self) -> np.ndarray:
        """[K] accepted / expected of the drafts verified lately at each position (1 before any), in [0.02, 2]."""
        out, prior, m = np.empty(self.k), 1.0, self.TRUST_PRIOR
        for j in range(self.k):
            prior = out[j] = min(2.0, max(0.02, (self._accepted[j] + m * prior) / (self._counted[j] + m)))
        return out

    # ------------------------------------------------------------------------------------------------ decide
    def begin(self, report: StepReport | None, batch: int) -> int:
        if report is not None:
            self.observe(report)
        self.step += 1
        self.plain_step = batch > 0 and (self.step < self._plain_until or self._wants_plain(batch))
        if self.plain_step and self.step >= self._plain_until:
            self._plain_until = self.step + self.PLAIN_STEPS
        if batch <= 0 or self.plain_step:
            return 0
        if self.pause.active(self.step, batch):
            return 0
        if self._probe_left > 0:
            self._probe_left -= 1
            return self.k
        if len(self.cost) < self.WARMUP_STEPS or self.expected is None:
            return self.k
        gain = self.gain(batch)
        if gain > 1.0:
            self.pause.worth_it()
            return self.k
        grow_to = self.SMALL_PAUSE if batch <= self.SMALL_BATCH else None
        self.pause.not_worth_it(self.step, batch, grow_to if gain < self.GROW_BELOW else self.pause.base)
        self._probe_left = min(self.PROBE_STEPS, -(-self.PROBE_ROWS // batch))
        self._expect_rows = 0.0  # the probe's blocks alone will say what the drafter expects now
        return 0

    def copies_paused(self, batch: int) -> bool:
        """Whether this step skips suffix lookups (call after :meth:`begin`)."""
        return self.copy_pause.active(self.step, batch)

    def judge_copies(self, spent: float, batch: int) -> None:
        """After a step's lookups without the drafter: ``spent`` seconds they (and the plan) took, against
        :attr:`last_saved` (0 when nothing was planned)."""
        ema = self._copy.setdefault(max(1, batch).bit_length(), [0, 0.0, 0.0])
        w = max(1.0 / self.COPY_HORIZON, 1.0 / (ema[0] + 1))
        ema[0] += 1
        ema[1] += w * (self.last_saved - ema[1])
        ema[2] += w * (spent - ema[2])
        self.last_saved = 0.0
        if ema[0] % self.COPY_WINDOW:
            return
        if ema[1] < ema[2]:
            grow_to = self.SMALL_PAUSE if batch <= self.SMALL_BATCH else None
            self.copy_pause.not_worth_it(self.step + 1, batch, grow_to)  # from the next step
        else:
            self.copy_pause.worth_it()

    def _wants_plain(self, batch: int) -> bool:
        spec, plain, last = self._seen.get(batch, (0, 0, 0))
        # half the window suffices: its first step still verifies the drafts of the step before
        return spec >= self.SPEC_STEPS and (plain < self.PLAIN_STEPS // 2 or self.step - last > self.PLAIN_EVERY)

    def gain(self, batch: int) -> float:
        """Predicted tokens/s of the best fixed block length, drafter included, over not speculating."""
        if self.expected is None:
            return float("inf")
        survival = np.cumsum(np.minimum(self.expected * self.trust(), 1.0))
        tokens = batch * (1 + np.arange(1, self.k + 1))
        with_drafts = batch * (1 + survival) / self.cost.seconds_many(tokens, batch, batch)
        plain = batch / self.cost.seconds(batch, batch, 0)
        return float(with_drafts.max() / plain)

    def drafter_survival(self) -> np.ndarray:
        """[K] what a drafter row is expected to survive, position by position (before it drafts)."""
        if self.expected is None:  # nothing drafted yet: a modest guess, so that the drafter gets to run
            out = np.cumprod(np.full(self.k, 0.5))
        else:
            out = np.minimum(self.expected * self.trust(), 1.0)
        out[self.drafter_k:] = 0.0
        return out

    def sources(self, suffix, suffix_lengths, caps, batch: int, drafter: bool = True) -> np.ndarray:
        """Per request, where its drafts come from: 0 = its suffix draft alone (or none), 1 = the drafter,
        2 = a splice (its suffix draft, then the drafter continuing from it).

        ``suffix`` [R, K]: the survival of each request's suffix draft (0 past its ``suffix_lengths``). The
        drafter's rows are expected to survive :meth:`drafter_survival`; a splice keeps the suffix draft's
        survival and multiplies on the drafter's conditionals past it. Requests are ranked by what the drafter
        adds to them; the number n that run it is the one whose Algorithm-1 plan, drafter time included, is
        fastest (n = 0 when ``drafter`` is False)."""
        suffix = np.asarray(suffix, dtype=np.float64)
        rows, k = suffix.shape
        codes = np.zeros(rows, dtype=np.int64)
        if not drafter or rows == 0:
            return codes
        d = self.drafter_survival()[:k]
        lengths = np.asarray(suffix_lengths, dtype=np.int64)
        splice = suffix.copy()
        for r in np.flatnonzero((lengths > 0) & (lengths < min(k, self.drafter_k))):  # the drafter continues it
            n = lengths[r]
            splice[r, n:] = suffix[r, n - 1] * d[n:] / max(d[n - 1], 1e-9)
        use_splice = splice.sum(1) > d.sum()
        best = np.where(use_splice[:, None], splice, d[None, :])
        codes_if = np.where(use_splice, 2, 1)
        gain = best.sum(1) - suffix.sum(1)
        order = np.argsort(-gain, kind="stable")
        positive = int((gain > 0).sum())
        counts = sorted({0, positive} | {n for n in (1, 2, 4, 8, 16, 32, 64, 128) if n < positive})
        top, best_n = -1.0, 0
        for n in counts:
            planned = suffix.copy()
            planned[order[:n]] = best[order[:n]]
            theta = plan_block_lengths(planned, self.cost.steps_per_second(batch, drafted=n), caps,
                                       scan=True).throughput
            if theta > top:
                top, best_n = theta, n
        codes[order[:best_n]] = codes_if[order[:best_n]]
        if best_n == 0 and not lengths.any():
            # no copies, and the drafter alone does not pay at this load: the verdict begin() would give, had the
            # drafter drafted before (without it the drafter was offered, and ranked out, at every step)
            grow_to = self.SMALL_PAUSE if batch <= self.SMALL_BATCH else None
            self.pause.not_worth_it(self.step + 1, batch, grow_to)
        return codes

    def lengths(self, survival, caps, batch: int, drafted: int | None = None, runs: int | None = None) -> list[int]:
        """Drafts to verify per request (rows of ``survival`` [R, K]), capped by ``caps`` [R]; the first ``drafted``
        rows (default all) are the drafter's own drafts (its confidences: trust applies, and they teach what it
        expects), the others come from elsewhere (suffix drafts, splices). ``runs``: requests the drafter ran
        for (default ``drafted``), for its cost. ``batch``: requests in the step; those past the rows of
        ``survival`` have no drafts and run a token each."""
        survival = np.asarray(survival, dtype=np.float64)
        rows = survival.shape[0] if drafted is None else drafted
        width = min(self.k, survival.shape[1])
        planned = survival.copy()
        planned[:rows, :width] = np.minimum(survival[:rows, :width] * self.trust()[:width], 1.0)
        rate = self.cost.steps_per_second(batch, drafted=rows if runs is None else runs)
        # The batch's other requests (no drafts to plan) run in the same step, a token each: the plan prices
        # the whole step (without them a few copied drafts looked cheap under load: a step of their rows alone).
        others = max(0, batch - planned.shape[0])
        plan = plan_block_lengths(np.vstack([planned, np.zeros((others, planned.shape[1]))]), rate,
                                  np.concatenate([np.asarray(caps, dtype=np.int64), np.zeros(others, np.int64)]),
                                  scan=True)
        lengths = plan.lengths[:planned.shape[0]]
        # its expected tokens at the plan's rate, against a plain step's (no drafts, no drafter) rate
        plain = batch * self.cost.steps_per_second(batch, drafted=0)(batch) if batch else 0.0
        self.last_saved = max(0.0, plan.expected_tokens / plain - plan.expected_tokens / plan.throughput) \
            if plain > 0 and plan.throughput > 0 else 0.0
        # the drafts these lengths are expected to have accepted (the step log compares it with what was)
        self.last_expected = float((planned * (np.arange(planned.shape[1])[None, :] < lengths[:, None])).sum())
        if rows:
            mine = np.zeros(self.k)
            mine[:width] = survival[:rows, :width].mean(0)
            w = rows / (rows + self._expect_rows)
            self._expect_rows = min(self.EXPECT_ROWS, self._expect_rows + rows)
            self.expected = mine if self.expected is None else (1 - w) * self.expected + w * mine
            slots = np.arange(survival.shape[1])[None, :] < lengths[:rows, None]
            counted = np.zeros(self.k)
            counted[:width] = (survival[:rows] * slots)[:, :width].sum(0)
            self._counting[self.step] = counted
        return lengths.tolist()
