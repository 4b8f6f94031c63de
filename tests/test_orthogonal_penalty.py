"""orthogonal_penalty: ragged layers, float32 result, gradients for both sequences."""

from __future__ import annotations

import pytest
import torch

import medcare_kernels as mk
from tests import oracle
from tests.conftest import assert_close, leaf_on

# (r_base, r_orth, d) per layer: several shapes, repeated shapes (batched together), ragged d.
LAYERS = [(32, 32, 48), (32, 32, 48), (32, 32, 80), (16, 8, 48), (4, 4, 7), (32, 32, 80)]


def make(layers, dtype, grad_base=True):
    base = [torch.randn(r1, d).to(dtype).requires_grad_(grad_base) for r1, _, d in layers]
    orth = [torch.randn(r2, d).to(dtype).requires_grad_(True) for _, r2, d in layers]
    return base, orth


def check(layers, dtype, backend, *, device="cpu"):
    """Penalty and both sequences' gradients of the library on ``device`` vs the float64 oracle on the CPU."""
    base_cpu, orth_cpu = make(layers, dtype)
    base, orth = [leaf_on(t, device) for t in base_cpu], [leaf_on(t, device) for t in orth_cpu]
    p = mk.orthogonal_penalty(base, orth, backend=backend)
    assert p.shape == () and p.dtype == torch.float32 and p.device == base[0].device
    base64, orth64 = [oracle.leaf64(t) for t in base_cpu], [oracle.leaf64(t) for t in orth_cpu]
    p64 = oracle.orthogonal_penalty(base64, orth64)
    assert_close(p, p64, torch.float32, "penalty")  # float32 math on exactly upcast inputs
    got = torch.autograd.grad(p, base + orth)
    want = torch.autograd.grad(p64, base64 + orth64)
    for i, (g, w, t) in enumerate(zip(got, want, base + orth)):
        assert g.dtype == t.dtype and g.shape == t.shape and g.device == t.device
        assert_close(g, w, dtype, f"grad {i}")


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("layers", [LAYERS, LAYERS[:1], [(1, 1, 1)]], ids=["ragged", "one", "tiny"])
def test_matches_float64_oracle(layers, dtype, backend):
    check(layers, dtype, backend)


def test_frozen_base_gets_no_gradient():
    base, orth = make(LAYERS, torch.float32, grad_base=False)
    p = mk.orthogonal_penalty(base, orth)
    grads = torch.autograd.grad(p, orth)
    assert all(g.abs().sum() > 0 for g in grads)
    assert all(b.grad is None for b in base)


def test_zero_when_orthogonal():
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    p = mk.orthogonal_penalty([q[:6].float()], [q[6:10].float()])
    assert p.item() < 1e-5


def test_gradcheck_float64():
    base, orth = make([(3, 2, 5), (4, 4, 7), (3, 2, 5)], torch.float64)
    n = len(base)
    assert torch.autograd.gradcheck(lambda *t: mk.orthogonal_penalty(t[:n], t[n:]), base + orth)
