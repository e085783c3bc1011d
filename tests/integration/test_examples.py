"""The examples start where a user starts them: here, on a machine whose memory is half taken by others."""
from __future__ import annotations

import gc
import importlib.util
from pathlib import Path

import pytest

from vllm_dspark import memory

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
pytestmark = pytest.mark.vllm


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def half_the_memory_taken(monkeypatch):
    """vLLM's CPU worker and our sizing both see only half of the node's memory available."""
    import vllm.v1.worker.cpu_worker as cpu_worker

    real = cpu_worker.get_memory_node_info

    def info(node_id: int = 0):
        got = real(node_id)
        return type(got)(total_memory=got.total_memory, available_memory=min(got.available_memory,
                                                                              got.total_memory // 2))

    monkeypatch.setattr(cpu_worker, "get_memory_node_info", info)
    total = real(0).total_memory
    monkeypatch.setattr(memory, "available_bytes", lambda: total // 2)
    monkeypatch.setattr(memory, "MAX_BYTES", memory.GiB // 2)  # a small cache: the test machine is shared
    monkeypatch.delenv(memory.USER_ENV, raising=False)
    return total


def test_offline_example_starts_with_half_the_memory_taken(vllm_env, half_the_memory_taken, tiny_llama_dir,
                                                            tmp_path, monkeypatch):
    from vllm import LLM, SamplingParams

    from vllm_dspark.checkpoint import init_drafter

    monkeypatch.delenv(memory.USER_ENV, raising=False)  # vllm_env set it; the example must size the cache itself
    small = dict(enforce_eager=True, max_model_len=256, seed=0)
    # The control: vLLM's own default (92% of the total memory) refuses to start here.
    with pytest.raises(ValueError, match="less than desired CPU memory utilization"):
        LLM(str(tiny_llama_dir), dtype="float32", **small)
    gc.collect()
    drafter = tmp_path / "drafter"
    init_drafter(tiny_llama_dir, drafter, num_layers=1, markov_rank=16, block_size=4, num_target_layer_ids=2)
    llm = _example("offline_llm").build_llm(tiny_llama_dir, drafter, k=3, **small)
    want = memory.kv_cache_bytes(half_the_memory_taken // 2)
    assert llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes == want
    assert want == memory.GiB // 2
    out = llm.generate(["Hello world, the"], SamplingParams(max_tokens=8, temperature=0))
    assert len(out[0].outputs[0].token_ids) >= 1
    del llm
    gc.collect()


@pytest.mark.parametrize("available_gib, want_gib", [(0.5, 0.25), (2, 0.5), (11.5, 2.875), (64, 4)])
def test_kv_cache_size_is_a_quarter_of_the_available_memory_within_bounds(available_gib, want_gib):
    assert memory.kv_cache_bytes(int(available_gib * memory.GiB)) == int(want_gib * memory.GiB)


def test_the_users_kv_cache_setting_wins(monkeypatch):
    monkeypatch.setenv(memory.USER_ENV, "3")
    assert memory.llm_kwargs() == {}
    monkeypatch.delenv(memory.USER_ENV)
    assert memory.llm_kwargs(available=8 * memory.GiB) == {"kv_cache_memory_bytes": 2 * memory.GiB}


def test_serve_sizes_the_kv_cache_unless_the_user_did(monkeypatch, capsys):
    from vllm_dspark.integration.serve import with_kv_cache_size

    monkeypatch.delenv(memory.USER_ENV, raising=False)
    args = with_kv_cache_size(["m", "--port", "1"], available=8 * memory.GiB)
    assert args == ["m", "--port", "1", "--kv-cache-memory-bytes", str(2 * memory.GiB)]
    assert "KV cache 2.00 GiB (25% of the 8.0 GiB available" in capsys.readouterr().err
    for user in (["--kv-cache-memory-bytes", "1000000"], ["--gpu-memory-utilization=0.5"],
                 ["--gpu_memory_utilization", "0.5"]):
        assert with_kv_cache_size(["m", *user], available=8 * memory.GiB) == ["m", *user]
    monkeypatch.setenv(memory.USER_ENV, "1")
    assert with_kv_cache_size(["m"], available=8 * memory.GiB) == ["m"]


def test_openai_client_example_takes_port_and_base_url(monkeypatch):
    calls = []

    class FakeOpenAI:
        def __init__(self, base_url, api_key):
            calls.append(base_url)
            raise SystemExit(0)

    import openai

    monkeypatch.setattr(openai, "OpenAI", FakeOpenAI)
    example = _example("serve_openai_client")
    for argv, url in ((["--port", "9001"], "http://127.0.0.1:9001/v1"),
                      (["--base-url", "http://h:1/v1"], "http://h:1/v1"), ([], "http://127.0.0.1:8000/v1")):
        monkeypatch.setattr("sys.argv", ["serve_openai_client.py", *argv])
        with pytest.raises(SystemExit):
            example.main()
        assert calls[-1] == url
