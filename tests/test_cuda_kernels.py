"""The compiled CUDA kernels on a GPU (marked ``gpu``: skipped without CUDA), against the float64 oracle:
the same shape and edge-case lists as the torch backend's tests (read from those test modules),
forward and backward, plus what only these kernels promise: bitwise-deterministic penalty, the decode
kernel's saved state (z in slot order) matching the torch backend's, argument checks naming the
argument on a real device, and torch.compile through the cuda backend."""

from __future__ import annotations

import pytest
import torch

import medcare_kernels as mk
import medcare_kernels.backends as be
from medcare_kernels import _extension
from medcare_kernels.ops import route as route_op
from tests import oracle
from tests import test_molora_linear as molora_tests
from tests import test_orthogonal_penalty as penalty_tests
from tests import test_route as route_tests
from tests.conftest import assert_close, leaf_on

pytestmark = pytest.mark.gpu
DEV = "cuda"
ops = torch.ops.medcare_kernels
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64


def _params(fn, names: str) -> list:
    """The values of ``fn``'s ``@pytest.mark.parametrize(names, values)``: the torch backend's cases."""
    for mark in getattr(fn, "pytestmark", []):
        if mark.name == "parametrize" and mark.args[0] == names:
            return list(mark.args[1])
    raise LookupError(f"{fn.__name__} has no parametrize over {names!r}")


ROUTE_CASES = _params(route_tests.test_matches_float64_oracle, "T,E,top_k")
PENALTY_LAYERS = _params(penalty_tests.test_matches_float64_oracle, "layers")


@pytest.fixture(autouse=True)
def _cuda_backend_runs():
    """On a GPU machine the extension must have been built (make gpu-check builds it first)."""
    reason = be.backend_unavailable_reason("cuda", DEV)
    assert reason is None, f"the cuda backend cannot run on this GPU machine: {reason}"


# ------------------------------------------------------------------------------------------------ route

@pytest.mark.parametrize("dtype", [F32, BF16, F16, F64], ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("T,E,top_k", ROUTE_CASES)
def test_route_matches_float64_oracle(T, E, top_k, dtype):
    route_tests.check(T, E, top_k, dtype, "cuda", device=DEV)


def test_route_ties_go_to_the_lower_index():
    route_tests.check_ties("cuda", device=DEV)


def test_route_kernels_match_the_torch_backend_on_the_gpu():
    logits = torch.randn(3000, 16, device=DEV) * 3
    w, i = ops.route_fwd_cuda(logits, 4)
    w_t, i_t = mk.route(logits, 4, backend="torch")
    same = (i == i_t).all(1)
    assert same.float().mean() > 0.999
    torch.testing.assert_close(w[same], w_t[same], rtol=1e-6, atol=1e-6)
    g = torch.randn_like(w)
    from medcare_kernels.backends.pytorch import route as torch_route
    torch.testing.assert_close(ops.route_bwd_cuda(g, logits, w, i)[same], torch_route.backward(g, logits, w, i)[same],
                               rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------- orthogonal_penalty

BIG_LAYERS = [(32, 32, 4500), (40, 33, 2049), (16, 8, 18944), (33, 64, 100)]  # several d-chunks and tiles
EMPTY_LAYERS = [(0, 4, 8), (3, 0, 6), (2, 3, 0), (4, 5, 9)]


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("layers", [*PENALTY_LAYERS, BIG_LAYERS, EMPTY_LAYERS],
                         ids=[f"torch-case-{i}" for i in range(len(PENALTY_LAYERS))] + ["big", "empty"])
def test_penalty_matches_float64_oracle(layers, dtype):
    penalty_tests.check(layers, dtype, "cuda", device=DEV)


def test_penalty_is_bitwise_deterministic():
    base = [torch.randn(32, d, device=DEV, dtype=BF16) for d in (3584, 3584, 18944) * 4]
    orth = [torch.randn(32, d, device=DEV, dtype=BF16, requires_grad=True) for d in (3584, 3584, 18944) * 4]
    runs = []
    for _ in range(3):
        p = mk.orthogonal_penalty(base, orth, backend="cuda")
        runs.append((p.detach().clone(), torch.autograd.grad(p, orth)))
    for p, grads in runs[1:]:
        assert torch.equal(p, runs[0][0])
        assert all(torch.equal(a, b) for a, b in zip(grads, runs[0][1]))


def test_penalty_frozen_base_and_mixed_dtypes():
    base_cpu = [torch.randn(8, 40), torch.randn(4, 24).to(BF16)]
    orth_cpu = [torch.randn(6, 40).to(F16).requires_grad_(True), torch.randn(4, 24).requires_grad_(True)]
    base, orth = [leaf_on(t, DEV) for t in base_cpu], [leaf_on(t, DEV) for t in orth_cpu]
    p = mk.orthogonal_penalty(base, orth, backend="cuda")
    grads = torch.autograd.grad(p, orth)
    base64, orth64 = [oracle.leaf64(t) for t in base_cpu], [oracle.leaf64(t) for t in orth_cpu]
    p64 = oracle.orthogonal_penalty(base64, orth64)
    assert_close(p.cpu(), p64, F32, "penalty")
    for g, w, t in zip(grads, torch.autograd.grad(p64, orth64), orth):
        assert g.dtype == t.dtype
        assert_close(g.cpu(), w, t.dtype, "d orth")
    assert all(b.grad is None for b in base)


def test_penalty_zero_when_orthogonal():
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=F64))
    assert mk.orthogonal_penalty([q[:6].float().to(DEV)], [q[6:10].float().to(DEV)], backend="cuda").item() < 1e-5


# ------------------------------------------------------------------------------- molora_linear (decode)

NAMES = molora_tests.NAMES


@pytest.mark.parametrize("dtype", molora_tests.DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("T,E,top_k,r,r_s", molora_tests.CASES)
def test_molora_matches_float64_oracle(T, E, top_k, r, r_s, dtype):
    molora_tests.check(molora_tests.make(T, 40, 24, E, r, r_s, dtype), top_k, 1.7, "cuda", dtype, device=DEV)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("variant", list(molora_tests.VARIANTS))
def test_molora_variants(variant, dtype):
    opts = dict(molora_tests.VARIANTS[variant])
    r_s = opts.pop("r_s", 12)
    molora_tests.check(molora_tests.make(50, 33, 20, 6, 4, r_s, dtype, **opts), 2, 0.5, "cuda", dtype, device=DEV)


def test_molora_gradient_through_router_logits():
    molora_tests.check(molora_tests.make(40, 24, 16, 8, 4, 8, F32), 2, 1.0, "cuda", F32, device=DEV,
                       logits_grad=True)


@pytest.mark.parametrize("x_dtype,router_dtype,lora_dtype", [(BF16, F32, BF16), (F16, F32, F32), (F32, BF16, BF16),
                                                             (F16, BF16, BF16)])
def test_molora_mixed_parameter_dtypes(x_dtype, router_dtype, lora_dtype):
    inp = molora_tests.make(9, 40, 24, 6, 8, 16, x_dtype, lora_dtype=lora_dtype)
    for n in ("router_weight", "router_bias"):
        inp[n] = inp[n].detach().to(router_dtype).requires_grad_(True)
    dtypes = {x_dtype, router_dtype, lora_dtype}
    coarsest = BF16 if BF16 in dtypes else (F16 if F16 in dtypes else F32)  # gradients come back in each dtype
    molora_tests.check(inp, 2, 0.9, "cuda", coarsest, device=DEV)


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("T,d_in,r,r_s", [(1, 64, 16, 32), (16, 40, 8, 0), (64, 33, 3, 5), (200, 128, 16, 32)])
def test_decode_kernel_state_matches_the_torch_backend(T, d_in, r, r_s, dtype):
    """All five outputs of molora_decode_cuda (any T, called directly) against the torch backend's
    forward on the same GPU tensors: the backward of a decode forward reads z, weights and indices."""
    from medcare_kernels.backends.pytorch import molora_linear as torch_molora
    E, d_out, k = 8, 72, 2
    g = {n: t for n, t in molora_tests.make(T, d_in, d_out, E, r, r_s, dtype).items()}
    args = [None if g[n] is None else g[n].detach().to(DEV) for n in NAMES[:9]]
    y, logits, w, idx, z = ops.molora_decode_cuda(*args, None, k, 1.3)
    y_t, logits_t, w_t, idx_t, z_t = torch_molora.forward(*args, None, k, 1.3)
    assert z.shape == (T, k * r + r_s) and z.dtype == F32 and y.dtype == dtype
    torch.testing.assert_close(logits, logits_t, rtol=1e-5, atol=1e-5)
    same = (idx == idx_t).all(1)
    assert same.float().mean() > 0.95
    torch.testing.assert_close(w[same], w_t[same], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z[same], z_t[same], rtol=1e-4, atol=1e-4)
    tol = {F32: 1e-4, BF16: 3e-2, F16: 5e-3}[dtype]
    torch.testing.assert_close(y[same].float(), y_t[same].float(), rtol=tol, atol=tol)


def test_decode_path_is_used_for_few_tokens(monkeypatch):
    from medcare_kernels.backends.cuda import molora_linear as cuda_molora
    calls = []
    real = cuda_molora._torch.forward
    monkeypatch.setattr(cuda_molora._torch, "forward", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    inp = {n: leaf_on(t, DEV) for n, t in molora_tests.make(64, 40, 24, 8, 4, 8, BF16).items()}
    mk.molora_linear(*[inp[n] for n in NAMES[:9]], top_k=2, scaling=1.0, backend="cuda")
    assert calls == [], "64 tokens run the decode kernels"
    inp = {n: leaf_on(t, DEV) for n, t in molora_tests.make(65, 40, 24, 8, 4, 8, BF16).items()}
    mk.molora_linear(*[inp[n] for n in NAMES[:9]], top_k=2, scaling=1.0, backend="cuda")
    assert calls == [65], "65 tokens run the torch backend"


def test_compiled_op_names_the_tensor_on_the_wrong_device():
    args = [None if t is None else t.detach().to(DEV) for t in
            [molora_tests.make(4, 16, 12, 4, 2, 4, F32)[n] for n in NAMES[:9]]]
    args[6] = args[6].cpu()  # lora_B
    with pytest.raises(ValueError, match=r"molora_decode_cuda: lora_B must be a CUDA tensor, got a tensor on cpu"):
        ops.molora_decode_cuda(*args, None, 2, 1.0)
    with pytest.raises(ValueError, match=r"route_bwd_cuda: weights must be a CUDA tensor"):
        ops.route_bwd_cuda(torch.randn(3, 2, device=DEV), torch.randn(3, 5, device=DEV), torch.rand(3, 2),
                           torch.zeros(3, 2, dtype=torch.long, device=DEV))


# ------------------------------------------------------------------------------------ dispatch, compile

def test_auto_picks_cuda_where_documented():
    assert "cuda" in mk.available_backends()
    dev = torch.device(DEV)
    fast = [b for b in ("cuda", "triton") if be.backend_unavailable_reason(b, dev) is None]
    assert be.pick_fast(fast, torch.float32, route_op._FAST) == "cuda"
    assert be.resolve_backend("auto", dev, "route",
                              choose=lambda a: be.pick_fast(a, torch.float32, route_op._FAST)) == "cuda"


def test_torch_compile_fullgraph_with_the_cuda_backend():
    from tests.test_custom_ops import check_compile_fullgraph_matches_eager
    check_compile_fullgraph_matches_eager(DEV)


def test_opcheck_compiled_ops():
    """torch.library.opcheck: schema, fake implementations against the real kernels, dynamic shapes."""
    logits = torch.randn(9, 6, device=DEV)
    w, i = ops.route_fwd_cuda(logits, 2)
    torch.library.opcheck(ops.route_fwd_cuda.default, (logits, 2))
    torch.library.opcheck(ops.route_bwd_cuda.default, (torch.randn(9, 2, device=DEV), logits, w, i))
    base = [torch.randn(4, 40, device=DEV), torch.randn(3, 7, device=DEV)]
    orth = [torch.randn(5, 40, device=DEV), torch.randn(2, 7, device=DEV)]
    torch.library.opcheck(ops.orthogonal_penalty_fwd_cuda.default, (base, orth))
    torch.library.opcheck(ops.orthogonal_penalty_bwd_cuda.default,
                          (torch.ones((), device=DEV), base, orth, True, False))
    args = [None if t is None else t.detach().to(DEV) for t in
            [molora_tests.make(5, 16, 12, 4, 2, 4, BF16)[n] for n in NAMES[:9]]]
    torch.library.opcheck(ops.molora_decode_cuda.default, (*args, None, 2, 0.5))
