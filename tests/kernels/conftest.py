"""Kernel tests run the Triton kernels on CPU tensors through the Triton interpreter.

Triton decides interpreted vs compiled when a function is decorated, for its own library (``tl.max``, ...) as
much as for our kernels, so TRITON_INTERPRET=1 must be set before triton's first import in the process. This
conftest imports triton and the kernels with it set, while pytest collects (before any test runs), then
restores the environment so other test directories (vLLM engines, subprocesses) do not inherit it; a fixture
sets it again around each kernel test (the interpreter reads it at run time too).
"""

import os
import sys

import pytest

_saved = os.environ.get("TRITON_INTERPRET")
_preloaded = sorted(m for m in ("triton", "vllm_dspark_kernels.markov_head_triton") if m in sys.modules)
os.environ["TRITON_INTERPRET"] = "1"
try:
    import triton.language.standard as _tl_standard

    from vllm_dspark_kernels import markov_head_triton as _kernels
finally:
    if _saved is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _saved

_INTERPRETED = _kernels.kernels_interpreted() and type(_tl_standard.max).__name__ == "InterpretedFunction"


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    if not _INTERPRETED:
        pytest.fail(f"{', '.join(_preloaded)} was imported before tests/kernels/conftest.py could turn on the "
                    "Triton interpreter. Run `pytest tests/kernels` on its own, or export TRITON_INTERPRET=1.")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
