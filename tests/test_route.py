"""route: float32 softmax, top-k with ties to the lower index, renormalised; forward and gradient."""

from __future__ import annotations

import pytest
import torch

import medcare_kernels as mk
from tests import oracle
from tests.conftest import assert_close

BACKENDS = ["torch", "reference"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("T,E,top_k", [(0, 8, 2), (1, 8, 2), (7, 2, 1), (64, 8, 8), (1000, 8, 2), (64, 64, 2),
                                       (33, 64, 64), (5, 1, 1)])
def test_matches_float64_oracle(T, E, top_k, dtype, backend):
    logits = (torch.randn(T, E) * 2).to(dtype).requires_grad_(True)
    weights, indices = mk.route(logits, top_k, backend=backend)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert weights.shape == (T, top_k) and weights.dtype == acc
    assert indices.shape == (T, top_k) and indices.dtype == torch.int64
    ref_logits = oracle.leaf64(logits)
    if T:
        differs = (indices != oracle.route_indices(ref_logits, top_k)).any(1)
        assert (oracle.order_margin(ref_logits, top_k)[differs] < 1e-6).all()
    w64, _ = oracle.route(ref_logits, top_k, indices)
    tol = torch.float64 if dtype == torch.float64 else torch.float32  # float32 math for every input dtype
    assert_close(weights, w64, tol, "weights")
    if T:
        assert torch.allclose(weights.sum(-1).double(), torch.ones(T, dtype=torch.float64), atol=1e-6)
        assert (weights[:, :-1] >= weights[:, 1:]).all(), "weights come in descending order"
    g = torch.randn(T, top_k, dtype=torch.float64)
    (got,) = torch.autograd.grad((weights.double() * g).sum(), logits, allow_unused=True)
    (want,) = torch.autograd.grad((w64 * g).sum(), ref_logits)
    assert got is not None and got.dtype == dtype
    assert_close(got, want, tol if dtype in (torch.float32, torch.float64) else dtype, "d logits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lower_index(backend):
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0],
                           [2.0, 2.0, 2.0, 2.0, 2.0],
                           [0.0, 5.0, 1.0, 5.0, 1.0]])
    _, indices = mk.route(logits, 2, backend=backend)
    assert indices.tolist() == [[1, 2], [0, 1], [1, 3]]
    _, indices = mk.route(logits, 3, backend=backend)
    assert indices.tolist() == [[1, 2, 3], [0, 1, 2], [1, 3, 2]]


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
