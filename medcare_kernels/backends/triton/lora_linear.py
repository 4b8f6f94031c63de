"""Plain LoRA linear in Triton: the MoLoRA kernels with only the "shared" (always-on) rank segment.

forward: ``z = lx @ A.T`` and ``H = s * z`` from the thin shrink GEMM
(:func:`~medcare_kernels.backends.triton.shrink.shrink_forward`), then ``y = x @ W.T + b + H @ B.T`` from the
K-extended GEMM (``y`` written once; ``MEDCARE_TRITON_BASE=cublas``: cuBLAS base + in-place LoRA add).
backward: ``dZ = s * dy @ B`` (thin GEMM), ``dx = dy @ W + dZ @ A`` (K-extended), ``dA = dZ.T @ lx`` and
``dB = dy.T @ H`` (token reductions).
"""

from __future__ import annotations

import torch

from medcare_kernels.backends.triton._common import check_dtypes, compute_dtype
from medcare_kernels.backends.triton.gemm import base_plus_lora, ext_gemm, weight_grad
from medcare_kernels.backends.triton.shrink import Layout, shrink_backward, shrink_forward


def _layout(r: int) -> Layout:
    return Layout(E=1, R=1, RS=r, K=1, routed=False)


def forward(x, weight, bias, lora_A, lora_B, lora_x, scaling: float):
    """x [T, d_in] -> (y [T, d_out] x.dtype, z [T, r] float32). Float16/bfloat16/float32 only."""
    check_dtypes("lora_linear", x=x, weight=weight, lora_A=lora_A, lora_B=lora_B)
    weight, lora_A, lora_B = weight.contiguous(), lora_A.contiguous(), lora_B.contiguous()
    bias = None if bias is None else bias.contiguous()
    L = _layout(lora_A.shape[0])
    hd = compute_dtype(x.dtype, lora_A.dtype, lora_B.dtype)
    _, _, _, z, h = shrink_forward(x, lora_x, None, lora_A, None, None, L, scaling, hd)
    return base_plus_lora(x, weight.T, bias, x.dtype, hz=h, shared=lora_B.T, layout=L), z


def backward(grad_y, x, lora_x, weight, lora_A, lora_B, z, scaling: float, needs):
    """Gradients for (x, weight, bias, lora_A, lora_B, lora_x), None where not needed, input dtypes."""
    check_dtypes("lora_linear", x=x, weight=weight, lora_A=lora_A, lora_B=lora_B)
    weight, lora_A, lora_B = weight.contiguous(), lora_A.contiguous(), lora_B.contiguous()
    need_x, need_w, need_b, need_a, need_bb, need_lx = needs
    r = lora_A.shape[0]
    L = _layout(r)
    lx = x if lora_x is None else lora_x
    hd = compute_dtype(x.dtype, lora_A.dtype, lora_B.dtype)
    d_x = d_a = d_bb = d_lx = None
    if need_x or need_a or need_bb or need_lx:
        dz, h, _ = shrink_backward(grad_y, None, lora_B, None, None, z, None, L, scaling, hd)
        if need_x:  # dx = dy @ W (+ dZ @ A when x is also the LoRA input)
            d_x = base_plus_lora(grad_y, weight, None, x.dtype, layout=L,
                                 **(dict(hz=dz, shared=lora_A) if lora_x is None else {}))
        if need_lx:
            d_lx = torch.empty_like(lora_x)
            ext_gemm(d_lx, hz=dz, shared=lora_A, layout=L)
        if need_a:
            d_a = weight_grad(dz, lx, lora_A.dtype)[:r].to(lora_A.dtype)
        if need_bb:
            d_bb = weight_grad(grad_y, h, lora_B.dtype)[:, :r].to(lora_B.dtype)
    d_w = (grad_y.T @ x).to(weight.dtype) if need_w else None
    d_b = grad_y.sum(0, dtype=torch.float32).to(weight.dtype) if need_b else None
    return [None if g is None else g.contiguous() for g in (d_x, d_w, d_b, d_a, d_bb, d_lx)]
