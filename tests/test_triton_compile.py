"""The Triton kernels lower to GPU code without a GPU: each kernel (one autotune config, MedCare-like
constexprs) is compiled to an sm_90 cubin with triton's bundled ptxas. This catches what the CPU
interpreter accepts but the compiler rejects. ``make triton-compile-check`` sweeps every config, sm_90/80."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def test_every_triton_kernel_compiles_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter replaces kernels
    cmd = [sys.executable, "-m", "medcare_kernels.backends.triton._compile_check", "--arch", "90", "--quick"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert "0 failure(s)" in out.stdout and out.stdout.count(": ok") >= 20, out.stdout[-3000:]
