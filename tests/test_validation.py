"""Bad input raises ValueError/TypeError naming the argument and the expected shape or dtype."""

from __future__ import annotations

import re

import pytest
import torch

import medcare_kernels as mk


def molora_args(T=5, d_in=12, d_out=10, E=4, r=3, r_s=6, dtype=torch.float32):
    return dict(x=torch.randn(T, d_in, dtype=dtype), weight=torch.randn(d_out, d_in, dtype=dtype),
                bias=torch.randn(d_out, dtype=dtype), router_weight=torch.randn(E, d_in),
                router_bias=torch.randn(E), lora_A=torch.randn(E, r, d_in), lora_B=torch.randn(E, d_out, r),
                shared_A=torch.randn(r_s, d_in), shared_B=torch.randn(d_out, r_s))


def call(args, **kw):
    kw.setdefault("top_k", 2)
    kw.setdefault("scaling", 1.0)
    return mk.molora_linear(*args.values(), **kw)


def expect(err, pattern, fn):
    with pytest.raises(err, match=pattern):
        fn()


@pytest.mark.parametrize("change,err,pattern", [
    (dict(x=torch.randn(5, 11)), ValueError, r"x must have d_in = weight.shape\[1\] = 12"),
    (dict(weight=torch.randn(10, 12, 1)), ValueError, r"weight must be 2-D"),
    (dict(bias=torch.randn(9)), ValueError, r"bias must have shape \[d_out\] = \[10\]"),
    (dict(router_weight=torch.randn(4, 11)), ValueError, r"router_weight must have shape \[E, d_in\] = \[4, 12\]"),
    (dict(router_bias=torch.randn(5)), ValueError, r"router_bias must have shape \[E\] = \[4\]"),
    (dict(lora_A=torch.randn(3, 3, 12)), ValueError, r"lora_A must have shape \[E, r, d_in\] = \[4, 3, 12\]"),
    (dict(lora_A=torch.randn(4, 12)), ValueError, r"lora_A must be 3-D"),
    (dict(lora_B=torch.randn(4, 10, 2)), ValueError, r"lora_B must have shape \[E, d_out, r\].*= \[4, 10, 3\]"),
    (dict(shared_B=torch.randn(10, 5)), ValueError, r"shared_B must have shape \[d_out, r_s\].*= \[10, 6\]"),
    (dict(shared_B=None), ValueError, r"shared_A and shared_B must be given together"),
    (dict(x=torch.randint(0, 3, (5, 12))), TypeError, r"x must have a floating dtype"),
    (dict(lora_A=torch.randint(0, 3, (4, 3, 12))), TypeError, r"lora_A must have a floating dtype"),
    (dict(x="not a tensor"), TypeError, r"x must be a torch.Tensor, got str"),
    (dict(weight=torch.randn(10, 12, dtype=torch.float64)), TypeError, r"weight must have the dtype of x"),
    (dict(lora_B=torch.randn(4, 10, 3, dtype=torch.float64)), TypeError, r"lora_B must have the dtype of lora_A"),
    (dict(lora_B=torch.randn(4, 10, 3, device="meta")), ValueError, r"lora_B is on meta but x is on cpu"),
    (dict(x=torch.randn(5, 0), weight=torch.randn(10, 0), router_weight=torch.randn(4, 0),
          lora_A=torch.randn(4, 3, 0), shared_A=torch.randn(6, 0)), ValueError,
     r"weight must have d_in >= 1 input features, got shape \[10, 0\]"),
    (dict(lora_A=torch.randn(4, 0, 12), lora_B=torch.randn(4, 10, 0)), ValueError,
     r"lora_A must have r >= 1 \(lora_A is \[E, r, d_in\]\), got r = 0"),
    (dict(shared_A=torch.randn(0, 12), shared_B=torch.randn(10, 0)), ValueError,
     r"shared_A must have r_s >= 1 .*pass shared_A=shared_B=None for no shared experts"),
])
def test_molora_bad_tensors(change, err, pattern):
    args = molora_args()
    args.update(change)
    expect(err, pattern, lambda: call(args))


@pytest.mark.parametrize("kw,err,pattern", [
    (dict(top_k=5), ValueError, r"top_k must satisfy 1 <= top_k <= E = 4, got 5"),
    (dict(top_k=0), ValueError, r"top_k must satisfy 1 <= top_k <= E = 4, got 0"),
    (dict(top_k=2.0), TypeError, r"top_k must be an int"),
    (dict(scaling="2"), TypeError, r"scaling must be a float"),
    (dict(scaling=float("nan")), ValueError, r"scaling must be a finite float, got nan"),
    (dict(scaling=float("inf")), ValueError, r"scaling must be a finite float, got inf"),
    (dict(lora_x=torch.randn(5, 13)), ValueError, r"lora_x must have shape x.shape = \[5, 12\]"),
    (dict(lora_x=torch.randn(5, 12, dtype=torch.float64)), TypeError, r"lora_x must have the dtype of x"),
    (dict(backend="cutlass"), ValueError, r"backend must be one of .*'torch'.* or 'auto', got 'cutlass'"),
    (dict(backend=3), TypeError, r"backend must be a str"),
])
def test_molora_bad_arguments(kw, err, pattern):
    expect(err, pattern, lambda: call(molora_args(), **kw))


def test_route_errors():
    expect(ValueError, r"top_k must satisfy 1 <= top_k <= E = 4, got 5", lambda: mk.route(torch.randn(3, 4), 5))
    expect(TypeError, r"logits must have a floating dtype", lambda: mk.route(torch.ones(3, 4, dtype=torch.long), 1))
    expect(ValueError, r"logits must have at least one expert", lambda: mk.route(torch.randn(3, 0), 1))


def test_lora_linear_errors():
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    expect(ValueError, r"lora_B must have shape \[d_out, r\].*= \[6, 3\]",
           lambda: mk.lora_linear(x, w, None, torch.randn(3, 8), torch.randn(6, 4), scaling=1.0))
    expect(ValueError, r"lora_A must have shape \[r, d_in\] = \[3, 8\]",
           lambda: mk.lora_linear(x, w, None, torch.randn(3, 7), torch.randn(6, 3), scaling=1.0))
    expect(ValueError, r"x must have d_in = weight.shape\[1\] = 8",
           lambda: mk.lora_linear(torch.randn(4, 9), w, None, torch.randn(3, 8), torch.randn(6, 3), scaling=1.0))
    expect(TypeError, r"lora_A must have a floating dtype",
           lambda: mk.lora_linear(x, w, None, torch.ones(3, 8, dtype=torch.int32), torch.randn(6, 3), scaling=1.0))
    expect(ValueError, r"lora_A must have r >= 1",
           lambda: mk.lora_linear(x, w, None, torch.randn(0, 8), torch.randn(6, 0), scaling=1.0))
    expect(ValueError, r"weight must have d_in >= 1",
           lambda: mk.lora_linear(torch.randn(4, 0), torch.randn(6, 0), None, torch.randn(3, 0), torch.randn(6, 3),
                                  scaling=1.0))
    expect(ValueError, r"scaling must be a finite float, got -inf",
           lambda: mk.lora_linear(x, w, None, torch.randn(3, 8), torch.randn(6, 3), scaling=float("-inf")))


def test_orthogonal_penalty_errors():
    a, b = torch.randn(4, 8), torch.randn(2, 8)
    expect(ValueError, r"same length", lambda: mk.orthogonal_penalty([a, a], [b]))
    expect(ValueError, r"at least one pair", lambda: mk.orthogonal_penalty([], []))
    expect(ValueError, re.escape("base_A[1] [r1, d] and orth_A[1] [r2, d] must share d, got [4, 8] and [2, 7]"),
           lambda: mk.orthogonal_penalty([a, a], [b, torch.randn(2, 7)]))
    expect(TypeError, r"base_A must be a list or tuple", lambda: mk.orthogonal_penalty(a, [b]))
    expect(ValueError, r"orth_A\[0\] must be 2-D", lambda: mk.orthogonal_penalty([a], [torch.randn(2, 2, 8)]))
    meta = torch.randn(2, 8, device="meta")
    expect(ValueError, r"orth_A\[0\] is on meta", lambda: mk.orthogonal_penalty([a], [meta]))
