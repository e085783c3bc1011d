"""The speed policy: which requests draft and how many drafts each verifies, from what steps cost and accept.

``cost``: the one cost model of a step; ``plan``: Algorithm 1 (per-request lengths against it); ``policy``:
the decisions; ``simulator``: a fake engine to test them. Imports neither vLLM nor the proposer.
"""
from .cost import LinearCost, StepCost, StepReport
from .plan import BlockPlan, choose_block_lengths, fixed_block_lengths, plan_block_lengths
from .policy import DraftPause, SpeedPolicy

__all__ = ["BlockPlan", "DraftPause", "LinearCost", "SpeedPolicy", "StepCost", "StepReport",
           "choose_block_lengths", "fixed_block_lengths", "plan_block_lengths"]
