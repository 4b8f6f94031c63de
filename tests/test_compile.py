"""``torch.compile(fullgraph=True)`` traces a module calling all four ops (through their custom ops) without
graph breaks, with the eager outputs and gradients, on every backend that can run."""

from __future__ import annotations

import pytest
import torch

import medcare_kernels as mk
from tests import helpers


class Tiny(torch.nn.Module):
    """A MoLoRA layer, a LoRA layer and the penalty, as a model would call them."""

    def __init__(self, d=16, E=4, r=4):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(24, d) / 4, requires_grad=False)
        self.router = torch.nn.Parameter(torch.randn(E, d) / 4)
        self.A = torch.nn.Parameter(torch.randn(E, r, d) / 4)
        self.B = torch.nn.Parameter(torch.randn(E, 24, r) / 4)
        self.As = torch.nn.Parameter(torch.randn(2 * r, d) / 4)
        self.Bs = torch.nn.Parameter(torch.randn(24, 2 * r) / 4)
        self.w2 = torch.nn.Parameter(torch.randn(d, 24) / 4, requires_grad=False)
        self.A2 = torch.nn.Parameter(torch.randn(r, 24) / 4)
        self.B2 = torch.nn.Parameter(torch.randn(d, r) / 4)

    def forward(self, x):
        h, logits = mk.molora_linear(x, self.w1, None, self.router, None, self.A, self.B, self.As, self.Bs,
                                     top_k=2, scaling=2.0)
        out = mk.lora_linear(torch.relu(h), self.w2, None, self.A2, self.B2, scaling=2.0)
        w, _ = mk.route(logits, 2)
        pen = mk.orthogonal_penalty([self.As[:4]], [self.A2[:, :16]])
        return out.square().mean() + w.mean() + 1e-3 * pen


COMPILE_RUNS = [pytest.param(helpers.Run("torch", "torch", "cpu"), id="torch-cpu"),
                pytest.param(helpers.Run("triton-gpu", "triton", "cuda"), marks=pytest.mark.gpu, id="triton-gpu"),
                pytest.param(helpers.Run("cuda", "cuda", "cuda"), marks=pytest.mark.gpu, id="cuda")]


@pytest.mark.parametrize("run", COMPILE_RUNS)
def test_torch_compile_fullgraph_matches_eager(run, monkeypatch):
    monkeypatch.setenv("MEDCARE_BACKEND", run.backend)
    model = Tiny().to(run.device)
    x = torch.randn(2, 5, 16, device=run.device)
    params = [p for p in model.parameters() if p.requires_grad]
    eager = model(x)
    eager_grads = torch.autograd.grad(eager, params)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    grads = torch.autograd.grad(out, params)
    torch.testing.assert_close(out, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)
