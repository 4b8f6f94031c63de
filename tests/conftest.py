"""Shared test helpers: fresh seeds, per-dtype tolerances, comparison against the float64 oracle."""

from __future__ import annotations

import os
import random
import zlib

import pytest
import torch

# The triton backend's kernels run on the CPU under the interpreter (tests/test_triton.py): the switch
# must be set before triton decorates them, i.e. before medcare_kernels.triton is first imported.
# On a machine with a GPU the kernels run compiled and the variable is left alone.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

#: Normalised max error ``max|a - b| / max|b|`` allowed per dtype of the computation under test.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}

_RUN_SEED = int(os.environ.get("MEDCARE_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"medcare test seed: MEDCARE_TEST_SEED={_RUN_SEED}"


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs each run (seed printed in the header; set MEDCARE_TEST_SEED to replay)."""
    torch.manual_seed(_RUN_SEED ^ zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("MEDCARE_BACKEND", "MEDCARE_MOLORA_FORMULATION", "MEDCARE_TRITON_BASE", "MEDCARE_TRITON_MOLORA_PATH"):
        monkeypatch.delenv(var, raising=False)


def assert_close(actual, expected, dtype, name=""):
    """``actual`` (any dtype) matches the float64 ``expected`` within ``TOL[dtype]``, normalised."""
    assert actual is not None, f"{name}: gradient missing"
    assert tuple(actual.shape) == tuple(expected.shape), f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    if e.numel() == 0:
        return
    scale = e.abs().max()
    if scale < 1e-9:  # mathematically zero (e.g. the router's gradient at top_k = 1): roundoff only
        assert a.abs().max() <= 10 * TOL[dtype], f"{name}: expected zeros, got up to {a.abs().max().item():.3g}"
        return
    err = ((a - e).abs().max() / scale).item()
    assert err <= TOL[dtype], f"{name}: normalised max error {err:.3g} > {TOL[dtype]:.1g} ({dtype})"


def grads_of(outputs_and_seeds, inputs):
    """Gradients of ``sum(out * seed)`` w.r.t. the inputs that require grad (None for the others)."""
    loss = sum((o.to(torch.float64) * s.to(torch.float64)).sum() for o, s in outputs_and_seeds)
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(loss, wanted, allow_unused=True))
    return [next(got) if (t is not None and t.requires_grad) else None for t in inputs]


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run the kernels for real; without a CUDA device they skip cleanly."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
