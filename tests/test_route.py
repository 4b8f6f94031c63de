"""route: float32 softmax, top-k with ties to the lower index, renormalised; forward and gradient."""

from __future__ import annotations

import pytest
import torch

import medcare_kernels as mk
from tests import oracle
from tests.conftest import assert_close, assert_routing_near_ties, leaf_on

BACKENDS = ["torch", "reference"]


def check(T, E, top_k, dtype, backend, *, device="cpu"):
    """Random logits [T, E] of ``dtype`` routed by the library on ``device``: weights, indices and the
    logits' gradient vs the float64 oracle on the CPU."""
    logits_cpu = (torch.randn(T, E) * 2).to(dtype).requires_grad_(True)
    logits = leaf_on(logits_cpu, device)
    weights, indices = mk.route(logits, top_k, backend=backend)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert weights.shape == (T, top_k) and weights.dtype == acc and weights.device == logits.device
    assert indices.shape == (T, top_k) and indices.dtype == torch.int64 and indices.device == logits.device
    ref_logits = oracle.leaf64(logits_cpu)
    if T:
        assert_routing_near_ties(indices, ref_logits, top_k, 1e-6)
    w64, _ = oracle.route(ref_logits, top_k, indices.cpu())
    tol = torch.float64 if dtype == torch.float64 else torch.float32  # float32 math for every input dtype
    assert_close(weights, w64, tol, "weights")
    if T:
        assert torch.allclose(weights.sum(-1).cpu().double(), torch.ones(T, dtype=torch.float64), atol=1e-6)
        assert (weights[:, :-1] >= weights[:, 1:]).all(), "weights come in descending order"
    g = torch.randn(T, top_k, dtype=torch.float64)
    (got,) = torch.autograd.grad((weights.double() * g.to(weights.device)).sum(), logits, allow_unused=True)
    (want,) = torch.autograd.grad((w64 * g).sum(), ref_logits)
    assert got is not None and got.dtype == dtype and got.device == logits.device
    assert_close(got, want, tol if dtype in (torch.float32, torch.float64) else dtype, "d logits")


def check_ties(backend, *, device="cpu"):
    """Equal probabilities go to the lower expert index, in every input dtype and with many experts."""
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0],
                           [2.0, 2.0, 2.0, 2.0, 2.0],
                           [0.0, 5.0, 1.0, 5.0, 1.0]], device=device)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert mk.route(logits.to(dtype), 2, backend=backend)[1].tolist() == [[1, 2], [0, 1], [1, 3]]
        assert mk.route(logits.to(dtype), 3, backend=backend)[1].tolist() == [[1, 2, 3], [0, 1, 2], [1, 3, 2]]
    wide = torch.zeros(2, 100, device=device)  # every expert tied, more experts than lanes and k > 32
    assert mk.route(wide, 40, backend=backend)[1].tolist() == [list(range(40))] * 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("T,E,top_k", [(0, 8, 2), (1, 8, 2), (7, 2, 1), (64, 8, 8), (1000, 8, 2), (64, 64, 2),
                                       (33, 64, 64), (5, 1, 1)])
def test_matches_float64_oracle(T, E, top_k, dtype, backend):
    check(T, E, top_k, dtype, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lower_index(backend):
    check_ties(backend)


def test_leading_dims_are_kept():
    logits = torch.randn(2, 3, 6)
    weights, indices = mk.route(logits, 2)
    assert weights.shape == (2, 3, 2) and indices.shape == (2, 3, 2)
    w2, i2 = mk.route(logits.reshape(6, 6), 2)
    assert torch.equal(weights.reshape(6, 2), w2) and torch.equal(indices.reshape(6, 2), i2)


def test_k_equals_e_is_plain_softmax():
    logits = torch.randn(10, 5, dtype=torch.float64)
    weights, indices = mk.route(logits, 5)
    assert torch.allclose(weights, torch.softmax(logits, -1).gather(1, indices))


def test_gradcheck_float64():
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: mk.route(t, 3)[0], [logits])
