"""The three wrappers against an independent float64 implementation of the MedCare layer formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from medcare import LoRALinear, MedCareConfig, MoLoRALinear, OrthLoRALinear
from tests.helpers import TOL, assert_close

f64 = torch.float64


# ---- float64 formulas, one token at a time (docs/design.md, "The mathematics") ---------------------------

def molora_f64(x, W, b, Wr, br, A, B, As, Bs, k, s, lx=None):
    """y_t = W x_t + b + sum_j w_tj s B_e A_e lx_t + s B_s A_s lx_t, routing on x_t in float64."""
    x = x.to(f64).reshape(-1, W.shape[1])
    lx = x if lx is None else lx.to(f64).reshape(-1, W.shape[1])
    W, Wr, A, B, As, Bs = (t.to(f64) for t in (W, Wr, A, B, As, Bs))
    rows = []
    for t in range(x.shape[0]):
        y = W @ x[t] + (0 if b is None else b.to(f64))
        p = torch.softmax(Wr @ x[t] + br.to(f64), dim=0)
        order = sorted(range(p.numel()), key=lambda e: (-p[e].item(), e))[:k]
        w = p[order] / p[order].sum()
        for j, e in enumerate(order):
            y = y + w[j] * s * (B[e] @ (A[e] @ lx[t]))
        rows.append(y + s * (Bs @ (As @ lx[t])))
    return torch.stack(rows)


def lora_f64(x, W, b, A, B, s, lx=None):
    x = x.to(f64).reshape(-1, W.shape[1])
    lx = x if lx is None else lx.to(f64).reshape(-1, W.shape[1])
    y = x @ W.to(f64).T + s * (lx @ A.to(f64).T) @ B.to(f64).T
    return y if b is None else y + b.to(f64)


def topk_margin(x, Wr, br, k):
    p = torch.softmax(x.to(f64).reshape(-1, Wr.shape[1]) @ Wr.to(f64).T + br.to(f64), -1).sort(-1, True).values
    return math.inf if k == p.shape[1] else (p[:, k - 1] - p[:, k]).min().item()


def randomize(module, scale=0.5):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name not in ("weight", "bias"):
                p.copy_(torch.randn_like(p) * scale)


class FixedMask(nn.Module):
    """Deterministic stand-in for dropout: multiplies by a fixed mask (so the test knows lx)."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


# ---- MoLoRALinear --------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_molora_linear_matches_float64_formula(bias, dropout):
    cfg = MedCareConfig(r=3, alpha=5, num_experts=5, top_k=2, num_shared=2, dropout=dropout)
    lin = nn.Linear(12, 10, bias=bias)
    m = MoLoRALinear.from_linear(lin, cfg)
    randomize(m)
    x = torch.randn(2, 7, 12)
    while topk_margin(x, m.router.weight, m.router.bias, 2) < 1e-4:  # keep the top-k unambiguous
        x = torch.randn(2, 7, 12)
    lx = None
    if dropout:
        mask = (torch.rand(2, 7, 12) > dropout).float() / (1 - dropout)
        m.lora_dropout = FixedMask(mask)  # the module applies its dropout to the LoRA input only
        lx = x * mask
    m.train()
    x.requires_grad_(True)
    y = m(x)
    assert y.shape == (2, 7, 10) and y.dtype == torch.float32
    leaves = {n: p.detach().to(f64).requires_grad_(True) for n, p in m.named_parameters() if p.requires_grad}
    x64 = x.detach().to(f64).requires_grad_(True)
    y64 = molora_f64(x64, m.weight, m.bias, leaves["router.weight"], leaves["router.bias"], leaves["lora_A"],
                     leaves["lora_B"], leaves["shared_A"], leaves["shared_B"], 2, cfg.scaling,
                     None if lx is None else x64 * mask)
    assert_close(y.reshape(-1, 10), y64, torch.float32, "y")
    seed = torch.randn(14, 10, dtype=f64)
    (y.reshape(-1, 10).to(f64) * seed).sum().backward()
    (y64 * seed).sum().backward()
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, leaves[n].grad, torch.float32, n)
    assert_close(x.grad, x64.grad, torch.float32, "x")
    assert m.weight.grad is None and lin.weight.requires_grad is False
    assert m.last_router_logits.shape == (14, 5) and m.last_router_logits.dtype == torch.float32


def test_molora_linear_shares_the_base_weight_and_starts_as_identity():
    lin = nn.Linear(16, 8)
    cfg = MedCareConfig(r=4, num_experts=3, top_k=2, num_shared=3)
    m = MoLoRALinear.from_linear(lin, cfg)
    assert m.weight is lin.weight and m.bias is lin.bias
    assert not m.weight.requires_grad and not m.bias.requires_grad
    assert m.lora_A.shape == (3, 4, 16) and m.lora_B.shape == (3, 8, 4)
    assert m.shared_A.shape == (12, 16) and m.shared_B.shape == (8, 12)
    assert m.router.weight.shape == (3, 16) and m.router.bias.shape == (3,)
    assert m.lora_A.dtype == torch.float32
    assert torch.all(m.lora_B == 0) and torch.all(m.shared_B == 0)
    bound = 1 / math.sqrt(16)  # Kaiming-uniform a=sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = d_in
    assert m.lora_A.abs().max() <= bound and m.lora_A.abs().max() > 0.5 * bound
    names = {n for n, _ in m.named_parameters()}
    assert names == {"weight", "bias", "router.weight", "router.bias", "lora_A", "lora_B", "shared_A", "shared_B"}
    x = torch.randn(5, 16)
    torch.testing.assert_close(m(x), lin(x), rtol=0, atol=1e-6)
    r = repr(m)
    for part in ("E=3", "k=2", "r=4", "r_s=12"):
        assert part in r


def test_lora_dtype_stays_float32_for_bf16_models_and_is_configurable():
    lin = nn.Linear(8, 8).to(torch.bfloat16)
    m = MoLoRALinear.from_linear(lin, MedCareConfig(r=2, num_experts=2, top_k=1))
    assert m.lora_A.dtype == torch.float32 and m.router.weight.dtype == torch.float32
    assert m(torch.randn(3, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    m2 = LoRALinear.from_linear(lin, MedCareConfig(r=2), lora_dtype=None)
    assert m2.lora_A.dtype == torch.bfloat16


def test_rslora_scaling():
    lin = nn.Linear(4, 4)
    assert LoRALinear.from_linear(lin, MedCareConfig(r=16, alpha=32)).scaling == 2.0
    assert LoRALinear.from_linear(lin, MedCareConfig(r=16, alpha=32, use_rslora=True)).scaling == 8.0


def test_autocast_runs_in_the_autocast_dtype():
    lin = nn.Linear(16, 8)
    m = MoLoRALinear.from_linear(lin, MedCareConfig(r=2, num_experts=3, top_k=1))
    randomize(m, 0.2)
    m.eval()
    x = torch.randn(6, 16)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    assert ((y.float() - ref).abs().max() / ref.abs().max()).item() < 5e-2


# ---- LoRALinear and OrthLoRALinear --------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_matches_float64_formula(bias):
    cfg = MedCareConfig(r=3, alpha=7, dropout=0.0)
    m = LoRALinear.from_linear(nn.Linear(9, 5, bias=bias), cfg)
    randomize(m)
    x = torch.randn(4, 9)
    assert_close(m(x), lora_f64(x, m.weight, m.bias, m.lora_A, m.lora_B, cfg.scaling), torch.float32, "y")
    assert "r=3" in repr(m)


def test_orth_lora_linear_matches_float64_formula_and_trains_only_orth():
    cfg = MedCareConfig(r=2, alpha=4, num_shared=3, dropout=0.0)
    lin = nn.Linear(10, 6)
    base_A, base_B = torch.randn(6, 10), torch.randn(6, 6)
    m = OrthLoRALinear.from_linear(lin, cfg, base_A=base_A, base_B=base_B)
    assert m.shared_rank == 6 and m.orth_A.shape == (6, 10) and m.orth_B.shape == (6, 6)
    with pytest.deprecated_call(match="use OrthLoRALinear.shared_rank"):
        assert m.rank == 6
    assert torch.all(m.orth_B == 0) and torch.equal(m.base_A, base_A)
    assert not m.base_A.requires_grad and m.orth_A.requires_grad
    with torch.no_grad():
        m.orth_B.normal_()
    x = torch.randn(7, 10, requires_grad=True)
    y = m(x)
    s = cfg.scaling
    x64 = x.detach().to(f64)
    expect = (x64 @ m.weight.to(f64).T + m.bias.to(f64) + s * (x64 @ base_A.to(f64).T) @ base_B.to(f64).T
              + s * (x64 @ m.orth_A.detach().to(f64).T) @ m.orth_B.detach().to(f64).T)
    assert_close(y, expect, torch.float32, "y")
    y.sum().backward()
    assert m.base_A.grad is None and m.base_B.grad is None
    assert m.orth_A.grad.abs().sum() > 0 and m.orth_B.grad.abs().sum() > 0
    unfrozen = OrthLoRALinear.from_linear(nn.Linear(10, 6), cfg, base_A=base_A, base_B=base_B, freeze_base=False)
    assert unfrozen.base_A.requires_grad
    assert "r_s=6" in repr(m)


def test_merge_folds_into_the_same_weight():
    lin = nn.Linear(8, 6)
    m = OrthLoRALinear.from_linear(lin, MedCareConfig(r=2, num_shared=1, dropout=0.0), base_A=torch.randn(2, 8),
                                   base_B=torch.randn(6, 2))
    with torch.no_grad():
        m.orth_B.normal_()
    x = torch.randn(4, 8)
    y = m(x).detach()
    merged = m.merge()
    assert type(merged) is nn.Linear and merged.weight is lin.weight
    assert_close(merged(x), y.to(f64), torch.float32, "merged")


def test_wrappers_reject_bad_input():
    with pytest.raises(TypeError, match="nn.Linear"):
        MoLoRALinear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="top_k"):
        MedCareConfig(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="disjoint"):
        MedCareConfig(ffn_targets=("up_proj",), attn_targets=("up_proj",))
    with pytest.raises(ValueError, match="base_B must have shape"):
        OrthLoRALinear.from_linear(nn.Linear(4, 3), MedCareConfig(r=2), base_A=torch.zeros(2, 4),
                                   base_B=torch.zeros(3, 5))
    with pytest.raises(ValueError, match="scale"):
        m = MoLoRALinear.from_linear(nn.Linear(4, 4), MedCareConfig(r=2, alpha=4))
        OrthLoRALinear.from_molora(m, MedCareConfig(r=2, alpha=8))


def test_config_round_trips_through_json_dict():
    cfg = MedCareConfig(r=8, alpha=16, ffn_targets=["up_proj"], attn_targets=(), lora_dtype=torch.bfloat16)
    assert cfg.ffn_targets == ("up_proj",) and cfg.lora_dtype == "bfloat16"
    assert MedCareConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.warns(UserWarning, match="unknown"):
        assert MedCareConfig.from_dict({**cfg.to_dict(), "from_the_future": 1}) == cfg


def test_molora_linear_under_torch_compile_keeps_router_logits():
    m = MoLoRALinear.from_linear(nn.Linear(8, 6), MedCareConfig(r=2, num_experts=3, top_k=2))
    randomize(m, 0.3)
    m.eval()
    x = torch.randn(5, 8)
    ref = m(x).detach()
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    y = compiled(x)
    torch.testing.assert_close(y, ref, rtol=TOL[torch.float32], atol=1e-6)
    assert m.last_router_logits.shape == (5, 3)
