"""orthogonal_penalty on every backend: ragged layers, float32 result, gradients for both sequences."""

from __future__ import annotations

import pytest
import torch

import medcare_kernels as mk
from tests import helpers, oracle
from tests.helpers import BF16, F16, F32, F64

RUNS = helpers.runs("torch", "reference", "triton", "cuda")
LAYERS = helpers.PENALTY_LAYERS
CASES = [LAYERS, LAYERS[:1], [(1, 1, 1)], [(20, 40, 33), (3, 5, 17)],
         [(32, 32, 4500), (40, 33, 2049), (16, 8, 18944), (33, 64, 100)],  # several d-chunks and tiles
         [(0, 4, 8), (3, 0, 6), (2, 3, 0), (4, 5, 9)]]                     # empty factors
IDS = ["ragged", "one", "tiny", "wide", "big", "empty"]


def _keep(case, run, dtype):
    if case is CASES[4]:
        return run.device == "cuda"  # large: compiled kernels only
    return not (case is CASES[5] and run.interpreted)


@pytest.mark.parametrize("case,run,dtype", helpers.grid(CASES, RUNS, (F32, BF16, F16), _keep, case_ids=IDS))
def test_matches_float64_oracle(case, run, dtype, monkeypatch):
    run.apply(monkeypatch)
    helpers.penalty_check(case, dtype, run.backend, device=run.device)


@pytest.mark.parametrize("run", helpers.by_run(RUNS))
def test_frozen_base_gets_no_gradient(run, monkeypatch):
    run.apply(monkeypatch)
    base, orth = helpers.penalty_make(LAYERS, F32, grad_base=False)
    base, orth = [helpers.leaf_on(t, run.device) for t in base], [helpers.leaf_on(t, run.device) for t in orth]
    p = mk.orthogonal_penalty(base, orth, backend=run.backend)
    grads = torch.autograd.grad(p, orth)
    assert all(g.abs().sum() > 0 for g in grads)
    assert all(b.grad is None for b in base)


@pytest.mark.parametrize("run", helpers.by_run(RUNS))
def test_zero_when_orthogonal(run, monkeypatch):
    run.apply(monkeypatch)
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=F64))
    p = mk.orthogonal_penalty([q[:6].float().to(run.device)], [q[6:10].float().to(run.device)], backend=run.backend)
    assert p.item() < 1e-5


@pytest.mark.parametrize("run", helpers.by_run(helpers.runs("torch", "triton", "cuda")))
def test_eager_and_custom_op_paths_agree(run, monkeypatch):
    run.apply(monkeypatch)
    base, orth = helpers.penalty_make(LAYERS[:3], F32)
    base, orth = [helpers.leaf_on(t, run.device) for t in base], [helpers.leaf_on(t, run.device) for t in orth]
    p = mk.orthogonal_penalty(base, orth, backend=run.backend)
    eager = torch.autograd.grad(p, base + orth)
    p2 = torch.ops.medcare_kernels.orthogonal_penalty(base, orth, run.backend)
    assert torch.equal(p, p2)
    assert all(torch.equal(a, b) for a, b in zip(eager, torch.autograd.grad(p2, base + orth)))


def test_gradcheck_float64():
    base, orth = helpers.penalty_make([(3, 2, 5), (4, 4, 7), (3, 2, 5)], F64)
    n = len(base)
    assert torch.autograd.gradcheck(lambda *t: mk.orthogonal_penalty(t[:n], t[n:]), base + orth)


def test_opcheck_custom_op():
    torch.library.opcheck(torch.ops.medcare_kernels.orthogonal_penalty.default,
                          ([torch.randn(4, 8, requires_grad=True), torch.randn(4, 5, requires_grad=True)],
                           [torch.randn(4, 8, requires_grad=True), torch.randn(2, 5, requires_grad=True)], "torch"))


@pytest.mark.gpu
def test_gpu_cuda_penalty_is_bitwise_deterministic():
    base = [torch.randn(32, d, device="cuda", dtype=BF16) for d in (3584, 3584, 18944) * 4]
    orth = [torch.randn(32, d, device="cuda", dtype=BF16, requires_grad=True) for d in (3584, 3584, 18944) * 4]
    runs = []
    for _ in range(3):
        p = mk.orthogonal_penalty(base, orth, backend="cuda")
        runs.append((p.detach().clone(), torch.autograd.grad(p, orth)))
    for p, grads in runs[1:]:
        assert torch.equal(p, runs[0][0])
        assert all(torch.equal(a, b) for a, b in zip(grads, runs[0][1]))


@pytest.mark.gpu
def test_gpu_cuda_frozen_base_and_mixed_dtypes():
    base_cpu = [torch.randn(8, 40), torch.randn(4, 24).to(BF16)]
    orth_cpu = [torch.randn(6, 40).to(F16).requires_grad_(True), torch.randn(4, 24).requires_grad_(True)]
    base, orth = [helpers.leaf_on(t, "cuda") for t in base_cpu], [helpers.leaf_on(t, "cuda") for t in orth_cpu]
    p = mk.orthogonal_penalty(base, orth, backend="cuda")
    grads = torch.autograd.grad(p, orth)
    base64, orth64 = [oracle.leaf64(t) for t in base_cpu], [oracle.leaf64(t) for t in orth_cpu]
    p64 = oracle.orthogonal_penalty(base64, orth64)
    helpers.assert_close(p.cpu(), p64, F32, "penalty")
    for g, w, t in zip(grads, torch.autograd.grad(p64, orth64), orth):
        assert g.dtype == t.dtype
        helpers.assert_close(g.cpu(), w, t.dtype, "d orth")
    assert all(b.grad is None for b in base)


@pytest.mark.gpu
def test_gpu_opcheck_compiled_kernels():
    ops = torch.ops.medcare_kernels
    base = [torch.randn(4, 40, device="cuda"), torch.randn(3, 7, device="cuda")]
    orth = [torch.randn(5, 40, device="cuda"), torch.randn(2, 7, device="cuda")]
    torch.library.opcheck(ops.orthogonal_penalty_fwd_cuda.default, (base, orth))
    torch.library.opcheck(ops.orthogonal_penalty_bwd_cuda.default,
                          (torch.ones((), device="cuda"), base, orth, True, False))
