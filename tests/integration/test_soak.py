"""`vllm-dspark soak`: mixed traffic against a real DSpark server and a reference server without speculation.

Checks what a user of the server would notice: no failed requests, greedy output token-identical to the
server without speculation (streamed, chat, stop strings, max_tokens=1, context-filling prompts, under
preemption and prefix caching), aborted streams handled, no per-request drafter state left behind.
"""
from __future__ import annotations

import json

import pytest

from vllm_dspark.checkpoint import init_drafter
from vllm_dspark.eval import soak

pytestmark = pytest.mark.vllm

REPORT_KEYS = ("requests", "errors", "greedy_mismatches", "greedy_compared", "aborted", "leaked_states",
               "rss_growth_mb", "duration_s", "per_kind", "server")


@pytest.fixture(scope="module")
def drafter(tiny_llama_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("soak-drafter")
    init_drafter(tiny_llama_dir, d, num_layers=1, markov_rank=16, block_size=4, num_target_layer_ids=2)
    return d


def _soak(target, drafter, out, requests: int, concurrency: int, extra: list[str] = ()) -> dict:
    # 10 KV blocks of 32 tokens for 4 requests of up to 256 tokens: the DSpark server must preempt.
    rc = soak.main(["--target", str(target), "--drafter", str(drafter), "--requests", str(requests),
                    "--out", str(out), "--concurrency", str(concurrency), "--max-model-len", "256",
                    "--block-size", "32", "--num-gpu-blocks", "10", "-k", "3", "--startup-timeout", "400",
                    "--timeout", "300", "--no-progress", *extra])
    report = json.loads((out / "report.json").read_text())
    assert rc == (0 if report["errors"] == 0 and report["greedy_mismatches"] == 0 else 1)
    return report


def _check(report: dict, requests: int) -> None:
    assert all(key in report for key in REPORT_KEYS), sorted(report)
    assert report["requests"] == requests
    assert report["errors"] == 0, report["error_samples"]
    assert report["greedy_mismatches"] == 0, report["mismatch_samples"]
    assert report["greedy_compared"] >= requests // 3
    assert report["aborted"] > 0
    assert set(report["per_kind"]) == set(soak.KINDS)
    assert report["server"]["spec_decode_num_drafts"], "the DSpark server never drafted"
    # None only while the server exports no vllm_dspark:active_requests.
    assert report["leaked_states"] in (None, 0), report["leaked_states_note"]


def test_soak_short(tiny_llama_dir, drafter, tmp_path):
    report = _soak(tiny_llama_dir, drafter, tmp_path / "soak", requests=80, concurrency=4,
                   extra=["--max-tokens", "16", "--prefix-cache-mb", "16"])
    _check(report, 80)
    assert report["onednn_primitive_cache_capacity"] == "64"  # the soak's default, set in both servers
    # Prefix-cache hits (n > 1 children, repeated prompts) and preemption leave no request without context.
    assert report["server"]["skipped_no_context"] == 0


@pytest.mark.slow
def test_soak_long(tiny_llama_dir, drafter, tmp_path):
    report = _soak(tiny_llama_dir, drafter, tmp_path / "soak", requests=1200, concurrency=8,
                   extra=["--max-tokens", "48"])
    _check(report, 1200)
    assert report["server"]["preemptions"], "10 KV blocks should force preemption"
    # A leak of per-request state shows as steady growth; allocator noise stays well below this.
    assert report["rss_growth_mb"] is not None and report["rss_growth_mb"] < 100
