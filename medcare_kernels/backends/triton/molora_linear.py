"""MoLoRA linear in Triton (``backend="triton"``): the forward and backward of the backend contract.

Dense-masked path (the default; MedCare's E*r = 8x16 = 128):

* forward: :func:`~medcare_kernels.backends.triton.shrink.shrink_forward` (one thin GEMM ``x @ [A_all; A_s; W_r].T``
  with softmax / top-k / renormalise / gate / mask fused into its epilogue) then
  :func:`~medcare_kernels.backends.triton.gemm.ext_gemm` (``y = x @ W.T + b + H @ [B_all | B_s].T``: the frozen
  GEMM with K extended by the rank space, ``y`` written once; experts no token of a row tile chose are
  skipped, and experts no token chose are never read). From ``CUBLAS_BASE_MIN_TOKENS`` tokens
  (:mod:`medcare_kernels.dispatch`) the base is cuBLAS and the kernel adds the LoRA term into ``y`` in one
  read-modify-write pass.
* backward: :func:`~medcare_kernels.backends.triton.shrink.shrink_backward` (``dy @ [B_all | B_s]`` with the
  routing backward fused), one K-extended GEMM for ``dx = dy @ W + dZ @ [A_all; A_s] + d_logits @ W_r``
  (with the cuBLAS base: ``dy @ W`` by cuBLAS, the rest added in place; the router term from the 16-bit
  ``d_logits`` that dZ carries when the router shares its dtype), and the weight gradients ``dA | dA_s |
  dW_r = dZ.T @ lx`` and ``dB | dB_s = dy.T @ H`` by cuBLAS, each operand read once (a Triton reduction
  with a float32 result where a float32 parameter meets 16-bit operands). Nothing of size ``E*T*d_out``
  exists; idle experts' gradients are exact zeros (``torch.where`` on their rows, so a NaN that reached
  them through a zero column does not survive).

Grouped path (:mod:`medcare_kernels.backends.triton.grouped`, for wide ``E*r``): token slots sorted by expert on
the device, segment-wise shrink and expand over the chosen experts only; no host synchronisation.

No ``.item()``/``.cpu()`` and no data-dependent shapes anywhere: the op runs under CUDA graphs and
``torch.compile``.
"""

from __future__ import annotations

import torch

from medcare_kernels import dispatch
from medcare_kernels.backends.triton import grouped
from medcare_kernels.backends.triton._common import check_dtypes, compute_dtype
from medcare_kernels.backends.triton.gemm import base_plus_lora, ext_gemm, weight_grad
from medcare_kernels.backends.triton.shrink import Layout, shrink_backward, shrink_forward


def choose_path(tokens: int, experts: int, rank: int, top_k: int) -> str:
    """``dense`` or ``grouped``. The dense-masked path computes all ``E*r`` rank columns (one thin GEMM, one K
    extension of ``E_R*R_PAD + r_s``); the grouped path computes only the chosen ``k*r`` per token but gathers
    rows and launches ``k`` segment passes (:func:`dispatch.triton_path` has the rule)."""
    return dispatch.triton_path(Layout(experts, rank, 0, top_k, True).WR, experts, top_k)


def _used(indices: torch.Tensor, experts: int) -> torch.Tensor:
    """[E] int8: 1 for the experts at least one token chose (on the device, no synchronisation)."""
    return torch.zeros(experts, dtype=torch.int8, device=indices.device).index_fill_(0, indices.view(-1), 1)


def _idle_zero(used: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``grad`` [E, ...] with exact zeros for the experts no token chose (``torch.where``, so a NaN that
    reached their rows through a zero column of dZ or H does not survive)."""
    return torch.where(used.view(-1, *([1] * (grad.dim() - 1))) != 0, grad, 0.0)


def _c(t):
    return None if t is None else t.contiguous()


def _routed_B(lora_B: torch.Tensor):
    """B_all [E, d_out, r] as the expand's [(e, c), n] operand."""
    return (lora_B, lora_B.stride(0), lora_B.stride(2), lora_B.stride(1))


def _routed_A(lora_A: torch.Tensor):
    """A_all [E, r, d_in] as the dx extension's [(e, c), n] operand."""
    return (lora_A, lora_A.stride(0), lora_A.stride(1), lora_A.stride(2))


def forward(x, weight, bias, router_weight, router_bias, lora_A, lora_B, shared_A, shared_B, lora_x,
            top_k: int, scaling: float):
    """x [T, d_in] -> (y [T, d_out] x.dtype, logits [T, E] f32, weights [T, k] f32, indices [T, k] i64,
    z [T, k*r + r_s] f32). Float16/bfloat16/float32 only (``TypeError`` otherwise)."""
    check_dtypes("molora_linear", x=x, weight=weight, router_weight=router_weight, lora_A=lora_A, lora_B=lora_B,
                 shared_A=shared_A)
    weight, bias, router_weight, router_bias = _c(weight), _c(bias), _c(router_weight), _c(router_bias)
    lora_A, lora_B, shared_A, shared_B = _c(lora_A), _c(lora_B), _c(shared_A), _c(shared_B)
    T = x.shape[0]
    E, r, _ = lora_A.shape
    r_s = 0 if shared_A is None else shared_A.shape[0]
    if choose_path(T, E, r, top_k) == "grouped":
        return grouped.forward(x, weight, bias, router_weight, router_bias, lora_A, lora_B, shared_A, shared_B,
                               lora_x, top_k, scaling, dispatch.triton_base(T))
    L = Layout(E, r, r_s, top_k, True)
    hd = compute_dtype(x.dtype, lora_A.dtype, lora_B.dtype)
    logits, weights, indices, z, h = shrink_forward(x, lora_x, lora_A, shared_A, router_weight, router_bias, L,
                                                    scaling, hd)
    lora = dict(hz=h, routed=_routed_B(lora_B), shared=shared_B.T if r_s else None, indices=indices,
                used=_used(indices, E), layout=L)
    y = base_plus_lora(x, weight.T, bias, x.dtype, **lora)
    return y, logits, weights, indices, z


def backward(grad_y, grad_logits, x, lora_x, weight, router_weight, lora_A, lora_B, shared_A, shared_B,
             logits, weights, indices, z, top_k: int, scaling: float, needs):
    """The 10 gradients of the contract (None where ``needs`` is False), each in its input's dtype."""
    check_dtypes("molora_linear", x=x, weight=weight, router_weight=router_weight, lora_A=lora_A, lora_B=lora_B,
                 shared_A=shared_A)
    weight, router_weight = _c(weight), _c(router_weight)
    lora_A, lora_B, shared_A, shared_B = _c(lora_A), _c(lora_B), _c(shared_A), _c(shared_B)
    grad_logits = None if grad_logits is None else grad_logits.float().contiguous()
    need_x, need_w, need_b, need_wr, need_br, need_a, need_bb, need_as, need_bs, need_lx = needs
    T, d_in = x.shape
    E, r, _ = lora_A.shape
    r_s = 0 if shared_A is None else shared_A.shape[0]
    if choose_path(T, E, r, top_k) == "grouped":
        return grouped.backward(grad_y, grad_logits, x, lora_x, weight, router_weight, lora_A, lora_B, shared_A,
                                shared_B, logits, weights, indices, z, top_k, scaling, needs)
    L = Layout(E, r, r_s, top_k, True)
    lx = x if lora_x is None else lora_x
    hd = compute_dtype(x.dtype, lora_A.dtype, lora_B.dtype)
    d_x = d_wr = d_br = d_A = d_B = d_As = d_Bs = d_lx = None
    if any((need_x, need_wr, need_br, need_a, need_bb, need_as, need_bs, need_lx)):
        dz, h, dl = shrink_backward(grad_y, lora_B, shared_B, logits, indices, z, grad_logits, L, scaling, hd)
        used = _used(indices, E)
        lora = dict(hz=dz, routed=_routed_A(lora_A), shared=shared_A if r_s else None, indices=indices, used=used,
                    layout=L)
        # dZ's last columns hold d_logits in dZ's dtype: when the router has that dtype too, dx's router term
        # and dW_r read them there (16-bit operands, tensor cores); a float32 router keeps float32 d_logits.
        router_in_dz = router_weight.dtype == hd
        router = (dz[:, L.W: L.W + E] if router_in_dz else dl, router_weight)
        if need_x:  # dx = dy @ W (+ dZ @ [A_all; A_s] when x is also the LoRA input) + d_logits @ W_r
            d_x = base_plus_lora(grad_y, weight, None, x.dtype, router=router,
                                 **(lora if lora_x is None else dict(layout=L)))
        if need_lx:
            d_lx = torch.empty_like(lora_x)
            ext_gemm(d_lx, **lora)
        with_router = need_wr and lora_x is None and router_in_dz  # one pass over x for dA, dA_s and dW_r
        if need_a or need_as or with_router:
            ga = weight_grad(dz[:, : L.W + (E if with_router else 0)], lx, lora_A.dtype)
            if need_a:
                d_A = _idle_zero(used, ga[: L.WR].view(L.E_R, L.R_PAD, d_in)[:E, :r]).to(lora_A.dtype)
            if need_as and r_s:
                d_As = ga[L.WR: L.WR + r_s].to(shared_A.dtype)
            if with_router:
                d_wr = ga[L.W: L.W + E].to(router_weight.dtype)
        if need_wr and not with_router:
            d_wr = weight_grad(dl, x, router_weight.dtype).to(router_weight.dtype)
        if need_br:
            d_br = dl.sum(0).to(router_weight.dtype)
        if need_bb or need_bs:
            gb = weight_grad(grad_y, h, lora_B.dtype)
            if need_bb:
                d_B = _idle_zero(used, gb[:, : L.WR].view(-1, L.E_R, L.R_PAD)[:, :E, :r].permute(1, 0, 2))
                d_B = d_B.to(lora_B.dtype)
            if need_bs and r_s:
                d_Bs = gb[:, L.WR: L.WR + r_s].to(shared_B.dtype)
    d_w = (grad_y.T @ x).to(weight.dtype) if need_w else None
    d_b = grad_y.sum(0, dtype=torch.float32).to(weight.dtype) if need_b else None
    grads = [d_x, d_w, d_b, d_wr, d_br, d_A, d_B, d_As, d_Bs, d_lx]
    return [None if g is None else g.contiguous() for g in grads]
