"""`vllm-dspark eval`, `calibrate` and `bench` end to end on the tiny target in a real vLLM CPU engine.

Untrained drafters accept next to nothing; what matters here is that every number is accounted for (our
rounds equal vLLM's counters, field by field), the reports are well formed, and speculation stays lossless.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from vllm_dspark.checkpoint import init_drafter

pytestmark = pytest.mark.vllm

K = 3
PROMPTS = [
    {"prompt": "Once upon a time in a small town there was a man who", "category": "story",
     "turns": ["Once upon a time in a small town there was a man who", "Then what did he say about the water"]},
    {"prompt": "Write three words about the long day", "category": "writing",
     "turns": ["Write three words about the long day", "Now make them shorter"]},
    {"prompt": "What is the number of people in the home", "category": "math",
     "turns": ["What is the number of people in the home", "And how many were there before"]},
    {"prompt": "Tell me about the sound of the water at the end of the day", "category": "story",
     "turns": ["Tell me about the sound of the water at the end of the day", "Say it again with other words"]},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("eval-bench")
    dspark = root / "drafter"
    ablation = root / "ablation"
    init_drafter(tiny_llama_dir, dspark, num_layers=1, markov_rank=16, block_size=4, num_target_layer_ids=2)
    init_drafter(tiny_llama_dir, ablation, num_layers=1, markov_rank=0, block_size=4, num_target_layer_ids=2)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({k: v for k, v in p.items() if k != "turns"}) + "\n" for p in PROMPTS))
    two_turns = root / "two_turns.jsonl"
    two_turns.write_text("".join(json.dumps({"turns": p["turns"], "category": p["category"]}) + "\n" for p in PROMPTS))
    return {"target": str(tiny_llama_dir), "dspark": dspark, "ablation": ablation, "prompts": str(prompts),
            "two_turns": str(two_turns), "root": root}


def _in_unit(values) -> bool:
    return all(v is None or 0.0 <= v <= 1.0 for v in values)


def test_eval_report_matches_vllm_counters(vllm_env, setup, tmp_path):
    from vllm_dspark.eval.evaluate import main

    out = tmp_path / "eval"
    rc = main(["--target", setup["target"], "--drafter", str(setup["dspark"]), "--drafter", str(setup["ablation"]),
               "--label", "dspark", "--label", "ablation", "--prompts", setup["prompts"], "--max-tokens", "16",
               "-k", str(K), "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["command"].startswith("vllm-dspark eval --target")
    assert set(report["drafters"]) == {"dspark", "ablation"}
    for label, e in report["drafters"].items():
        assert e["k"] == K
        assert len(e["acceptance_conditional"]) == K and len(e["acceptance_survival"]) == K
        assert _in_unit(e["acceptance_conditional"]) and _in_unit(e["acceptance_survival"])
        assert e["acceptance_survival"][0] is not None
        assert e["tau"] >= 1.0
        # 4 prompts x 16 tokens: most steps verify a round.
        assert e["num_rounds"] >= 4 * 8
        assert set(e["per_category_tau"]) == {"story", "writing", "math"}
        assert all(t >= 1.0 for t in e["per_category_tau"].values())
        assert e["drafter_config"]["markov_rank"] == (16 if label == "dspark" else 0)
        ours, vllm = e["our_counters"], e["vllm_counters"]
        assert ours["num_drafts"] == vllm["num_drafts"] == e["num_rounds"]
        assert ours["num_draft_tokens"] == vllm["num_draft_tokens"]
        assert ours["num_accepted_tokens"] == vllm["num_accepted_tokens"]
        assert ours["accepted_per_pos"] == vllm["accepted_per_pos"] and len(vllm["accepted_per_pos"]) == K
        assert e["counters_agree"] is True and e["per_request_agree"] is True
        cal = e["calibration"]
        assert cal is not None and cal["calibrated"] is None  # confidence head present, no calibration file
        assert len(cal["raw"]["ece"]) == K and _in_unit(cal["raw"]["ece"])
        assert cal["raw"]["count"][0] == e["num_rounds"]
    for png in ("conditional_acceptance.png", "survival.png", "reliability_dspark.png", "reliability_ablation.png"):
        assert (out / png).stat().st_size > 1000, png


def test_calibrate_turn2_writes_calibration(vllm_env, setup, tmp_path, capsys):
    from vllm_dspark.eval.evaluate import calibrate_main
    from vllm_dspark.calibration import CALIBRATION_FILE, load_calibration

    drafter = tmp_path / "drafter"
    shutil.copytree(setup["dspark"], drafter)
    out = tmp_path / "eval"
    rc = calibrate_main(["--target", setup["target"], "--drafter", str(drafter), "--prompts", setup["two_turns"],
                         "--turn", "2", "--max-tokens", "12", "-k", str(K), "--out", str(out)])
    assert rc == 0
    temps, meta = load_calibration(drafter / CALIBRATION_FILE)
    assert temps.shape == (K,) and meta["turn"] == 2 and meta["num_rounds"] > 0
    assert "mean ECE" in capsys.readouterr().out
    e = json.loads((out / "report.json").read_text())["drafters"]["drafter"]
    assert e["counters_agree"] and e["per_request_agree"]
    cal = e["calibration"]
    assert cal["temperatures"] == pytest.approx(temps.tolist())
    # Sequential temperature scaling minimises ECE position by position on this very data.
    assert cal["calibrated"]["ece_mean"] <= cal["raw"]["ece_mean"] + 1e-9


def test_bench_cells_ratios_and_lossless(vllm_env, setup, tmp_path, capsys):
    from vllm_dspark.eval.bench import main

    out = tmp_path / "bench"
    methods = ("none", "ngram", "dspark", "dspark-k2")
    rc = main(["--target", setup["target"], "--drafter", str(setup["dspark"]), "--methods", ",".join(methods),
               "--concurrency", "1,2", "--rounds", "1", "--num-prompts", "4", "--max-tokens", "16", "-k", str(K),
               "--prompts", setup["prompts"], "--max-model-len", "256", "--out", str(out), "--step-logs"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    cells = {(r["method"], r["concurrency"]): r for r in report["results"]}
    # --step-logs: a log per DSpark engine (warm-up and both cells), its summary printed after the table
    assert sorted(p.name for p in out.glob("steps-*.jsonl")) == ["steps-dspark-k2.jsonl", "steps-dspark.jsonl"]
    fixed_steps = [json.loads(line) for line in (out / "steps-dspark-k2.jsonl").read_text().splitlines()]
    decode = [s for s in fixed_steps if not s["prefill"]]
    assert len(decode) >= 16 and all(s["verified"] and s["tokens"] > s["batch"] for s in decode)
    assert sum(s["emitted"] for s in fixed_steps) <= sum(sum(c["generated_tokens"]) for (m, _), c in cells.items()
                                                          if m == "dspark-k2") + 2 * 8  # + warm-up tokens
    printed = capsys.readouterr().out
    assert f"dspark-k2: {out / 'steps-dspark-k2.jsonl'}" in printed and "spec/plain" in printed
    assert set(cells) == {(m, c) for m in methods for c in (1, 2)}
    for (m, c), r in cells.items():
        assert r["tokens_per_s"] > 0 and len(r["samples"]) == 1
        assert (r["spec_rounds"] is None) == (m == "none")
        assert r["tau"] is None or r["tau"] >= 1.0
        assert sum(r["generated_tokens"]) > 0
        assert (r["spec_rounds_per_round"] == [None]) == (m == "none")
    # Fixed K=2: every step of every request drafts (the adaptive default may draft nothing for an untrained
    # drafter whose confidence head promises little).
    assert cells[("dspark-k2", 1)]["spec_rounds"] >= 4 * 8 and cells[("dspark-k2", 1)]["tau"] >= 1.0
    assert set(report["ratios"]) == set(methods) - {"none"}
    assert all(set(v) == {"1", "2"} and all(x > 0 for x in v.values()) for v in report["ratios"].values())
    assert report["outputs_identical"] is True  # methods interleaved in time slices (the default)
    assert "time slices" in report["config"]["order"]
    assert report["config"]["methods"]["dspark"]["speculative_config"]["num_speculative_tokens"] == K
    fixed = report["config"]["methods"]["dspark-k2"]
    assert fixed["speculative_config"]["num_speculative_tokens"] == 2
    assert fixed["additional_config"]["dspark"]["mode"] == "fixed"
    assert (out / "throughput.png").is_file() and (out / "throughput_vs_concurrency.png").is_file()


def test_bench_method_names():
    import argparse

    from vllm_dspark.eval.bench import method_kwargs

    args = argparse.Namespace(drafter="/d", ablation=None, k=None)
    fixed = {"drafter": "/d", "record": False, "mode": "fixed"}
    assert method_kwargs("dspark-k3", args)["speculative_config"]["num_speculative_tokens"] == 3
    assert method_kwargs("dspark-k3", args)["additional_config"]["dspark"] == fixed  # dspark-kN = fixed K
    assert method_kwargs("dspark-fixed-k3", args)["additional_config"]["dspark"] == fixed
    adaptive = method_kwargs("dspark-adaptive-k5", args)
    assert adaptive["speculative_config"]["num_speculative_tokens"] == 5
    assert "mode" not in adaptive["additional_config"]["dspark"]  # the plugin's default: adaptive
    assert method_kwargs("ngram-k2", args)["speculative_config"]["num_speculative_tokens"] == 2
    assert method_kwargs("dspark-suffix", argparse.Namespace(drafter="/d", ablation=None, k=7))[
        "additional_config"]["dspark"] == {"drafter": "/d", "record": False, "sources": "suffix"}
    assert method_kwargs("dspark-suffix-k4", args)["additional_config"]["dspark"] == dict(fixed, sources="suffix")
    assert method_kwargs("dspark-drafter-k4", args)["additional_config"]["dspark"] == fixed  # fixed K: the drafter
    with_k = argparse.Namespace(drafter="/d", ablation=None, k=7)
    assert method_kwargs("dspark-drafter", with_k)["additional_config"]["dspark"]["sources"] == "drafter"
    assert "sources" not in method_kwargs("dspark", with_k)["additional_config"]["dspark"]  # default: hybrid
    assert method_kwargs("none", args) == {} and method_kwargs("none@b", args) == {}
    assert method_kwargs("dspark-k3@2", args) == method_kwargs("dspark-k3", args)
    from vllm_dspark.eval.bench import cell_prompts

    sized = argparse.Namespace(num_prompts=64, min_prompts=8)
    assert [cell_prompts(sized, c) for c in (1, 4, 16, 32, 64)] == [8, 8, 32, 64, 64]
    assert cell_prompts(argparse.Namespace(num_prompts=16, min_prompts=0), 1) == 16
    with pytest.raises(SystemExit, match="needs --ablation"):
        method_kwargs("dspark-ablation", args)
    with pytest.raises(SystemExit, match="unknown method 'eagle'"):
        method_kwargs("eagle", args)


def test_report_accounting_with_acceptance(tmp_path):
    """The report maths on known rounds with real acceptance (untrained drafters above accept ~nothing)."""
    from vllm_dspark.eval.evaluate import EvalRun, drafter_report
    from vllm_dspark.calibration import save_calibration

    (tmp_path / "config.json").write_text(json.dumps({"markov_rank": 16}))
    rounds = [(0, 3, 3, [0.9, 0.8, 0.7], "drafter"), (1, 3, 2, [0.9, 0.5, 0.4], "drafter"),
              (0, 3, 0, [0.2, 0.3, 0.3], "drafter"), (1, 2, 2, [0.8, 0.8], "drafter")]
    vllm = {"num_drafts": 4, "num_draft_tokens": 11, "num_accepted_tokens": 7, "accepted_per_pos": [3, 3, 1]}
    run = EvalRun("x", str(tmp_path), 3, ["math", "writing"], rounds, vllm, True, 0, 1.0)
    entry, bins = drafter_report(run)
    assert entry["tau"] == pytest.approx((4 + 3 + 1 + 3) / 4)
    assert entry["per_category_tau"] == {"math": pytest.approx(2.5), "writing": pytest.approx(3.0)}
    assert entry["per_source_tau"] == {"drafter": pytest.approx(11 / 4)}
    assert entry["acceptance_conditional"] == pytest.approx([3 / 4, 3 / 3, 1 / 2])
    assert entry["acceptance_survival"] == pytest.approx([3 / 4, 3 / 4, 1 / 3])
    assert entry["our_counters"] == vllm and entry["counters_agree"] is True
    assert entry["drafter_config"] == {"markov_rank": 16}
    assert entry["calibration"]["calibrated"] is None and set(bins) == {"raw"}
    assert entry["calibration"]["raw"]["count"] == [4, 4, 3]

    save_calibration(tmp_path, [2.0, 1.0, 0.5])
    off_by_one = dict(vllm, accepted_per_pos=[3, 2, 1])
    entry, bins = drafter_report(EvalRun("x", str(tmp_path), 3, ["math", "writing"], rounds, off_by_one, True, 0, 1.0))
    assert entry["counters_agree"] is False and entry["counters_agree_by_field"]["accepted_per_pos"] is False
    assert entry["calibration"]["temperatures"] == [2.0, 1.0, 0.5] and set(bins) == {"raw", "calibrated"}
    assert len(entry["calibration"]["calibrated"]["ece"]) == 3


def test_report_tau_per_source_and_calibration_from_the_drafters_rounds_only(tmp_path):
    """A hybrid run: tau per source; the confidence calibration sees the drafter's own rounds only."""
    from vllm_dspark.eval.evaluate import EvalRun, confidence_arrays, drafter_report

    rounds = [(0, 3, 3, [0.9, 0.8, 0.7], "drafter"), (1, 4, 4, [], "suffix"), (0, 3, 1, [], "splice"),
              (1, 2, 0, [0.3, 0.2], "drafter"), (0, 2, 1, [], "suffix")]
    vllm = {"num_drafts": 5, "num_draft_tokens": 14, "num_accepted_tokens": 9, "accepted_per_pos": [4, 2, 2, 1]}
    run = EvalRun("x", str(tmp_path), 4, ["math", "writing"], rounds, vllm, True, 0, 1.0)
    entry, _ = drafter_report(run)
    assert entry["per_source_tau"] == {"drafter": pytest.approx(2.5), "suffix": pytest.approx(3.5),
                                       "splice": pytest.approx(2.0)}
    assert entry["counters_agree"] is True
    z, drafted, accepted = confidence_arrays(run)
    assert drafted.tolist() == [3, 2] and accepted.tolist() == [3, 0]
    assert z[1, :2] == pytest.approx(np.log([0.3, 0.2]) - np.log1p(-np.array([0.3, 0.2])))
