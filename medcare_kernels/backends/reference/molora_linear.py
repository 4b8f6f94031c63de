"""Reference MoLoRA linear: the authors' dense computation.

Every routed expert runs on every token and the results are stacked into an ``[E, T, d_out]`` tensor
(``[T, E, d_out]`` after the transpose), the top-k rows are gathered, weighted and summed with the
shared experts' output. Autograd keeps the stack for the backward, exactly as in the published code.
"""

from __future__ import annotations

import torch

from medcare_kernels.backends.reference.route import apply as route
from medcare_kernels.dispatch import accumulate_dtype


def apply(x, weight, bias, router_weight, router_bias, lora_A, lora_B, shared_A, shared_B, lora_x,
          top_k: int, scaling: float):
    """x [T, d_in] -> (y [T, d_out] in x.dtype, router logits [T, E] float32); differentiable."""
    T = x.shape[0]
    E, d_out = lora_B.shape[0], lora_B.shape[1]
    acc = accumulate_dtype(x.dtype, lora_A.dtype, router_weight.dtype)
    lx = (x if lora_x is None else lora_x).to(acc)
    result = torch.nn.functional.linear(x, weight, bias)
    logits = torch.nn.functional.linear(
        x.to(acc), router_weight.to(acc), None if router_bias is None else router_bias.to(acc))
    every = torch.stack(
        [(lx @ lora_A[e].to(acc).T) @ lora_B[e].to(acc).T * scaling for e in range(E)], dim=0)
    every = every.transpose(0, 1)  # [T, E, d_out]
    weights, indices = route(logits, top_k)
    chosen = every.gather(1, indices[:, :, None].expand(T, top_k, d_out))  # [T, k, d_out]
    if shared_A is not None:
        shared = (lx @ shared_A.to(acc).T) @ shared_B.to(acc).T * scaling
        weights = torch.cat([weights, weights.new_ones(T, 1)], dim=1)
        chosen = torch.cat([chosen, shared[:, None]], dim=1)
    moe = torch.einsum("tk,tkd->td", weights, chosen)
    return (result.to(acc) + moe).to(x.dtype), logits
