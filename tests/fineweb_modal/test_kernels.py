"""The Triton SwiGLU kernel: checked in Triton's interpreter (a child process), and refused where it cannot run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fineweb_modal.embedding import TransformersEngine
from fineweb_modal.errors import ConfigError
from fineweb_modal.models import DEFAULT_MODEL

pytest.importorskip("triton", reason="the kernel is Triton; the test extra installs it on Linux x86-64")
ROOT = Path(__file__).resolve().parents[2]


def test_kernel_checks_pass_in_the_triton_interpreter():
    """tests/fineweb_modal/interpreted_kernels.py, run where TRITON_INTERPRET=1 is set before triton is imported."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    checks = ROOT / "tests" / "fineweb_modal" / "interpreted_kernels.py"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(checks)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(r"^14 passed", result.stdout, re.MULTILINE), result.stdout[-2000:]  # none skipped, none lost


def test_fused_swiglu_needs_a_gpu_outside_the_interpreter():
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        TransformersEngine(DEFAULT_MODEL, compile=False, device="cpu", fused_swiglu=True)
