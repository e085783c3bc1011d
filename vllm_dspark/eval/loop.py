"""Closed-loop load for `vllm-dspark bench`: at most c requests in flight per engine, engines taking turns.

Two ways requests join (``ramp``):

* all at once (default): the first c prompts join before the first step, and each later prompt as soon as one
  finishes. With equal output lengths (every answer runs to ``max_tokens``) an engine that does not speculate
  then moves in lockstep waves: c prompts prefilled in one step, c requests finishing in one step, no tail.
* ramped: at most one request joins per step. The first c are spread over c steps, so requests finish spread
  out and join one at a time, as they do on a server at steady state, for every engine alike.
"""
from __future__ import annotations

import itertools
import time
from typing import Any

__all__ = ["ClosedLoop", "generate_closed_loop", "generate_interleaved"]

_request_ids = itertools.count()


class ClosedLoop:
    """One engine generating every prompt with at most ``concurrency`` requests in flight: whenever a request
    finishes, the next prompt is added before the next step (``ramp``: at most one per step). ``run(seconds)``
    steps it for a time slice. ``trace``: keep (seconds, requests in flight, requests that joined, tokens gained,
    first step of a ``run`` call) per step in ``steps``."""

    def __init__(self, llm, prompts: list[dict], params, concurrency: int, ramp: bool = False, trace: bool = False):
        if concurrency < 1:
            raise ValueError(f"ClosedLoop: concurrency={concurrency}: expected >= 1")
        self.engine, self.prompts, self.params, self.concurrency = llm.llm_engine, prompts, params, concurrency
        self.ramp, self.trace = ramp, trace
        self.todo = list(range(len(prompts)))[::-1]
        self.inflight: dict[str, int] = {}
        self.outputs: list = [None] * len(prompts)
        self.seconds = 0.0  # wall time spent in run()
        self.steps: list[tuple[float, int, int, int, bool]] = []
        self._lengths: dict[str, int] = {}  # tokens each request had at its last output (trace)

    @property
    def done(self) -> bool:
        return not (self.todo or self.inflight)

    def run(self, seconds: float = float("inf")) -> None:
        """Step until done, or until at least ``seconds`` have passed (whole steps)."""
        t0 = time.perf_counter()
        first = True
        while not self.done:
            joined = 0
            while self.todo and len(self.inflight) < self.concurrency and not (self.ramp and joined):
                i = self.todo.pop()
                rid = f"bench{next(_request_ids)}"
                self.engine.add_request(rid, self.prompts[i], self.params)
                self.inflight[rid] = i
                joined += 1
            batch, t_step = len(self.inflight), time.perf_counter()
            gained = 0
            for out in self.engine.step():
                if self.trace:
                    n = len(out.outputs[0].token_ids)
                    gained += n - self._lengths.get(out.request_id, 0)
                    self._lengths[out.request_id] = n
                if out.finished:
                    self.outputs[self.inflight.pop(out.request_id)] = out
                    self._lengths.pop(out.request_id, None)
            if self.trace:
                self.steps.append((time.perf_counter() - t_step, batch, joined, gained, first))
            first = False
            if time.perf_counter() - t0 >= seconds:
                break
        self.seconds += time.perf_counter() - t0


def generate_closed_loop(llm, prompts: list[dict], params, concurrency: int,
                         ramp: bool = False) -> tuple[list, float]:
    """Generate every prompt with at most ``concurrency`` requests in flight; -> (outputs in prompt order, s)."""
    loop = ClosedLoop(llm, prompts, params, concurrency, ramp)
    loop.run()
    return loop.outputs, loop.seconds


def generate_interleaved(llms: dict[str, Any], prompts: list[dict], params, concurrency: int,
                         slice_seconds: float, ramp: bool = False,
                         trace: dict[str, list] | None = None) -> dict[str, tuple[list, float]]:
    """Each engine's closed loop over the same prompts, the engines taking turns in time slices of
    ``slice_seconds`` (A B C A B C ...) until all are done: the machine's drift within the run hits every engine
    alike. -> {name: (outputs in prompt order, seconds that engine ran)}. A paused engine only waits: our proposer
    does not count the wait as a step's cost (``policy.StepCost``). ``trace``: filled with each engine's steps
    (see :class:`ClosedLoop`; the first step of a slice pays for the pause before it)."""
    loops = {n: ClosedLoop(llm, prompts, params, concurrency, ramp, trace is not None) for n, llm in llms.items()}
    while not all(loop.done for loop in loops.values()):
        for loop in loops.values():
            if not loop.done:
                loop.run(slice_seconds)
    if trace is not None:
        trace.update({n: loop.steps for n, loop in loops.items()})
    return {n: (loop.outputs, loop.seconds) for n, loop in loops.items()}
