"""Triton kernels of vllm-dspark, each next to its torch reference (installed as ``vllm_dspark_kernels``).

Importing the package never imports triton: the kernel modules (``markov_head_triton``) load on the first
call that needs a kernel, so the torch references work, and import fast, on machines without triton.
"""

from .markov_head import MarkovHeadOutput, markov_head, markov_head_reference

__all__ = ["MarkovHeadOutput", "markov_head", "markov_head_reference"]
