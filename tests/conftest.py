"""Shared fixtures: tiny random target models vLLM's CPU backend can load, the real SmolLM2, and a vLLM env.

- ``tiny_llama_dir`` / ``tiny_qwen3_dir`` (session): random LlamaForCausalLM / Qwen3ForCausalLM folders with a
  matching 512-token byte-level BPE tokenizer (ChatML template, SmolLM2's special-token ids). Built in a second;
  seeded, so every session gets the same weights. Shapes in ``TINY_SHAPE``.
- ``smooth_target`` (module): an in-memory tiny Llama at init range 0.08 whose continuations a drafter can
  learn (``build_smooth_llama``); ``own_answers`` gives its answers to random chat prompts as training rows.
- ``smollm2_dir`` (session): the converted SmolLM2-135M-Instruct folder (~30 s the first time on a machine,
  cached in ~/.cache/vllm-dspark afterwards).
- ``vllm_env``: environment for an in-process vLLM engine on CPU (small KV cache, no engine-core subprocess)
  plus default ``LLM(...)`` arguments. Mark a test ``@pytest.mark.vllm_multiprocessing`` to keep vLLM's
  default engine-core subprocess.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tiny_models import build_smooth_llama, build_tiny_model


@pytest.fixture(scope="module")
def smooth_target():
    """``build_smooth_llama()``: a tiny Llama whose continuations a small drafter can learn."""
    return build_smooth_llama()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A random 4-layer LlamaForCausalLM (hidden 128, vocab 512) with tokenizer, float32."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory) -> Path:
    """A random 4-layer Qwen3ForCausalLM (hidden 128, vocab 512) with tokenizer, float32."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as an HF folder (bf16 on disk; load with dtype="float32")."""
    from vllm_dspark.assets import smollm2_path

    return smollm2_path()


@dataclass
class VllmTestEnv:
    """What ``vllm_env`` set up: the environment variables and default ``LLM(...)`` arguments."""

    env: dict[str, str]
    llm_kwargs: dict = field(
        default_factory=lambda: dict(enforce_eager=True, dtype="float32", max_model_len=256, seed=0)
    )


@pytest.fixture
def vllm_env(request, monkeypatch) -> VllmTestEnv:
    """Environment for a fast vLLM CPU engine; restored after the test.

    1 GiB of KV cache; the engine core runs in the test process (init ~3 s instead of 30-60 s) unless the test
    is marked ``vllm_multiprocessing``. Build engines with ``LLM(model, **vllm_env.llm_kwargs)`` (eager, float32,
    max_model_len 256, seed 0).
    """
    multiprocessing = request.node.get_closest_marker("vllm_multiprocessing") is not None
    env = {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if multiprocessing else "0",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # An in-process engine left for the garbage collector by an earlier test tears down vLLM's global
    # parallel groups whenever it is finally collected, possibly in the middle of this test's engine.
    gc.collect()
    yield VllmTestEnv(env=env)
    gc.collect()


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: a second OpenMP thread only adds spin-wait, badly so on a shared, loaded CPU (~100x).
    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_configure(config):
    config.addinivalue_line("markers", "vllm_multiprocessing: vllm_env keeps vLLM's engine-core subprocess")
