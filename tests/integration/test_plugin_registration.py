"""vLLM finds and calls our plugin in every process it starts; register() is cheap, idempotent and version-gated."""
from __future__ import annotations

import importlib.machinery
import json
import logging
import os
import subprocess
import sys
import textwrap
import types

import pytest

import vllm_dspark

_FAKE_INSTALLER = "vllm_dspark_test_fake_installer"


@pytest.fixture
def fresh_plugin(monkeypatch, tmp_path):
    """register() as in a new process, with a fake installation step that counts its calls."""
    installs = []
    module = types.ModuleType(_FAKE_INSTALLER)
    module.__spec__ = importlib.machinery.ModuleSpec(_FAKE_INSTALLER, None)
    module.install = lambda: installs.append(os.getpid())
    monkeypatch.setitem(sys.modules, _FAKE_INSTALLER, module)
    monkeypatch.setattr(vllm_dspark, "_INSTALLERS", (_FAKE_INSTALLER,))
    monkeypatch.setattr(vllm_dspark, "_registered", False)
    monkeypatch.setattr(vllm_dspark, "registered_pids", [])
    monkeypatch.delenv(vllm_dspark.SKIP_VERSION_CHECK_ENV, raising=False)
    monkeypatch.setenv(vllm_dspark.REGISTRATION_LOG_ENV, str(tmp_path / "registrations.log"))
    return types.SimpleNamespace(installs=installs, log=tmp_path / "registrations.log")


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "vllm_dspark" and r.levelno >= logging.WARNING]


def test_register_twice_installs_and_records_once(fresh_plugin, caplog):
    assert not vllm_dspark.registered()
    vllm_dspark.register()
    vllm_dspark.register()
    assert vllm_dspark.registered()
    assert fresh_plugin.installs == [os.getpid()]
    assert vllm_dspark.registered_pids == [os.getpid()]
    assert fresh_plugin.log.read_text() == f"{os.getpid()}\n"
    assert _warnings(caplog) == []  # the installed vLLM is supported


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.32.3", "0.32.0rc1"])
def test_supported_versions_register_silently(fresh_plugin, monkeypatch, caplog, version):
    monkeypatch.setattr(vllm_dspark, "installed_vllm_version", lambda: version)
    vllm_dspark.register()
    assert _warnings(caplog) == []
    assert fresh_plugin.installs == [os.getpid()]


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.32.0", "0.3.2"])
def test_unsupported_version_warns_once_and_installs_nothing(fresh_plugin, monkeypatch, caplog, version):
    monkeypatch.setattr(vllm_dspark, "installed_vllm_version", lambda: version)
    vllm_dspark.register()
    vllm_dspark.register()
    (warning,) = _warnings(caplog)
    assert f"vLLM {version} is installed" in warning
    assert "0.32.x" in warning
    assert "VLLM_DSPARK_SKIP_VERSION_CHECK=1" in warning
    assert fresh_plugin.installs == []
    assert vllm_dspark.registered()  # still recorded: vLLM did call us


def test_skip_env_var_silences_the_warning_and_installs(fresh_plugin, monkeypatch, caplog):
    monkeypatch.setattr(vllm_dspark, "installed_vllm_version", lambda: "0.31.2")
    monkeypatch.setenv(vllm_dspark.SKIP_VERSION_CHECK_ENV, "1")
    vllm_dspark.register()
    assert _warnings(caplog) == []
    assert fresh_plugin.installs == [os.getpid()]


def test_import_is_light_and_exports_the_proposer_lazily():
    code = textwrap.dedent(
        """
        import sys, vllm_dspark
        heavy = sorted(m for m in ("torch", "vllm", "transformers", "numpy") if m in sys.modules)
        assert not heavy, heavy
        assert not vllm_dspark.registered()
        try:
            vllm_dspark.NoSuchThing
        except AttributeError as e:
            assert "NoSuchThing" in str(e)
        else:
            raise AssertionError("expected AttributeError")
        from vllm_dspark.integration.proposer import DSparkProposer
        assert vllm_dspark.DSparkProposer is DSparkProposer
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --- a real engine ---------------------------------------------------------------------------------------------

_ENGINE_SCRIPT = """
import json, os, sys
from vllm import LLM, SamplingParams

if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], enforce_eager=True, dtype="float32", max_model_len=256, seed=0)
    out = llm.generate(["Hello world"], SamplingParams(max_tokens=4, temperature=0))
    print("RESULT " + json.dumps({"pid": os.getpid(), "tokens": len(out[0].outputs[0].token_ids)}), flush=True)
"""


def _run_engine(model_dir, tmp_path, multiprocessing: bool) -> tuple[dict, list[int]]:
    """Start vLLM in a fresh interpreter (so vLLM loads plugins from scratch); return its result and the log."""
    script = tmp_path / "engine.py"
    script.write_text(_ENGINE_SCRIPT)
    log = tmp_path / "registrations.log"
    env = dict(
        os.environ,
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_ENABLE_V1_MULTIPROCESSING="1" if multiprocessing else "0",
        **{vllm_dspark.REGISTRATION_LOG_ENV: str(log)},
    )
    env.pop(vllm_dspark.SKIP_VERSION_CHECK_ENV, None)
    env.pop("VLLM_PLUGINS", None)
    proc = subprocess.run(
        [sys.executable, str(script), str(model_dir)], env=env, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (line,) = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    pids = [int(p) for p in log.read_text().split()] if log.exists() else []
    return json.loads(line.removeprefix("RESULT ")), pids


@pytest.mark.vllm
def test_vllm_calls_register_in_process(tiny_llama_dir, tmp_path):
    result, pids = _run_engine(tiny_llama_dir, tmp_path, multiprocessing=False)
    assert result["tokens"] == 4
    assert pids == [result["pid"]]  # once, in the only process


@pytest.mark.vllm
def test_vllm_calls_register_in_the_engine_core_process(tiny_llama_dir, tmp_path):
    result, pids = _run_engine(tiny_llama_dir, tmp_path, multiprocessing=True)
    assert result["tokens"] == 4
    assert result["pid"] in pids
    children = [p for p in pids if p != result["pid"]]
    assert children, f"only the main process ({result['pid']}) registered: {pids}"
    assert len(set(pids)) == len(pids)  # each process exactly once


def test_log_records_reach_vllms_handlers_unless_the_root_logger_is_configured(monkeypatch):
    """vLLM's logger does not propagate: without the root logger configured, ours uses vLLM's handlers."""
    import logging

    import vllm_dspark

    root, ours, theirs = logging.getLogger(), logging.getLogger("vllm_dspark"), logging.getLogger("vllm")
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    level = ours.level
    monkeypatch.setattr(ours, "handlers", [])
    monkeypatch.setattr(theirs, "handlers", [Collect()])
    try:
        theirs_level, theirs.level = theirs.level, logging.INFO
        monkeypatch.setattr(root, "handlers", [logging.NullHandler()])  # an application configured logging
        vllm_dspark.use_vllm_log_handlers()
        assert ours.handlers == []
        monkeypatch.setattr(root, "handlers", [])
        vllm_dspark.use_vllm_log_handlers()
        ours.info("vllm-dspark: drafter loaded")
        ours.debug("not at vLLM's level")
        assert seen == ["vllm-dspark: drafter loaded"] and ours.handlers == theirs.handlers
    finally:
        theirs.level = theirs_level
        ours.setLevel(level)
