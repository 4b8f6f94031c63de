"""route on every backend: float32 softmax, top-k with ties to the lower index, renormalised; forward and
gradient against the float64 oracle."""

from __future__ import annotations

import pytest
import torch

import medcare_kernels as mk
from tests import helpers, oracle
from tests.helpers import BF16, F16, F32, F64

RUNS = helpers.runs("torch", "reference", "triton", "cuda")
# (T, E, top_k): empty, one token, k = E, E = 1, many experts, T not a multiple of any block.
CASES = [(0, 8, 2), (1, 8, 2), (7, 2, 1), (37, 8, 8), (64, 64, 2), (33, 64, 64), (5, 1, 1), (1000, 8, 2),
         (5000, 8, 2)]


def _dtypes(run):
    return (F32, BF16, F16) if run.backend == "triton" else (F32, BF16, F16, F64)  # triton: no 64-bit kernels


def _keep(case, run, dtype):
    T = case[0]
    if run.interpreted:
        return T <= 64
    return T <= 1000 or run.device == "cuda"


@pytest.mark.parametrize("case,run,dtype", helpers.grid(CASES, RUNS, _dtypes, _keep))
def test_matches_float64_oracle(case, run, dtype, monkeypatch):
    run.apply(monkeypatch)
    helpers.route_check(*case, dtype, run.backend, device=run.device)


@pytest.mark.parametrize("run", helpers.by_run(RUNS))
def test_ties_go_to_the_lower_index(run, monkeypatch):
    run.apply(monkeypatch)
    helpers.route_check_ties(run.backend, device=run.device)


@pytest.mark.parametrize("run", helpers.by_run(helpers.runs("torch", "triton", "cuda")))
def test_eager_and_custom_op_paths_agree(run, monkeypatch):
    """The eager autograd.Function and the torch.library custom op (what torch.compile traces) run the same
    backend code: identical weights, indices and logit gradients."""
    run.apply(monkeypatch)
    logits = torch.randn(37, 8, device=run.device, requires_grad=True)
    g = torch.randn(37, 3, device=run.device)
    w, i = mk.route(logits, 3, backend=run.backend)
    (d_eager,) = torch.autograd.grad((w * g).sum(), logits)
    w2, i2 = torch.ops.medcare_kernels.route(logits, 3, run.backend)
    (d_op,) = torch.autograd.grad((w2 * g).sum(), logits)
    assert torch.equal(w, w2) and torch.equal(i, i2) and torch.equal(d_eager, d_op)


def test_leading_dims_are_kept():
    logits = torch.randn(2, 3, 6)
    weights, indices = mk.route(logits, 2)
    assert weights.shape == (2, 3, 2) and indices.shape == (2, 3, 2)
    w2, i2 = mk.route(logits.reshape(6, 6), 2)
    assert torch.equal(weights.reshape(6, 2), w2) and torch.equal(indices.reshape(6, 2), i2)


def test_k_equals_e_is_plain_softmax():
    logits = torch.randn(10, 5, dtype=F64)
    weights, indices = mk.route(logits, 5)
    assert torch.allclose(weights, torch.softmax(logits, -1).gather(1, indices))


def test_gradcheck_float64():
    logits = torch.randn(6, 5, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: mk.route(t, 3)[0], [logits])


def test_opcheck_custom_op():
    """torch.library.opcheck: schema, fake implementation against the real one, autograd registration."""
    torch.library.opcheck(torch.ops.medcare_kernels.route.default, (torch.randn(9, 6, requires_grad=True), 2, "torch"))


@pytest.mark.gpu
def test_cuda_kernels_match_the_torch_backend_on_the_gpu():
    from medcare_kernels.backends.pytorch import route as torch_route

    ops = torch.ops.medcare_kernels
    logits = torch.randn(3000, 16, device="cuda") * 3
    w, i = ops.route_fwd_cuda(logits, 4)
    w_t, i_t = mk.route(logits, 4, backend="torch")
    same = (i == i_t).all(1)
    assert same.float().mean() > 0.999
    torch.testing.assert_close(w[same], w_t[same], rtol=1e-6, atol=1e-6)
    g = torch.randn_like(w)
    torch.testing.assert_close(ops.route_bwd_cuda(g, logits, w, i)[same], torch_route.backward(g, logits, w, i)[same],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_opcheck_compiled_kernels():
    ops = torch.ops.medcare_kernels
    logits = torch.randn(9, 6, device="cuda")
    w, i = ops.route_fwd_cuda(logits, 2)
    torch.library.opcheck(ops.route_fwd_cuda.default, (logits, 2))
    torch.library.opcheck(ops.route_bwd_cuda.default, (torch.randn(9, 2, device="cuda"), logits, w, i))


@pytest.mark.parametrize("run", helpers.by_run(helpers.runs("torch", "triton", "cuda")))
def test_non_finite_logits_poison_their_row_only(run, monkeypatch):
    """A row with a NaN or infinite logit gets k distinct valid experts and NaN weights; every other row is
    routed as if the poisoned one were not there (docs/design.md, "Non-finite values")."""
    run.apply(monkeypatch)
    nan, inf = float("nan"), float("inf")
    for E, k in ((3, 2), (4, 2), (8, 3)):
        logits = torch.randn(6, E)
        logits[0] = nan
        logits[1, 1] = nan
        logits[2, 0] = inf
        logits[3, -1] = -inf  # a finite row: -inf is a valid logit (probability 0)
        w, i = mk.route(logits.to(run.device), k, backend=run.backend)
        w, i = w.cpu(), i.cpu()
        assert ((i >= 0) & (i < E)).all() and (i.sort(1).values.diff(1) > 0).all(), "k distinct valid experts"
        assert torch.isnan(w[:3]).all()
        w64, _ = oracle.route(logits[3:].double(), k, i[3:])
        helpers.assert_close(w[3:], w64, F32, "finite rows")
        assert i[3:].tolist() == oracle.route_indices(logits[3:], k).tolist()
