"""The triton backend: every kernel, forward and every gradient, against the float64 oracle.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` (set by tests/conftest.py) on small shapes;
with one, the same tests run compiled on CUDA, and the ``gpu``-marked tests add larger shapes and
``torch.compile``. The checks reuse the op test modules' ``make``/``check`` helpers.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import medcare_kernels as mk
import medcare_kernels.backends as be
from tests import oracle, test_lora_linear, test_molora_linear, test_orthogonal_penalty, test_route
from tests.conftest import assert_close, grads_of

ON_GPU = torch.cuda.is_available()


def _interpreter_too_old() -> str | None:
    """Triton < 3.8's CPU interpreter converts 1-element arrays to loop bounds with ``int()``, which
    numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted"); compiled GPU runs are fine."""
    if ON_GPU or os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None:
        return None
    import numpy
    import triton

    def version(v):
        return tuple(int(p) for p in v.split("+")[0].split(".")[:2])
    if version(triton.__version__) < (3, 8) and version(numpy.__version__) >= (2, 4):
        return f"triton {triton.__version__}'s interpreter needs numpy < 2.4 (have {numpy.__version__})"
    return None


_SKIP = None if "triton" in mk.available_backends() else \
    f"triton backend unavailable: {be.backend_unavailable_reason('triton')}"
_SKIP = _SKIP or _interpreter_too_old()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=str(_SKIP))

DTYPES = [torch.float32, torch.bfloat16]
DT_IDS = ["float32", "bfloat16"]
#: CPU-tensor tests (the interpreter); with CUDA present their gpu-marked twins below run the same cases.
interp = pytest.mark.skipif(ON_GPU, reason="CUDA present: the gpu-marked twins run these cases compiled")


def _on(inp, device):
    """The same inputs on ``device`` (leaf tensors keeping requires_grad)."""
    return {n: None if t is None else t.detach().to(device).requires_grad_(t.requires_grad) for n, t in inp.items()}


# ---------------------------------------------------------------------------------------------------- molora

# (T, E, top_k, r, r_s): T=1, T not a multiple of any block, E=1, k=E, no shared experts, wide E*r.
CASES = [
    (0, 8, 2, 16, 32),
    (1, 8, 2, 16, 32),
    (7, 2, 1, 8, 16),
    (7, 1, 1, 8, 8),
    (45, 8, 2, 16, 32),
    (37, 8, 8, 1, 4),
    (33, 6, 3, 4, 0),
    (41, 64, 2, 8, 16),
]


@interp
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("path", ["dense", "grouped"])
@pytest.mark.parametrize("T,E,top_k,r,r_s", CASES)
def test_molora_matches_float64_oracle(T, E, top_k, r, r_s, path, dtype, monkeypatch):
    monkeypatch.setenv("MEDCARE_TRITON_MOLORA_PATH", path)
    inp = test_molora_linear.make(T, 40, 24, E, r, r_s, dtype)  # d_in, d_out: not multiples of 16
    test_molora_linear.check(inp, top_k, 1.7, "triton", None, dtype, monkeypatch)


@interp
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("variant", list(test_molora_linear.VARIANTS))
def test_molora_variants(variant, dtype, monkeypatch):
    opts = dict(test_molora_linear.VARIANTS[variant])
    r_s = opts.pop("r_s", 12)
    inp = test_molora_linear.make(50, 33, 20, 6, 4, r_s, dtype, **opts)
    test_molora_linear.check(inp, 2, 0.5, "triton", None, dtype, monkeypatch)


@interp
@pytest.mark.parametrize("path", ["dense", "grouped"])
@pytest.mark.parametrize("base", ["triton", "cublas"])
def test_molora_base_modes_and_router_loss(base, path, monkeypatch):
    """Both base-GEMM modes, both paths, with a loss on the returned logits too."""
    monkeypatch.setenv("MEDCARE_TRITON_BASE", base)
    monkeypatch.setenv("MEDCARE_TRITON_MOLORA_PATH", path)
    inp = test_molora_linear.make(40, 24, 16, 8, 4, 8, torch.float32)
    test_molora_linear.check(inp, 2, 1.0, "triton", None, torch.float32, monkeypatch, logits_grad=True)


@interp
@pytest.mark.parametrize("path", ["dense", "grouped"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_skewed_routing_idle_experts_get_exact_zero_grads(path, dtype, monkeypatch):
    monkeypatch.setenv("MEDCARE_TRITON_MOLORA_PATH", path)
    E, top_k = 8, 2
    inp = test_molora_linear.make(37, 32, 24, E, 4, 8, dtype)
    with torch.no_grad():
        inp["router_bias"].zero_()
        inp["router_bias"][5] = 50.0  # experts 5 and 2 take every token; the others idle (p ~ e^-49).
        inp["router_bias"][2] = 49.5  # Close biases keep the router gradient well conditioned in fp32.
    test_molora_linear.check(inp, top_k, 1.0, "triton", None, dtype, monkeypatch)
    names = test_molora_linear.NAMES[:9]
    y, _ = mk.molora_linear(*[inp[n] for n in names], top_k=top_k, scaling=1.0, backend="triton")
    dA, dB = torch.autograd.grad(y.float().square().sum(), [inp["lora_A"], inp["lora_B"]])
    idle = [e for e in range(E) if e not in (2, 5)]
    assert torch.equal(dA[idle], torch.zeros_like(dA[idle])) and torch.equal(dB[idle], torch.zeros_like(dB[idle]))
    assert dA[5].abs().sum() > 0 and dB[2].abs().sum() > 0


@interp
def test_molora_saved_state_is_rank_space_only():
    T, d_in, d_out, E, r, r_s, k = 64, 32, 256, 8, 4, 8, 2
    inp = test_molora_linear.make(T, d_in, d_out, E, r, r_s, torch.float32)
    inputs = {t.data_ptr() for t in inp.values() if t is not None}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in inputs:
            total += t.numel()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mk.molora_linear(*[inp[n] for n in test_molora_linear.NAMES[:9]], top_k=k, scaling=1.0, backend="triton")
    assert 0 < total <= T * (k * r + r_s + E + 2 * k)


@interp
def test_fresh_adapter_equals_base_linear():
    inp = test_molora_linear.make(17, 12, 10, 4, 3, 6, torch.float32)
    with torch.no_grad():
        inp["lora_B"].zero_()
        inp["shared_B"].zero_()
    y, _ = mk.molora_linear(*[inp[n] for n in test_molora_linear.NAMES[:9]], top_k=2, scaling=2.0,
                            backend="triton")
    torch.testing.assert_close(y, torch.nn.functional.linear(inp["x"], inp["weight"], inp["bias"]))


# ---------------------------------------------------------------------------------------------------- others

@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("T,E,top_k", [(0, 8, 2), (1, 8, 2), (7, 2, 1), (37, 8, 8), (70, 8, 2), (33, 64, 64),
                                       (5, 1, 1)])
def test_route_matches_float64_oracle(T, E, top_k, dtype):
    test_route.test_matches_float64_oracle(T, E, top_k, dtype, "triton")


@interp
def test_route_ties_go_to_the_lower_index():
    test_route.test_ties_go_to_the_lower_index("triton")


@interp
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("T,r", [(0, 8), (1, 16), (7, 1), (45, 8)])
def test_lora_matches_float64_oracle(T, r, dtype):
    test_lora_linear.check(test_lora_linear.make((T, 40), 24, r, dtype), 2.0, "triton", dtype)


@interp
@pytest.mark.parametrize("variant", list(test_lora_linear.VARIANTS))
def test_lora_variants(variant):
    opts = dict(test_lora_linear.VARIANTS[variant])
    shape = opts.pop("shape", (50, 40))
    test_lora_linear.check(test_lora_linear.make(shape, 24, 8, torch.bfloat16, **opts), 0.5, "triton",
                           torch.bfloat16)


@interp
def test_lora_cublas_base(monkeypatch):
    monkeypatch.setenv("MEDCARE_TRITON_BASE", "cublas")
    test_lora_linear.check(test_lora_linear.make((33, 40), 24, 8, torch.float32), 0.5, "triton", torch.float32)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layers", [test_orthogonal_penalty.LAYERS, [(1, 1, 1)], [(20, 40, 33), (3, 5, 17)]],
                         ids=["ragged", "tiny", "wide"])
def test_penalty_matches_float64_oracle(layers, dtype):
    test_orthogonal_penalty.test_matches_float64_oracle(layers, dtype, "triton")


@interp
def test_penalty_frozen_base_gets_no_gradient():
    base, orth = test_orthogonal_penalty.make(test_orthogonal_penalty.LAYERS, torch.float32, grad_base=False)
    p = mk.orthogonal_penalty(base, orth, backend="triton")
    grads = torch.autograd.grad(p, orth)
    assert all(g.abs().sum() > 0 for g in grads) and all(b.grad is None for b in base)


# ---------------------------------------------------------------------------------------------------- errors, dispatch

@interp
def test_float64_is_refused_with_a_clear_error():
    x = torch.randn(4, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"triton backend's lora_linear supports float16, bfloat16 and float32.*"
                                        r"backend='torch'"):
        mk.lora_linear(x, torch.randn(6, 8, dtype=torch.float64), None, torch.randn(2, 8, dtype=torch.float64),
                       torch.randn(6, 2, dtype=torch.float64), scaling=1.0, backend="triton")
    with pytest.raises(TypeError, match="route supports float16"):
        mk.route(torch.randn(3, 4, dtype=torch.float64), 2, backend="triton")


def test_auto_on_cuda_picks_triton_and_torch_for_float64():
    """``auto`` for CUDA tensors: triton when it can run (resolution needs no GPU), torch for float64."""
    from medcare_kernels.ops import lora_linear, molora_linear, orthogonal_penalty, route

    cuda = torch.device("cuda")
    x = torch.randn(4096, 8)
    orders = {route: route._FAST, lora_linear: lora_linear._FAST, orthogonal_penalty: orthogonal_penalty._FAST,
              molora_linear: molora_linear._fast_order(4096, x)}
    for mod, order in orders.items():
        assert be.resolve_backend("auto", cuda, mod._OP,
                                  choose=lambda av, o=order: be.pick_fast(av, torch.bfloat16, o)) == "triton"
        assert be.pick_fast(["triton"], torch.float64, order) == "torch"
    assert be.resolve_backend("auto", torch.device("cpu"), "molora_linear", choose=lambda av: "triton") == "torch"


def test_unavailable_reason_names_what_is_missing(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in be.backend_unavailable_reason("triton", "cpu")
    assert be.backend_unavailable_reason("triton", "cuda") is None
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert "triton package is not installed" in be.backend_unavailable_reason("triton", "cuda")


def test_importing_the_library_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, medcare_kernels; assert 'triton' not in sys.modules, 'triton imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ---------------------------------------------------------------------------------------------------- GPU
# The same cases compiled on CUDA (inputs made on the CPU, the float64 oracle on the CPU), plus larger shapes.

def _cuda_molora_check(inp, top_k, scaling, dtype, logits_grad=False):
    names = test_molora_linear.NAMES
    gpu = _on(inp, "cuda")
    y, logits = mk.molora_linear(*[gpu[n] for n in names[:9]], top_k=top_k, scaling=scaling, lora_x=gpu["lora_x"],
                                 backend="triton")
    d_out = inp["weight"].shape[0]
    T = logits.shape[0]
    assert y.dtype == inp["x"].dtype and logits.dtype == torch.float32
    idx = test_molora_linear.library_indices(gpu, top_k, scaling, "triton", logits.detach()).cpu()
    ref = {n: oracle.leaf64(inp[n]) for n in names}
    x2 = lambda t: None if t is None else t.reshape(-1, t.shape[-1])  # noqa: E731
    y64, logits64, _ = oracle.molora(*[x2(ref[n]) if n == "x" else ref[n] for n in names[:9]], top_k, scaling,
                                     lora_x=x2(ref["lora_x"]), indices=idx)
    if T:
        differs = (idx != oracle.route_indices(logits64.detach(), top_k)).any(1)
        assert (oracle.order_margin(logits64, top_k)[differs] < 1e-4).all(), "routing differs beyond near-ties"
    assert_close(y.cpu().reshape(T, d_out), y64, dtype, "y")
    assert_close(logits.cpu(), logits64, torch.float32, "logits")
    gy = torch.randn(y.shape).to(dtype)
    seeds, seeds64 = [(y, gy.cuda())], [(y64, gy.double().reshape(T, d_out))]
    if logits_grad:
        gl = torch.randn(logits.shape, dtype=torch.float64)
        seeds.append((logits, gl.cuda()))
        seeds64.append((logits64, gl))
    got = grads_of(seeds, [gpu[n] for n in names])
    want = grads_of(seeds64, [ref[n] for n in names])
    for name, g, w, t in zip(names, got, want, [inp[n] for n in names]):
        if t is None or not t.requires_grad:
            assert g is None
            continue
        assert g.dtype == t.dtype, f"{name} grad dtype"
        assert_close(g.cpu().reshape(w.shape), w, dtype, f"d{name}")


gpu_case = pytest.mark.gpu


@gpu_case
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("path", ["dense", "grouped"])
@pytest.mark.parametrize("T,E,top_k,r,r_s", CASES)
def test_gpu_molora_matches_float64_oracle(T, E, top_k, r, r_s, path, dtype, monkeypatch):
    monkeypatch.setenv("MEDCARE_TRITON_MOLORA_PATH", path)
    _cuda_molora_check(test_molora_linear.make(T, 40, 24, E, r, r_s, dtype), top_k, 1.7, dtype)


@gpu_case
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("variant", list(test_molora_linear.VARIANTS))
def test_gpu_molora_variants(variant, dtype):
    opts = dict(test_molora_linear.VARIANTS[variant])
    r_s = opts.pop("r_s", 12)
    _cuda_molora_check(test_molora_linear.make(50, 33, 20, 6, 4, r_s, dtype, **opts), 2, 0.5, dtype)


@gpu_case
@pytest.mark.parametrize("path", ["dense", "grouped"])
@pytest.mark.parametrize("base", ["triton", "cublas"])
@pytest.mark.parametrize("T", [1, 16, 300, 2048])
def test_gpu_molora_larger_shapes(T, base, path, monkeypatch):
    monkeypatch.setenv("MEDCARE_TRITON_MOLORA_PATH", path)
    monkeypatch.setenv("MEDCARE_TRITON_BASE", base)
    for dtype in DTYPES:
        _cuda_molora_check(test_molora_linear.make(T, 200, 312, 8, 16, 32, dtype), 2, 2.0, dtype, logits_grad=True)


@gpu_case
def test_gpu_molora_qwen_like_width_and_wide_experts(monkeypatch):
    _cuda_molora_check(test_molora_linear.make(512, 896, 1216, 8, 16, 32, torch.bfloat16), 2, 2.0, torch.bfloat16)
    monkeypatch.setenv("MEDCARE_TRITON_MOLORA_PATH", "grouped")
    _cuda_molora_check(test_molora_linear.make(700, 512, 640, 64, 16, 32, torch.bfloat16), 2, 2.0, torch.bfloat16)


@gpu_case
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("T,E,top_k", [(1, 8, 2), (7, 2, 1), (37, 8, 8), (5000, 8, 2), (33, 64, 64), (5, 1, 1)])
def test_gpu_route_matches_float64_oracle(T, E, top_k, dtype):
    logits = (torch.randn(T, E) * 2).to(dtype)
    gpu = logits.cuda().requires_grad_(True)
    weights, indices = mk.route(gpu, top_k, backend="triton")
    ref = oracle.leaf64(logits.requires_grad_(True))
    differs = (indices.cpu() != oracle.route_indices(ref, top_k)).any(1)
    assert (oracle.order_margin(ref, top_k)[differs] < 1e-6).all()
    w64, _ = oracle.route(ref, top_k, indices.cpu())
    assert_close(weights.cpu(), w64, torch.float32, "weights")
    g = torch.randn(T, top_k, dtype=torch.float64)
    (got,) = torch.autograd.grad((weights.double() * g.cuda()).sum(), gpu)
    (want,) = torch.autograd.grad((w64 * g).sum(), ref)
    assert_close(got.cpu(), want, torch.float32 if dtype == torch.float32 else dtype, "d logits")


@gpu_case
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape,d_out,r", [((1, 40), 24, 16), ((7, 40), 24, 1), ((3, 9, 40), 24, 8),
                                           ((1000, 896), 1216, 16)])
@pytest.mark.parametrize("base", ["triton", "cublas"])
def test_gpu_lora_matches_float64_oracle(shape, d_out, r, dtype, base, monkeypatch):
    monkeypatch.setenv("MEDCARE_TRITON_BASE", base)
    names = test_lora_linear.NAMES
    inp = test_lora_linear.make(shape, d_out, r, dtype, lora_x=True, weight_grad=True)
    gpu = _on(inp, "cuda")
    y = mk.lora_linear(*[gpu[n] for n in names[:5]], scaling=0.5, lora_x=gpu["lora_x"], backend="triton")
    ref = {n: oracle.leaf64(inp[n]) for n in names}
    y64 = oracle.lora(*[ref[n] for n in names[:5]], 0.5, ref["lora_x"])
    assert_close(y.cpu(), y64, dtype, "y")
    gy = torch.randn(y.shape).to(dtype)
    got = grads_of([(y, gy.cuda())], [gpu[n] for n in names])
    want = grads_of([(y64, gy.double())], [ref[n] for n in names])
    for name, g, w in zip(names, got, want):
        assert_close(g.cpu(), w, dtype, f"d{name}")


@gpu_case
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("layers", [test_orthogonal_penalty.LAYERS, [(1, 1, 1)], [(32, 32, 896), (32, 32, 4864)]],
                         ids=["ragged", "tiny", "qwen"])
def test_gpu_penalty_matches_float64_oracle(layers, dtype):
    base, orth = test_orthogonal_penalty.make(layers, dtype)
    gb, go = [_on({"t": t}, "cuda")["t"] for t in base], [_on({"t": t}, "cuda")["t"] for t in orth]
    p = mk.orthogonal_penalty(gb, go, backend="triton")
    base64, orth64 = [oracle.leaf64(t) for t in base], [oracle.leaf64(t) for t in orth]
    p64 = oracle.orthogonal_penalty(base64, orth64)
    assert_close(p.cpu(), p64, torch.float32, "penalty")
    for i, (g, w) in enumerate(zip(torch.autograd.grad(p, gb + go), torch.autograd.grad(p64, base64 + orth64))):
        assert_close(g.cpu(), w, dtype, f"grad {i}")


@gpu_case
def test_gpu_skewed_routing_idle_experts_get_exact_zero_grads():
    inp = test_molora_linear.make(300, 64, 48, 8, 16, 32, torch.bfloat16)
    with torch.no_grad():
        inp["router_bias"].zero_()
        inp["router_bias"][5] = 50.0
        inp["router_bias"][2] = 49.5
    gpu = _on(inp, "cuda")
    y, _ = mk.molora_linear(*[gpu[n] for n in test_molora_linear.NAMES[:9]], top_k=2, scaling=1.0, backend="triton")
    dA, dB = torch.autograd.grad(y.float().square().sum(), [gpu["lora_A"], gpu["lora_B"]])
    idle = [e for e in range(8) if e not in (2, 5)]
    assert (dA[idle] == 0).all() and (dB[idle] == 0).all() and dA[5].abs().sum() > 0


@gpu_case
def test_gpu_compile_fullgraph_with_triton(monkeypatch):
    from tests.test_custom_ops import Tiny

    monkeypatch.setenv("MEDCARE_BACKEND", "triton")
    model = Tiny().cuda()
    x = torch.randn(2, 5, 16, device="cuda")
    eager = model(x)
    params = [p for p in model.parameters() if p.requires_grad]
    eager_grads = torch.autograd.grad(eager, params)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    grads = torch.autograd.grad(out, params)
    torch.testing.assert_close(out, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


@gpu_case
def test_gpu_auto_runs_triton(monkeypatch):
    """``backend="auto"`` on CUDA tensors dispatches to the triton implementation."""
    from medcare_kernels.triton import lora_linear as triton_lora

    calls = []
    real = triton_lora.forward
    monkeypatch.setattr(triton_lora, "forward", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(4, 16, device="cuda")
    mk.lora_linear(x, torch.randn(8, 16, device="cuda"), None, torch.randn(2, 16, device="cuda"),
                   torch.randn(8, 2, device="cuda"), scaling=1.0)
    assert calls == [1]
