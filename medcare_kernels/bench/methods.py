"""What the benchmarks compare: each method maps the same inputs to ``y`` with autograd."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

import medcare_kernels as mk
from medcare_kernels.bench.shapes import Shape


@dataclass
class Inputs:
    """One MoLoRA layer's tensors; the LoRA and router parameters require grad, the base does not."""

    x: torch.Tensor
    weight: torch.Tensor
    router_weight: torch.Tensor
    router_bias: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    shared_A: torch.Tensor
    shared_B: torch.Tensor
    grad_y: torch.Tensor
    top_k: int
    scaling: float

    @property
    def trainable(self) -> list[torch.Tensor]:
        return [self.x, self.router_weight, self.router_bias, self.lora_A, self.lora_B, self.shared_A,
                self.shared_B]


def make_inputs(shape: Shape, tokens: int, dtype: torch.dtype, device: str, seed: int = 0) -> Inputs:
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*size, scale=1.0, grad=True):
        t = (torch.randn(*size, generator=g) * scale).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    E, r, rs = shape.experts, shape.rank, shape.shared_rank
    return Inputs(
        x=rand(tokens, shape.d_in),
        weight=rand(shape.d_out, shape.d_in, scale=shape.d_in ** -0.5, grad=False),
        router_weight=rand(E, shape.d_in, scale=shape.d_in ** -0.5),
        router_bias=rand(E, scale=0.1),
        lora_A=rand(E, r, shape.d_in, scale=shape.d_in ** -0.5),
        lora_B=rand(E, shape.d_out, r, scale=r ** -0.5),
        shared_A=rand(rs, shape.d_in, scale=shape.d_in ** -0.5),
        shared_B=rand(shape.d_out, rs, scale=rs ** -0.5),
        grad_y=rand(tokens, shape.d_out, grad=False),
        top_k=shape.top_k,
        scaling=2.0,
    )


def floor(inp: Inputs) -> torch.Tensor:
    """The frozen linear alone: the cost every MoLoRA layer pays anyway."""
    return torch.nn.functional.linear(inp.x, inp.weight)


def per_expert_loop(inp: Inputs) -> torch.Tensor:
    """How most MoE-LoRA code does it: route, then a Python loop over experts with index masks."""
    x = inp.x
    y = torch.nn.functional.linear(x, inp.weight)
    logits = torch.nn.functional.linear(x.float(), inp.router_weight.float(), inp.router_bias.float())
    weights, indices = torch.topk(logits.softmax(-1), inp.top_k)
    weights = weights / weights.sum(-1, keepdim=True)
    out = (x.float() @ inp.shared_A.float().T) @ inp.shared_B.float().T * inp.scaling
    for e in range(inp.lora_A.shape[0]):
        tokens, slot = torch.where(indices == e)
        if tokens.numel() == 0:
            continue
        h = (x[tokens].float() @ inp.lora_A[e].float().T) @ inp.lora_B[e].float().T
        out = out.index_add(0, tokens, h * (weights[tokens, slot, None] * inp.scaling))
    return (y.float() + out).to(x.dtype)


def _library(backend: str) -> Callable[[Inputs], torch.Tensor]:
    def run(inp: Inputs) -> torch.Tensor:
        y, _ = mk.molora_linear(inp.x, inp.weight, None, inp.router_weight, inp.router_bias, inp.lora_A,
                                inp.lora_B, inp.shared_A, inp.shared_B, top_k=inp.top_k, scaling=inp.scaling,
                                backend=backend)
        return y
    return run


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[[Inputs], torch.Tensor]
    env: dict = field(default_factory=dict)  # environment for the whole measurement (fwd and bwd)
    is_floor: bool = False

    @contextlib.contextmanager
    def environment(self) -> Iterator[None]:
        old = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            yield
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def methods(device: str, formulations: bool = False) -> list[Method]:
    """The floor, the reference, the loop, and every library backend that runs on ``device``."""
    out = [Method("floor", floor, is_floor=True), Method("reference", _library("reference")),
           Method("per-expert-loop", per_expert_loop)]
    for backend in mk.available_backends(device):
        if backend == "reference":
            continue
        out.append(Method(backend, _library(backend)))
        if backend == "torch" and formulations:
            for form in ("dense", "grouped"):
                out.append(Method(f"torch[{form}]", _library("torch"), {"MEDCARE_MOLORA_FORMULATION": form}))
        if backend == "triton":
            # ``triton`` is auto's choice of base (dispatch.triton_base): both forced, to keep
            # the measurements that choice rests on in the table.
            out.append(Method("triton[triton-base]", _library("triton"), {"MEDCARE_TRITON_BASE": "triton"}))
            out.append(Method("triton[cublas-base]", _library("triton"), {"MEDCARE_TRITON_BASE": "cublas"}))
            if formulations:
                out.append(Method("triton[grouped]", _library("triton"), {"MEDCARE_TRITON_MOLORA_PATH": "grouped"}))
    return out


def flops(shape: Shape, tokens: int, method: Method, backward: bool) -> float:
    """Useful multiply-adds x2 of a method: base GEMM(s) plus the chosen experts' LoRA work.

    The same count for every MoLoRA method (what the layer must do), so TFLOP/s compares fairly.
    """
    base = 2.0 * tokens * shape.d_in * shape.d_out
    if method.is_floor:
        return base * (2 if backward else 1)
    lora_r = shape.top_k * shape.rank + shape.shared_rank
    fwd = base + 2.0 * tokens * (lora_r * (shape.d_in + shape.d_out) + shape.experts * shape.d_in)
    if not backward:
        return fwd
    # dx (base), dH and dB (d_out side), dA and dlx (d_in side), router grads.
    bwd = base + 2.0 * tokens * (2 * lora_r * (shape.d_in + shape.d_out) + 2 * shape.experts * shape.d_in)
    return fwd + bwd


def flop_limit(shape: Shape) -> float:
    """Forward+backward FLOP ratio of a MoLoRA layer to its frozen linear: the best ratio possible."""
    m = Method("x", floor)
    return flops(shape, 1, m, True) / flops(shape, 1, Method("f", floor, is_floor=True), True)


__all__ = ["Inputs", "Method", "flop_limit", "flops", "make_inputs", "methods"]
