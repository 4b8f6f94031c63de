"""Shared test helpers: fresh seeds, per-dtype tolerances, comparison against the float64 oracle."""

from __future__ import annotations

import os
import random
import zlib

import pytest
import torch

from tests import oracle

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
    a = actual.detach().to(device="cpu", dtype=torch.float64)  # a device result against the CPU oracle
    e = expected.detach().to(device="cpu", dtype=torch.float64)
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    if e.numel() == 0:
        return
    scale = e.abs().max()
    if scale < 1e-9:  # mathematically zero (e.g. the router's gradient at top_k = 1): roundoff only
        assert a.abs().max() <= 10 * TOL[dtype], f"{name}: expected zeros, got up to {a.abs().max().item():.3g}"
        return
    err = ((a - e).abs().max() / scale).item()
    assert err <= TOL[dtype], f"{name}: normalised max error {err:.3g} > {TOL[dtype]:.1g} ({dtype})"


def assert_routing_near_ties(indices, logits64, top_k, tol):
    """The library's ``indices`` [T, k] are k distinct experts per token and match the float64 oracle's
    top-k of ``logits64`` [T, E] (ties to the lower index), except at genuine near-ties: where a row's
    expert *set* differs, the gap between its k-th and (k+1)-th largest probability is below ``tol``; where
    only the *order* differs, the gap between two consecutive probabilities among its k largest is."""
    indices = indices.cpu()
    assert (indices.sort(1).values.diff(1) > 0).all(), "k distinct experts per token"
    want = oracle.route_indices(logits64, top_k)
    set_differs = (indices.sort(1).values != want.sort(1).values).any(1)
    order_differs = (indices != want).any(1) & ~set_differs
    assert (oracle.topk_margin(logits64, top_k)[set_differs] < tol).all(), "routed experts differ beyond near-ties"
    # order_margin(., k - 1): the smallest gap between consecutive probabilities among the k largest
    assert (oracle.order_margin(logits64, top_k - 1)[order_differs] < tol).all(), \
        "order of the routed experts differs beyond near-ties"


def leaf_on(t, device):
    """A leaf copy of ``t`` on ``device`` (same strides, same requires_grad); None stays None."""
    return None if t is None else t.detach().to(device).requires_grad_(t.requires_grad)


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
