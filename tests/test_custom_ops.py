"""Each public op is a torch.library custom op: opcheck (schema, fake impl, autograd registration), and
``torch.compile(fullgraph=True)`` traces a module calling all four without graph breaks."""

from __future__ import annotations

import torch

import medcare_kernels as mk  # noqa: F401  (registers the ops)

ops = torch.ops.medcare_kernels


def test_opcheck_molora_linear():
    E, r, d_in, d_out, T = 4, 3, 8, 6, 7
    args = (torch.randn(T, d_in, requires_grad=True), torch.randn(d_out, d_in), torch.randn(d_out),
            torch.randn(E, d_in, requires_grad=True), torch.randn(E, requires_grad=True),
            torch.randn(E, r, d_in, requires_grad=True), torch.randn(E, d_out, r, requires_grad=True),
            torch.randn(5, d_in, requires_grad=True), torch.randn(d_out, 5, requires_grad=True), None, 2, 0.5, "torch")
    torch.library.opcheck(ops.molora_linear.default, args)


def test_opcheck_lora_linear_route_and_penalty():
    torch.library.opcheck(ops.lora_linear.default, (torch.randn(5, 8, requires_grad=True), torch.randn(6, 8), None,
                                                    torch.randn(3, 8, requires_grad=True),
                                                    torch.randn(6, 3, requires_grad=True), None, 2.0, "torch"))
    torch.library.opcheck(ops.route.default, (torch.randn(9, 6, requires_grad=True), 2, "torch"))
    torch.library.opcheck(ops.orthogonal_penalty.default,
                          ([torch.randn(4, 8, requires_grad=True), torch.randn(4, 5, requires_grad=True)],
                           [torch.randn(4, 8, requires_grad=True), torch.randn(2, 5, requires_grad=True)], "torch"))


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


def check_compile_fullgraph_matches_eager(device="cpu"):
    """``torch.compile(fullgraph=True)`` of :class:`Tiny` on ``device``: the eager output and gradients."""
    model = Tiny().to(device)
    x = torch.randn(2, 5, 16, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    eager = model(x)
    eager_grads = torch.autograd.grad(eager, params)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    grads = torch.autograd.grad(out, params)
    torch.testing.assert_close(out, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


def test_torch_compile_fullgraph_matches_eager():
    check_compile_fullgraph_matches_eager()
