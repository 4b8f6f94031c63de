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
from tests import test_lora_linear, test_molora_linear, test_orthogonal_penalty, test_route

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
#: Both twins of a case as a parameter: CPU tensors under the interpreter, and compiled on CUDA (``gpu``).
DEVICES = [pytest.param("cpu", marks=interp, id="interp"), pytest.param("cuda", marks=pytest.mark.gpu, id="gpu")]


# ---------------------------------------------------------------------------------------------------- molora

#: Router biases that send every token to experts 5 and 2 (the others idle, p ~ e^-49); close biases keep
#: the router gradient well conditioned in fp32.
SKEWED = {5: 50.0, 2: 49.5}

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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("path", ["dense", "grouped"])
@pytest.mark.parametrize("T,E,top_k,r,r_s", CASES)
def test_molora_matches_float64_oracle(T, E, top_k, r, r_s, path, dtype, device, monkeypatch):
    monkeypatch.setenv("MEDCARE_TRITON_MOLORA_PATH", path)
    inp = test_molora_linear.make(T, 40, 24, E, r, r_s, dtype)  # d_in, d_out: not multiples of 16
    test_molora_linear.check(inp, top_k, 1.7, "triton", dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("variant", list(test_molora_linear.VARIANTS))
def test_molora_variants(variant, dtype, device):
    opts = dict(test_molora_linear.VARIANTS[variant])
    r_s = opts.pop("r_s", 12)
    test_molora_linear.check(test_molora_linear.make(50, 33, 20, 6, 4, r_s, dtype, **opts), 2, 0.5, "triton", dtype,
                             device=device)


@interp
@pytest.mark.parametrize("path", ["dense", "grouped"])
@pytest.mark.parametrize("base", ["triton", "cublas"])
def test_molora_base_modes_and_router_loss(base, path, monkeypatch):
    """Both base-GEMM modes, both paths, with a loss on the returned logits too."""
    monkeypatch.setenv("MEDCARE_TRITON_BASE", base)
    monkeypatch.setenv("MEDCARE_TRITON_MOLORA_PATH", path)
    test_molora_linear.check(test_molora_linear.make(40, 24, 16, 8, 4, 8, torch.float32), 2, 1.0, "triton",
                             torch.float32, logits_grad=True)


@interp
@pytest.mark.parametrize("path", ["dense", "grouped"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_skewed_routing_idle_experts_get_exact_zero_grads(path, dtype, monkeypatch):
    monkeypatch.setenv("MEDCARE_TRITON_MOLORA_PATH", path)
    test_molora_linear.check_idle_experts(test_molora_linear.make(37, 32, 24, 8, 4, 8, dtype), 2, SKEWED, "triton",
                                          dtype)


@interp
def test_molora_saved_state_is_rank_space_only():
    T, d_in, d_out, E, r, r_s, k = 64, 32, 256, 8, 4, 8, 2
    inp = test_molora_linear.make(T, d_in, d_out, E, r, r_s, torch.float32)
    assert 0 < test_molora_linear.saved_numel(inp, k, "triton") <= T * (k * r + r_s + E + 2 * k)


@interp
def test_fresh_adapter_equals_base_linear():
    torch.testing.assert_close(*test_molora_linear.fresh_adapter_and_base_linear("triton"))


# ---------------------------------------------------------------------------------------------------- others

@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("T,E,top_k", [(0, 8, 2), (1, 8, 2), (7, 2, 1), (37, 8, 8), (70, 8, 2), (33, 64, 64),
                                       (5, 1, 1)])
def test_route_matches_float64_oracle(T, E, top_k, dtype):
    test_route.check(T, E, top_k, dtype, "triton")


@interp
def test_route_ties_go_to_the_lower_index():
    test_route.check_ties("triton")


@interp
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("T,r", [(0, 8), (1, 16), (7, 1), (45, 8)])
def test_lora_matches_float64_oracle(T, r, dtype):
    test_lora_linear.check(test_lora_linear.make((T, 40), 24, r, dtype), 2.0, "triton", dtype)


@interp
@pytest.mark.parametrize("base", ["auto", "cublas"])
@pytest.mark.parametrize("variant", list(test_lora_linear.VARIANTS))
def test_lora_variants(variant, base, monkeypatch):
    """Every variant with the default base and with the cuBLAS base (``dy @ W`` by cuBLAS in the backward)."""
    monkeypatch.setenv("MEDCARE_TRITON_BASE", base)
    opts = dict(test_lora_linear.VARIANTS[variant])
    shape = opts.pop("shape", (50, 40))
    test_lora_linear.check(test_lora_linear.make(shape, 24, 8, torch.bfloat16, **opts), 0.5, "triton",
                           torch.bfloat16)


@interp
@pytest.mark.parametrize("variant", ["lora-x", "lora-x-3d", "no-shared", "fp32-lora-params"])
def test_molora_cublas_base_variants(variant, monkeypatch):
    """The cuBLAS base (auto's choice from CUBLAS_BASE_MIN_TOKENS tokens): dy @ W by cuBLAS in the backward,
    the LoRA and router terms of dx added in place, with and without a separate LoRA input."""
    monkeypatch.setenv("MEDCARE_TRITON_BASE", "cublas")
    opts = dict(test_molora_linear.VARIANTS[variant])
    r_s = opts.pop("r_s", 12)
    test_molora_linear.check(test_molora_linear.make(50, 33, 20, 6, 4, r_s, torch.bfloat16, **opts), 2, 0.5,
                             "triton", torch.bfloat16)


def test_base_mode_auto_switches_to_cublas_for_many_tokens(monkeypatch):
    from medcare_kernels.triton.molora_linear import CUBLAS_BASE_MIN_TOKENS, base_mode

    assert base_mode(CUBLAS_BASE_MIN_TOKENS - 1) == "triton"
    assert base_mode(CUBLAS_BASE_MIN_TOKENS) == "cublas"
    monkeypatch.setenv("MEDCARE_TRITON_BASE", "triton")
    assert base_mode(10**6) == "triton"
    monkeypatch.setenv("MEDCARE_TRITON_BASE", "cuBLAS")
    with pytest.raises(ValueError, match="MEDCARE_TRITON_BASE"):
        base_mode(1)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("layers", [test_orthogonal_penalty.LAYERS, [(1, 1, 1)], [(20, 40, 33), (3, 5, 17)]],
                         ids=["ragged", "tiny", "wide"])
def test_penalty_matches_float64_oracle(layers, dtype):
    test_orthogonal_penalty.check(layers, dtype, "triton")


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
    monkeypatch.setattr(be, "_TRITON_INSTALLED", False)  # looked up once, at import
    assert "triton package is not installed" in be.backend_unavailable_reason("triton", "cuda")


def test_importing_the_library_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, medcare_kernels; assert 'triton' not in sys.modules, 'triton imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ---------------------------------------------------------------------------------------------------- GPU
# The same cases compiled on CUDA (inputs made on the CPU, the float64 oracle on the CPU), plus larger shapes;
# the molora oracle cases and variants above take both devices as a parameter.

gpu_case = pytest.mark.gpu


@gpu_case
@pytest.mark.parametrize("path", ["dense", "grouped"])
@pytest.mark.parametrize("base", ["triton", "cublas"])
@pytest.mark.parametrize("T", [1, 16, 300, 2048])
def test_gpu_molora_larger_shapes(T, base, path, monkeypatch):
    monkeypatch.setenv("MEDCARE_TRITON_MOLORA_PATH", path)
    monkeypatch.setenv("MEDCARE_TRITON_BASE", base)
    for dtype in DTYPES:
        test_molora_linear.check(test_molora_linear.make(T, 200, 312, 8, 16, 32, dtype), 2, 2.0, "triton", dtype,
                                 device="cuda", logits_grad=True)


@gpu_case
def test_gpu_molora_qwen_like_width_and_wide_experts(monkeypatch):
    bf16 = torch.bfloat16
    test_molora_linear.check(test_molora_linear.make(512, 896, 1216, 8, 16, 32, bf16), 2, 2.0, "triton", bf16,
                             device="cuda")
    monkeypatch.setenv("MEDCARE_TRITON_MOLORA_PATH", "grouped")
    test_molora_linear.check(test_molora_linear.make(700, 512, 640, 64, 16, 32, bf16), 2, 2.0, "triton", bf16,
                             device="cuda")


@gpu_case
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("T,E,top_k", [(1, 8, 2), (7, 2, 1), (37, 8, 8), (5000, 8, 2), (33, 64, 64), (5, 1, 1)])
def test_gpu_route_matches_float64_oracle(T, E, top_k, dtype):
    test_route.check(T, E, top_k, dtype, "triton", device="cuda")


@gpu_case
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape,d_out,r", [((1, 40), 24, 16), ((7, 40), 24, 1), ((3, 9, 40), 24, 8),
                                           ((1000, 896), 1216, 16)])
@pytest.mark.parametrize("base", ["triton", "cublas"])
def test_gpu_lora_matches_float64_oracle(shape, d_out, r, dtype, base, monkeypatch):
    monkeypatch.setenv("MEDCARE_TRITON_BASE", base)
    inp = test_lora_linear.make(shape, d_out, r, dtype, lora_x=True, weight_grad=True)
    test_lora_linear.check(inp, 0.5, "triton", dtype, device="cuda")


@gpu_case
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("layers", [test_orthogonal_penalty.LAYERS, [(1, 1, 1)], [(32, 32, 896), (32, 32, 4864)]],
                         ids=["ragged", "tiny", "qwen"])
def test_gpu_penalty_matches_float64_oracle(layers, dtype):
    test_orthogonal_penalty.check(layers, dtype, "triton", device="cuda")


@gpu_case
def test_gpu_skewed_routing_idle_experts_get_exact_zero_grads():
    bf16 = torch.bfloat16
    test_molora_linear.check_idle_experts(test_molora_linear.make(300, 64, 48, 8, 16, 32, bf16), 2, SKEWED, "triton",
                                          bf16, device="cuda")


@gpu_case
def test_gpu_compile_fullgraph_with_triton(monkeypatch):
    from tests.test_custom_ops import check_compile_fullgraph_matches_eager

    monkeypatch.setenv("MEDCARE_BACKEND", "triton")
    check_compile_fullgraph_matches_eager("cuda")


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
