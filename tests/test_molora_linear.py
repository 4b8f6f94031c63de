"""molora_linear: every backend and formulation against the float64 oracle, forward and every gradient."""

from __future__ import annotations

import pytest
import torch

import medcare_kernels as mk
from tests import oracle
from tests.conftest import assert_close, assert_routing_near_ties, grads_of, leaf_on

# Backends under test on the CPU: the torch backend in both formulations, and the reference.
BACKENDS = [("torch", "dense"), ("torch", "grouped"), ("reference", None)]
BACKEND_IDS = ["torch-dense", "torch-grouped", "reference"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAMES = ("x", "weight", "bias", "router_weight", "router_bias", "lora_A", "lora_B", "shared_A", "shared_B",
         "lora_x")


def make(T, d_in, d_out, E, r, r_s, dtype, *, lora_dtype=None, bias=True, router_bias=True, lead=None,
         lora_x=False, weight_grad=False, noncontig=False):
    """Random MoLoRA inputs; the LoRA/router parameters and x require grad, the base weight does not."""
    lora_dtype = lora_dtype or dtype
    shape = (*lead, d_in) if lead else (T, d_in)

    def rand(*size, dt=dtype, scale=1.0, grad=True):
        return (torch.randn(*size) * scale).to(dt).requires_grad_(grad)

    if noncontig:  # a transposed view: last dim is not contiguous in memory
        x = (torch.randn(d_in, *shape[:-1]).to(dtype).movedim(0, -1)).requires_grad_(True)
        assert not x.is_contiguous()
    else:
        x = rand(*shape)
    return dict(
        x=x,
        weight=rand(d_out, d_in, scale=d_in ** -0.5, grad=weight_grad),
        bias=rand(d_out, grad=weight_grad) if bias else None,
        router_weight=rand(E, d_in, dt=lora_dtype, scale=d_in ** -0.5),
        router_bias=rand(E, dt=lora_dtype, scale=0.5) if router_bias else None,
        lora_A=rand(E, r, d_in, dt=lora_dtype, scale=d_in ** -0.5),
        lora_B=rand(E, d_out, r, dt=lora_dtype, scale=r ** -0.5),
        shared_A=rand(r_s, d_in, dt=lora_dtype, scale=d_in ** -0.5) if r_s else None,
        shared_B=rand(d_out, r_s, dt=lora_dtype, scale=r_s ** -0.5) if r_s else None,
        lora_x=rand(*shape) if lora_x else None,
    )


def formulation(monkeypatch, form):
    """Select the torch backend's formulation (None: leave the default)."""
    if form is not None:
        monkeypatch.setenv("MEDCARE_MOLORA_FORMULATION", form)


def library_indices(inp, top_k, scaling, backend, logits):
    """The experts the library chose (its own routing of its own logits)."""
    if backend == "reference":
        return mk.route(logits, top_k, backend="reference")[1]
    d_in = inp["weight"].shape[1]
    x2 = inp["x"].detach().reshape(-1, d_in).contiguous()
    lx = inp["lora_x"]
    lx2 = None if lx is None else lx.detach().reshape(-1, d_in).contiguous()
    with torch.no_grad():
        out = torch.ops.medcare_kernels.molora_linear(
            x2, inp["weight"], inp["bias"], inp["router_weight"], inp["router_bias"], inp["lora_A"], inp["lora_B"],
            inp["shared_A"], inp["shared_B"], lx2, top_k, scaling, backend)
    return out[3]


def check(inp, top_k, scaling, backend, dtype, *, device="cpu", logits_grad=False):
    """Forward and every gradient of the library on ``device`` vs the float64 oracle on the CPU (on the
    library's routing, which must agree with the oracle's except at genuine near-ties). ``inp`` holds
    CPU tensors (:func:`make`); the library gets leaf copies of them on ``device``."""
    dev = {n: leaf_on(inp[n], device) for n in NAMES}
    y, logits = mk.molora_linear(*[dev[n] for n in NAMES[:9]], top_k=top_k, scaling=scaling, lora_x=dev["lora_x"],
                                 backend=backend)
    d_out = inp["weight"].shape[0]
    T = inp["x"].numel() // inp["x"].shape[-1]
    assert y.shape == (*inp["x"].shape[:-1], d_out) and y.dtype == inp["x"].dtype and y.device == dev["x"].device
    assert logits.shape == (T, inp["router_weight"].shape[0]) and logits.dtype == torch.float32
    assert logits.device == dev["x"].device

    idx = library_indices(dev, top_k, scaling, backend, logits.detach()).cpu()
    ref = {n: oracle.leaf64(inp[n]) for n in NAMES}
    x2 = lambda t: None if t is None else t.reshape(-1, t.shape[-1])  # noqa: E731
    y64, logits64, _ = oracle.molora(x2(ref["x"]), ref["weight"], ref["bias"], ref["router_weight"],
                                     ref["router_bias"], ref["lora_A"], ref["lora_B"], ref["shared_A"],
                                     ref["shared_B"], top_k, scaling, lora_x=x2(ref["lora_x"]), indices=idx)
    if T:
        assert_routing_near_ties(idx, logits64, top_k, 1e-4)
    assert_close(y.reshape(T, d_out), y64, dtype, "y")
    assert_close(logits, logits64, torch.float32, "router_logits")  # float32 math whatever the input dtype

    gy = torch.randn(y.shape).to(y.dtype).to(torch.float64)  # what the library receives, exactly
    seeds = [(y, gy.to(y.device))]
    seeds64 = [(y64, gy.reshape(T, d_out))]
    if logits_grad:
        gl = torch.randn(logits.shape, dtype=torch.float64)
        seeds.append((logits, gl.to(logits.device)))
        seeds64.append((logits64, gl))
    got = grads_of(seeds, [dev[n] for n in NAMES])
    want = grads_of(seeds64, [ref[n] for n in NAMES])
    for name, g, w, t in zip(NAMES, got, want, [dev[n] for n in NAMES]):
        if t is None or not t.requires_grad:
            assert g is None
            continue
        assert g.dtype == t.dtype and g.device == t.device, f"{name} grad dtype/device"
        assert_close(g.reshape(w.shape) if name in ("x", "lora_x") else g, w, dtype, f"d{name}")


def check_idle_experts(inp, top_k, busy, backend, dtype, *, device="cpu"):
    """Routing skewed by the router bias (``busy``: expert -> bias, the others 0) so that the busy experts
    take every token: :func:`check` holds, and the idle experts' A/B gradients exist and are exactly zero
    while every busy expert's are not."""
    with torch.no_grad():
        inp["router_bias"].zero_()
        for e, b in busy.items():
            inp["router_bias"][e] = b
    check(inp, top_k, 1.0, backend, dtype, device=device)
    dev = {n: leaf_on(inp[n], device) for n in NAMES}
    y, _ = mk.molora_linear(*[dev[n] for n in NAMES[:9]], top_k=top_k, scaling=1.0, backend=backend)
    dA, dB = torch.autograd.grad(y.float().square().sum(), [dev["lora_A"], dev["lora_B"]])
    idle = [e for e in range(dA.shape[0]) if e not in busy]
    assert torch.equal(dA[idle], torch.zeros_like(dA[idle])) and torch.equal(dB[idle], torch.zeros_like(dB[idle]))
    assert all(dA[e].abs().sum() > 0 and dB[e].abs().sum() > 0 for e in busy)


CASES = [  # (T, E, top_k, r, r_s)
    (0, 8, 2, 16, 32),
    (1, 8, 2, 16, 32),
    (7, 2, 1, 8, 16),
    (7, 1, 1, 8, 8),
    (64, 8, 2, 16, 32),
    (64, 8, 8, 1, 4),
    (64, 64, 2, 8, 16),
    (64, 64, 64, 1, 0),
    (1000, 8, 2, 16, 32),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("backend,form", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("T,E,top_k,r,r_s", CASES)
def test_matches_float64_oracle(T, E, top_k, r, r_s, backend, form, dtype, monkeypatch):
    formulation(monkeypatch, form)
    check(make(T, 40, 24, E, r, r_s, dtype), top_k, 1.7, backend, dtype)


VARIANTS = {
    "no-shared": dict(r_s=0),
    "no-bias": dict(bias=False),
    "no-router-bias": dict(router_bias=False),
    "3d-input": dict(lead=(3, 11)),
    "non-contiguous-x": dict(lead=(5, 9), noncontig=True),
    "lora-x": dict(lora_x=True),
    "lora-x-3d": dict(lora_x=True, lead=(2, 13)),
    "frozen-weight-trains": dict(weight_grad=True),
    "fp32-lora-params": dict(lora_dtype=torch.float32),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("backend,form", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants(variant, backend, form, dtype, monkeypatch):
    opts = dict(VARIANTS[variant])
    r_s = opts.pop("r_s", 12)
    formulation(monkeypatch, form)
    check(make(50, 33, 20, 6, 4, r_s, dtype, **opts), 2, 0.5, backend, dtype)


@pytest.mark.parametrize("backend,form", BACKENDS, ids=BACKEND_IDS)
def test_gradient_through_router_logits(backend, form, monkeypatch):
    """A loss on the returned logits (load balancing, z-loss) reaches the router and x."""
    formulation(monkeypatch, form)
    check(make(40, 24, 16, 8, 4, 8, torch.float32), 2, 1.0, backend, torch.float32, logits_grad=True)


@pytest.mark.parametrize("form", ["dense", "grouped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[1])
def test_skewed_routing_idle_experts_get_exact_zero_grads(form, dtype, monkeypatch):
    """One expert takes every token: the idle experts' A/B gradients exist and are exactly zero."""
    monkeypatch.setenv("MEDCARE_MOLORA_FORMULATION", form)
    check_idle_experts(make(64, 32, 24, 8, 4, 8, dtype), 1, {5: 100.0}, "torch", dtype)  # expert 5 wins every token


@pytest.mark.parametrize("form", ["dense", "grouped"])
def test_gradcheck_float64(form, monkeypatch):
    monkeypatch.setenv("MEDCARE_MOLORA_FORMULATION", form)
    inp = make(9, 7, 5, 4, 3, 2, torch.float64, weight_grad=True, lora_x=True)
    names = list(NAMES)

    def fn(*args):
        kw = dict(zip(names, args))
        return tuple(mk.molora_linear(*[kw[n] for n in names[:9]], top_k=2, scaling=0.8, lora_x=kw["lora_x"]))

    assert torch.autograd.gradcheck(fn, [inp[n] for n in names])


def fresh_adapter_and_base_linear(backend="auto"):
    """(the layer's output with B = 0, the init; the frozen linear's output) on the same input."""
    inp = make(17, 12, 10, 4, 3, 6, torch.float32)
    with torch.no_grad():
        inp["lora_B"].zero_()
        inp["shared_B"].zero_()
    y, _ = mk.molora_linear(*[inp[n] for n in NAMES[:9]], top_k=2, scaling=2.0, backend=backend)
    return y, torch.nn.functional.linear(inp["x"], inp["weight"], inp["bias"])


def test_fresh_adapter_equals_base_linear():
    """B = 0 (the init) makes the layer exactly the frozen linear."""
    assert torch.equal(*fresh_adapter_and_base_linear())


def saved_numel(inp, top_k, backend):
    """How many elements the op saves for its backward beyond its inputs (saved-tensor hooks)."""
    inputs = {t.data_ptr() for t in inp.values() if t is not None}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in inputs:
            total += t.numel()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mk.molora_linear(*[inp[n] for n in NAMES[:9]], top_k=top_k, scaling=1.0, backend=backend)
    return total


def test_saved_state_is_rank_space_only():
    """The torch backend keeps O(T * (k*r + r_s + E)) floats for the backward beyond its inputs,
    never anything proportional to E * d_out; the reference keeps the [E, T, d_out] stack."""
    T, d_in, d_out, E, r, r_s, k = 256, 64, 512, 8, 4, 8, 2
    inp = make(T, d_in, d_out, E, r, r_s, torch.float32)
    assert saved_numel(inp, k, "torch") <= T * (k * r + r_s + E + 2 * k)
    assert saved_numel(inp, k, "reference") >= E * T * d_out


def test_formulation_heuristic_follows_the_cpu_measurements():
    """benchmarks/RESULTS.md: grouped for decoding (fewer slots than experts) and for many tokens, dense in
    between and whenever k = E; on CUDA dense unless E*r is wide."""
    from medcare_kernels.backends.pytorch.molora_linear import choose_formulation

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_formulation(1, 8, 16, 2, cpu) == "grouped"
    assert choose_formulation(8, 8, 16, 2, cpu) == "dense"
    assert choose_formulation(128, 8, 16, 2, cpu) == "grouped"
    assert choose_formulation(1024, 8, 16, 8, cpu) == "dense"
    assert choose_formulation(0, 8, 16, 2, cpu) == "dense"
    assert choose_formulation(4096, 8, 16, 2, cuda) == "dense"
    assert choose_formulation(4096, 64, 16, 2, cuda) == "grouped"
