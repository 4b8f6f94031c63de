"""lora_linear: forward and every gradient against the float64 oracle, for each backend and dtype."""

from __future__ import annotations

import pytest
import torch

import medcare_kernels as mk
from tests import oracle
from tests.conftest import assert_close, grads_of, leaf_on

NAMES = ("x", "weight", "bias", "lora_A", "lora_B", "lora_x")


def make(shape, d_out, r, dtype, *, lora_dtype=None, bias=True, lora_x=False, weight_grad=False, noncontig=False):
    d_in = shape[-1]
    lora_dtype = lora_dtype or dtype

    def rand(*size, dt=dtype, scale=1.0, grad=True):
        return (torch.randn(*size) * scale).to(dt).requires_grad_(grad)

    if noncontig:
        x = torch.randn(d_in, *shape[:-1]).to(dtype).movedim(0, -1).requires_grad_(True)
    else:
        x = rand(*shape)
    return dict(x=x, weight=rand(d_out, d_in, scale=d_in ** -0.5, grad=weight_grad),
                bias=rand(d_out, grad=weight_grad) if bias else None,
                lora_A=rand(r, d_in, dt=lora_dtype, scale=d_in ** -0.5),
                lora_B=rand(d_out, r, dt=lora_dtype, scale=r ** -0.5),
                lora_x=rand(*shape) if lora_x else None)


def check(inp, scaling, backend, dtype, *, device="cpu"):
    """Forward and every gradient of the library on ``device`` (leaf copies of the CPU tensors ``inp``)
    vs the float64 oracle on the CPU."""
    dev = {n: leaf_on(inp[n], device) for n in NAMES}
    y = mk.lora_linear(dev["x"], dev["weight"], dev["bias"], dev["lora_A"], dev["lora_B"], scaling=scaling,
                       lora_x=dev["lora_x"], backend=backend)
    assert y.shape == (*inp["x"].shape[:-1], inp["weight"].shape[0]) and y.dtype == inp["x"].dtype
    assert y.device == dev["x"].device
    ref = {n: oracle.leaf64(inp[n]) for n in NAMES}
    y64 = oracle.lora(ref["x"], ref["weight"], ref["bias"], ref["lora_A"], ref["lora_B"], scaling, ref["lora_x"])
    assert_close(y, y64, dtype, "y")
    gy = torch.randn(y.shape).to(y.dtype).to(torch.float64)  # what the library receives, exactly
    got = grads_of([(y, gy.to(y.device))], [dev[n] for n in NAMES])
    want = grads_of([(y64, gy)], [ref[n] for n in NAMES])
    for name, g, w, t in zip(NAMES, got, want, [dev[n] for n in NAMES]):
        if t is None or not t.requires_grad:
            assert g is None
            continue
        assert g.dtype == t.dtype and g.device == t.device, f"{name} grad dtype/device"
        assert_close(g, w, dtype, f"d{name}")


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("T,r", [(0, 8), (1, 16), (7, 1), (64, 8), (1000, 16)])
def test_matches_float64_oracle(T, r, dtype, backend):
    check(make((T, 40), 24, r, dtype), 2.0, backend, dtype)


VARIANTS = {
    "no-bias": dict(bias=False),
    "3d-input": dict(shape=(3, 7, 40)),
    "non-contiguous-x": dict(shape=(4, 9, 40), noncontig=True),
    "lora-x": dict(lora_x=True),
    "frozen-weight-trains": dict(weight_grad=True),
    "fp32-lora-params": dict(lora_dtype=torch.float32),
}


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants(variant, dtype, backend):
    opts = dict(VARIANTS[variant])
    shape = opts.pop("shape", (50, 40))
    check(make(shape, 24, 8, dtype, **opts), 0.5, backend, dtype)


def test_gradcheck_float64():
    inp = make((6, 7), 5, 3, torch.float64, weight_grad=True, lora_x=True)
    fn = lambda *a: mk.lora_linear(*a[:5], scaling=0.7, lora_x=a[5])  # noqa: E731
    assert torch.autograd.gradcheck(fn, [inp[n] for n in NAMES])
