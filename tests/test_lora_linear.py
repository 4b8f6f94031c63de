"""lora_linear on every backend: forward and every gradient against the float64 oracle, and the custom op
that torch.compile traces."""

from __future__ import annotations

import pytest
import torch

import medcare_kernels as mk
from tests import helpers
from tests.helpers import BF16, F16, F32, F64

RUNS = helpers.runs("torch", "reference", "triton", "cuda")
NAMES = helpers.LORA_NAMES
CASES = [(0, 8), (1, 16), (7, 1), (45, 8), (64, 8), (1000, 16)]  # (T, r)


def _dtypes(run):
    return (F32, BF16) if run.backend == "triton" else (F32, BF16, F16)


@pytest.mark.parametrize("case,run,dtype", helpers.grid(CASES, RUNS, _dtypes,
                                                        lambda case, run, dt: not run.interpreted or case[0] <= 45))
def test_matches_float64_oracle(case, run, dtype, monkeypatch):
    T, r = case
    run.apply(monkeypatch)
    helpers.lora_check(helpers.lora_make((T, 40), 24, r, dtype), 2.0, run.backend, dtype, device=run.device)


@pytest.mark.parametrize("variant,run,dtype", helpers.grid(list(helpers.LORA_VARIANTS),
                                                           helpers.runs("torch", "reference", "cuda"), (F32, BF16)))
def test_variants(variant, run, dtype, monkeypatch):
    run.apply(monkeypatch)
    helpers.lora_check(helpers.lora_variant(variant, dtype), 0.5, run.backend, dtype, device=run.device)


@pytest.mark.parametrize("variant,run,dtype", helpers.grid(list(helpers.LORA_VARIANTS),
                                                           helpers.runs("triton", "triton-cublas"), (BF16,)))
def test_triton_variants_with_both_base_modes(variant, run, dtype, monkeypatch):
    """Every variant with the default base and with the cuBLAS base (``dy @ W`` by cuBLAS in the backward)."""
    run.apply(monkeypatch)
    helpers.lora_check(helpers.lora_variant(variant, dtype), 0.5, run.backend, dtype, device=run.device)


@pytest.mark.parametrize("run", helpers.by_run(helpers.runs("torch", "triton", "cuda")))
def test_eager_and_custom_op_paths_agree(run, monkeypatch):
    """The eager autograd.Function and the torch.library custom op (what torch.compile traces) run the same
    backend code: identical outputs and gradients."""
    run.apply(monkeypatch)
    inp = {n: helpers.leaf_on(t, run.device) for n, t in
           helpers.lora_make((23, 24), 16, 4, F32, lora_x=True, weight_grad=True).items()}
    tensors = [inp[n] for n in NAMES]
    y = helpers.lora_call(inp, 1.5, run.backend)
    gy = torch.randn_like(y)
    eager = torch.autograd.grad((y * gy).sum(), tensors)
    y2, _z = torch.ops.medcare_kernels.lora_linear(*tensors, 1.5, run.backend)
    assert torch.equal(y, y2)
    traced = torch.autograd.grad((y2 * gy).sum(), tensors)
    for name, a, b in zip(NAMES, eager, traced):
        assert torch.equal(a, b), f"d{name} differs between the eager and custom-op paths"


def test_gradcheck_float64():
    inp = helpers.lora_make((6, 7), 5, 3, F64, weight_grad=True, lora_x=True)
    fn = lambda *a: mk.lora_linear(*a[:5], scaling=0.7, lora_x=a[5])  # noqa: E731
    assert torch.autograd.gradcheck(fn, [inp[n] for n in NAMES])


def test_opcheck_custom_ops():
    ops = torch.ops.medcare_kernels
    x, w, a, b = torch.randn(5, 8), torch.randn(6, 8), torch.randn(3, 8), torch.randn(6, 3)
    torch.library.opcheck(ops.lora_linear.default, (x.requires_grad_(), w, None, a.requires_grad_(),
                                                    b.requires_grad_(), None, 2.0, "torch"))
    _y, z = ops.lora_linear(x.detach(), w, None, a.detach(), b.detach(), None, 2.0, "torch")
    torch.library.opcheck(ops.lora_linear_backward.default, (torch.randn(5, 6), x.detach(), None, w, a.detach(),
                                                             b.detach(), z, 2.0, [True] * 6, "torch"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, BF16], ids=helpers.dtype_id)
@pytest.mark.parametrize("shape,d_out,r", [((1, 40), 24, 16), ((7, 40), 24, 1), ((3, 9, 40), 24, 8),
                                           ((1000, 896), 1216, 16)])
@pytest.mark.parametrize("base", ["triton", "cublas"])
def test_gpu_triton_larger_shapes(shape, d_out, r, dtype, base, monkeypatch):
    monkeypatch.setenv("MEDCARE_TRITON_BASE", base)
    inp = helpers.lora_make(shape, d_out, r, dtype, lora_x=True, weight_grad=True)
    helpers.lora_check(inp, 0.5, "triton", dtype, device="cuda")
