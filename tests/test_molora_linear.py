"""molora_linear on every backend and formulation: forward and every gradient against the float64 oracle,
idle experts, saved state, and the custom op that torch.compile traces."""

from __future__ import annotations

import pytest
import torch

import medcare_kernels as mk
from tests import helpers, oracle
from tests.helpers import BF16, F16, F32, F64

RUNS = helpers.runs("torch-dense", "torch-grouped", "reference", "triton-dense", "triton-grouped", "cuda")
NAMES = helpers.MOLORA_NAMES
# (T, E, top_k, r, r_s): T=0, T=1, E=1, k=E, no shared experts, T not a multiple of any block, wide E*r.
CASES = [
    (0, 8, 2, 16, 32),
    (1, 8, 2, 16, 32),
    (7, 2, 1, 8, 16),
    (7, 1, 1, 8, 8),
    (45, 8, 2, 16, 32),
    (37, 8, 8, 1, 4),
    (33, 6, 3, 4, 0),
    (41, 64, 2, 8, 16),
    (64, 64, 64, 1, 0),
    (1000, 8, 2, 16, 32),
]
#: Router biases that send every token to experts 5 and 2 (the others idle, p ~ e^-49); close biases keep
#: the router gradient well conditioned in fp32.
SKEWED = {5: 50.0, 2: 49.5}


def _dtypes(run):
    return (F32, BF16) if run.backend == "triton" else (F32, BF16, F16)


def _small_under_interpreter(case, run, dtype=None):
    T, E = case[0], case[1]
    return not run.interpreted or (T <= 64 and E * case[2] < 64 * 64)


@pytest.mark.parametrize("case,run,dtype", helpers.grid(CASES, RUNS, _dtypes, _small_under_interpreter))
def test_matches_float64_oracle(case, run, dtype, monkeypatch):
    T, E, top_k, r, r_s = case
    run.apply(monkeypatch)
    helpers.molora_check(helpers.molora_make(T, 40, 24, E, r, r_s, dtype), top_k, 1.7, run.backend, dtype,
                         device=run.device)  # d_in, d_out: not multiples of 16


VARIANT_RUNS = helpers.runs("torch-dense", "torch-grouped", "reference", "triton", "cuda")


@pytest.mark.parametrize("variant,run,dtype", helpers.grid(list(helpers.MOLORA_VARIANTS), VARIANT_RUNS, (F32, BF16)))
def test_variants(variant, run, dtype, monkeypatch):
    run.apply(monkeypatch)
    helpers.molora_check(helpers.molora_variant(variant, dtype), 2, 0.5, run.backend, dtype, device=run.device)


@pytest.mark.parametrize("variant,run,dtype", helpers.grid(["lora-x", "lora-x-3d", "no-shared", "fp32-lora-params"],
                                                           helpers.runs("triton-cublas"), (BF16,)))
def test_variants_with_the_cublas_base(variant, run, dtype, monkeypatch):
    """The cuBLAS base (auto's choice from CUBLAS_BASE_MIN_TOKENS tokens): dy @ W by cuBLAS in the backward,
    the LoRA and router terms of dx added in place, with and without a separate LoRA input."""
    run.apply(monkeypatch)
    helpers.molora_check(helpers.molora_variant(variant, dtype), 2, 0.5, run.backend, dtype, device=run.device)


LOGIT_RUNS = helpers.runs("torch-dense", "torch-grouped", "reference", "triton-dense", "triton-grouped",
                          "triton-cublas", "cuda")


@pytest.mark.parametrize("run", helpers.by_run(LOGIT_RUNS))
def test_gradient_through_router_logits(run, monkeypatch):
    """A loss on the returned logits (load balancing, z-loss) reaches the router and x."""
    run.apply(monkeypatch)
    helpers.molora_check(helpers.molora_make(40, 24, 16, 8, 4, 8, F32), 2, 1.0, run.backend, F32, device=run.device,
                         logits_grad=True)


IDLE_RUNS = helpers.runs("torch-dense", "torch-grouped", "triton-dense", "triton-grouped", "cuda")


@pytest.mark.parametrize("case,run,dtype", helpers.grid([(37, 32, 24)], IDLE_RUNS, (F32, BF16)))
def test_skewed_routing_idle_experts_get_exact_zero_grads(case, run, dtype, monkeypatch):
    """Two experts take every token: the idle experts' A/B gradients exist and are exactly zero."""
    run.apply(monkeypatch)
    T, d_in, d_out = case
    helpers.molora_check_idle_experts(helpers.molora_make(T, d_in, d_out, 8, 4, 8, dtype), 2, SKEWED, run.backend,
                                      dtype, device=run.device)


@pytest.mark.parametrize("run", helpers.by_run(helpers.runs("torch-dense", "torch-grouped", "triton-dense",
                                                            "triton-grouped", "cuda")))
def test_eager_and_custom_op_paths_agree(run, monkeypatch):
    """The eager autograd.Function and the torch.library custom op (what torch.compile traces) run the same
    backend code: identical outputs and gradients."""
    run.apply(monkeypatch)
    inp = {n: helpers.leaf_on(t, run.device) for n, t in
           helpers.molora_make(37, 24, 16, 8, 4, 8, F32, lora_x=True, weight_grad=True).items()}
    tensors = [inp[n] for n in NAMES]
    y, logits = helpers.molora_call(inp, 2, 1.3, run.backend)
    gy, gl = torch.randn_like(y), torch.randn_like(logits)
    eager = torch.autograd.grad((y * gy).sum() + (logits * gl).sum(), tensors)
    out = torch.ops.medcare_kernels.molora_linear(*tensors[:9], inp["lora_x"], 2, 1.3, run.backend)
    assert torch.equal(out[0], y) and torch.equal(out[1], logits)
    traced = torch.autograd.grad((out[0] * gy).sum() + (out[1] * gl).sum(), tensors)
    for name, a, b in zip(NAMES, eager, traced):
        assert torch.equal(a, b), f"d{name} differs between the eager and custom-op paths"


@pytest.mark.parametrize("form", ["dense", "grouped"])
def test_gradcheck_float64(form, monkeypatch):
    monkeypatch.setenv("MEDCARE_MOLORA_FORMULATION", form)
    inp = helpers.molora_make(9, 7, 5, 4, 3, 2, F64, weight_grad=True, lora_x=True)

    def fn(*args):
        kw = dict(zip(NAMES, args))
        return tuple(mk.molora_linear(*[kw[n] for n in NAMES[:9]], top_k=2, scaling=0.8, lora_x=kw["lora_x"]))

    assert torch.autograd.gradcheck(fn, [inp[n] for n in NAMES])


@pytest.mark.parametrize("run", helpers.by_run(helpers.runs("torch", "triton", "cuda")))
def test_fresh_adapter_equals_base_linear(run, monkeypatch):
    """B = 0 (the init) makes the layer the frozen linear (exactly, on the torch backend)."""
    run.apply(monkeypatch)
    inp = {n: helpers.leaf_on(t, run.device) for n, t in helpers.molora_make(17, 12, 10, 4, 3, 6, F32).items()}
    with torch.no_grad():
        inp["lora_B"].zero_()
        inp["shared_B"].zero_()
    y, _ = helpers.molora_call(inp, 2, 2.0, run.backend)
    base = torch.nn.functional.linear(inp["x"], inp["weight"], inp["bias"])
    if run.backend == "torch":
        assert torch.equal(y, base)
    else:
        torch.testing.assert_close(y, base)


@pytest.mark.parametrize("run", helpers.by_run(helpers.runs("torch", "triton", "reference")))
def test_saved_state_is_rank_space_only(run, monkeypatch):
    """The fused backends keep O(T * (k*r + r_s + E)) floats for the backward beyond their inputs, never
    anything proportional to E * d_out; the reference keeps the [E, T, d_out] stack."""
    run.apply(monkeypatch)
    T, d_in, d_out, E, r, r_s, k = 64, 32, 256, 8, 4, 8, 2
    inp = helpers.molora_make(T, d_in, d_out, E, r, r_s, F32)
    n = helpers.saved_numel(lambda: helpers.molora_call(inp, k, 1.0, run.backend), inp.values())
    if run.backend == "reference":
        assert n >= E * T * d_out
    else:
        assert 0 < n <= T * (k * r + r_s + E + 2 * k)


def test_opcheck_custom_op():
    E, r, d_in, d_out, T = 4, 3, 8, 6, 7
    args = (torch.randn(T, d_in, requires_grad=True), torch.randn(d_out, d_in), torch.randn(d_out),
            torch.randn(E, d_in, requires_grad=True), torch.randn(E, requires_grad=True),
            torch.randn(E, r, d_in, requires_grad=True), torch.randn(E, d_out, r, requires_grad=True),
            torch.randn(5, d_in, requires_grad=True), torch.randn(d_out, 5, requires_grad=True), None, 2, 0.5, "torch")
    torch.library.opcheck(torch.ops.medcare_kernels.molora_linear.default, args)


@pytest.mark.parametrize("dtype", [F32, F64], ids=helpers.dtype_id)
@pytest.mark.parametrize("form", ["dense", "grouped"])
def test_opcheck_backward_custom_op(form, dtype, monkeypatch):
    """The backward op's fake gives the real gradients' layout (storage offset 0, contiguous), also where
    the backend computes several gradients as slices of one GEMM's output."""
    monkeypatch.setenv("MEDCARE_MOLORA_FORMULATION", form)
    inp = {n: t.detach() if t is not None else None for n, t in
           helpers.molora_make(7, 8, 6, 4, 3, 5, dtype, weight_grad=True).items()}
    fwd = torch.ops.medcare_kernels.molora_linear(*[inp[n] for n in NAMES[:9]], None, 2, 0.5, "torch")
    _y, logits, weights, indices, z = fwd
    args = (torch.randn(7, 6, dtype=dtype), torch.randn(7, 4, dtype=dtype), inp["x"], None, inp["weight"],
            inp["router_weight"], inp["lora_A"], inp["lora_B"], inp["shared_A"], inp["shared_B"], logits, weights,
            indices, z, 2, 0.5, [True] * 10, "torch")
    torch.library.opcheck(torch.ops.medcare_kernels.molora_linear_backward.default, args)


# ---- GPU: larger shapes, and what only the cuda backend's decode kernels promise ---------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("path", ["dense", "grouped"])
@pytest.mark.parametrize("base", ["triton", "cublas"])
@pytest.mark.parametrize("T", [1, 16, 300, 2048])
def test_gpu_triton_larger_shapes(T, base, path, monkeypatch):
    monkeypatch.setenv("MEDCARE_TRITON_MOLORA_PATH", path)
    monkeypatch.setenv("MEDCARE_TRITON_BASE", base)
    for dtype in (F32, BF16):
        helpers.molora_check(helpers.molora_make(T, 200, 312, 8, 16, 32, dtype), 2, 2.0, "triton", dtype,
                             device="cuda", logits_grad=True)


@pytest.mark.gpu
def test_gpu_triton_qwen_like_width_and_wide_experts(monkeypatch):
    helpers.molora_check(helpers.molora_make(512, 896, 1216, 8, 16, 32, BF16), 2, 2.0, "triton", BF16, device="cuda")
    monkeypatch.setenv("MEDCARE_TRITON_MOLORA_PATH", "grouped")
    helpers.molora_check(helpers.molora_make(700, 512, 640, 64, 16, 32, BF16), 2, 2.0, "triton", BF16, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["dense", "grouped"])
def test_gpu_triton_skewed_routing_idle_experts(path, monkeypatch):
    monkeypatch.setenv("MEDCARE_TRITON_MOLORA_PATH", path)
    helpers.molora_check_idle_experts(helpers.molora_make(300, 64, 48, 8, 16, 32, BF16), 2, SKEWED, "triton", BF16,
                                      device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("x_dtype,router_dtype,lora_dtype", [(BF16, F32, BF16), (F16, F32, F32), (F32, BF16, BF16),
                                                             (F16, BF16, BF16)])
def test_gpu_cuda_mixed_parameter_dtypes(x_dtype, router_dtype, lora_dtype):
    inp = helpers.molora_make(9, 40, 24, 6, 8, 16, x_dtype, lora_dtype=lora_dtype)
    for n in ("router_weight", "router_bias"):
        inp[n] = inp[n].detach().to(router_dtype).requires_grad_(True)
    dtypes = {x_dtype, router_dtype, lora_dtype}
    coarsest = BF16 if BF16 in dtypes else (F16 if F16 in dtypes else F32)  # gradients come back in each dtype
    helpers.molora_check(inp, 2, 0.9, "cuda", coarsest, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=helpers.dtype_id)
@pytest.mark.parametrize("T,d_in,r,r_s", [(1, 64, 16, 32), (16, 40, 8, 0), (64, 33, 3, 5), (200, 128, 16, 32)])
def test_gpu_decode_kernel_state_matches_the_torch_backend(T, d_in, r, r_s, dtype):
    """All five outputs of molora_decode_cuda (any T, called directly) against the torch backend's
    forward on the same GPU tensors: the backward of a decode forward reads z, weights and indices."""
    from medcare_kernels.backends.pytorch import molora_linear as torch_molora
    E, d_out, k = 8, 72, 2
    g = helpers.molora_make(T, d_in, d_out, E, r, r_s, dtype)
    args = [None if g[n] is None else g[n].detach().to("cuda") for n in NAMES[:9]]
    y, logits, w, idx, z = torch.ops.medcare_kernels.molora_decode_cuda(*args, None, k, 1.3)
    y_t, logits_t, w_t, idx_t, z_t = torch_molora.forward(*args, None, k, 1.3)
    assert z.shape == (T, k * r + r_s) and z.dtype == F32 and y.dtype == dtype
    torch.testing.assert_close(logits, logits_t, rtol=1e-5, atol=1e-5)
    same = (idx == idx_t).all(1)
    assert same.float().mean() > 0.95
    torch.testing.assert_close(w[same], w_t[same], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z[same], z_t[same], rtol=1e-4, atol=1e-4)
    tol = {F32: 1e-4, BF16: 3e-2, F16: 5e-3}[dtype]
    torch.testing.assert_close(y[same].float(), y_t[same].float(), rtol=tol, atol=tol)


@pytest.mark.gpu
def test_gpu_decode_path_is_used_for_few_tokens(monkeypatch):
    from medcare_kernels.backends.cuda import molora_linear as cuda_molora
    calls = []
    real = cuda_molora._torch.forward
    monkeypatch.setattr(cuda_molora._torch, "forward", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    for T in (64, 65):
        inp = {n: helpers.leaf_on(t, "cuda") for n, t in helpers.molora_make(T, 40, 24, 8, 4, 8, BF16).items()}
        helpers.molora_call(inp, 2, 1.0, "cuda")
    assert calls == [65], "64 tokens run the decode kernels, 65 the torch backend"


@pytest.mark.gpu
def test_gpu_opcheck_decode_kernel():
    args = [None if t is None else t.detach().to("cuda") for t in
            [helpers.molora_make(5, 16, 12, 4, 2, 4, BF16)[n] for n in NAMES[:9]]]
    torch.library.opcheck(torch.ops.medcare_kernels.molora_decode_cuda.default, (*args, None, 2, 0.5))


# ---- mixed precision, empty and odd layouts, non-finite values ---------------------------------------------

FUSED_RUNS = helpers.runs("torch-dense", "torch-grouped", "triton-dense", "triton-grouped", "cuda")
#: (x and the base weight, the LoRA parameters, the router): the model layer's default is bf16 x with fp32 LoRA.
MIXED = [(BF16, F32, F32), (F32, BF16, BF16), (BF16, BF16, F32)]


@pytest.mark.parametrize("run", helpers.by_run(FUSED_RUNS))
@pytest.mark.parametrize("mixed", MIXED, ids=lambda m: "-".join(map(helpers.dtype_id, m)))
def test_mixed_dtypes_keep_each_result_in_its_own_precision(mixed, run, monkeypatch):
    """y to x's precision, each gradient to its parameter's: a float32 LoRA or router fed 16-bit activations
    gets float32-accurate gradients, float32 activations with 16-bit LoRA a float32-accurate y."""
    run.apply(monkeypatch)
    x_dtype, lora_dtype, router_dtype = mixed
    inp = helpers.molora_make(37, 40, 24, 6, 8, 16, x_dtype, lora_dtype=lora_dtype)
    for n in ("router_weight", "router_bias"):
        inp[n] = inp[n].detach().to(router_dtype).requires_grad_(True)
    helpers.molora_check(inp, 2, 0.9, run.backend, None, device=run.device, logits_grad=True)


@pytest.mark.parametrize("run", helpers.by_run(FUSED_RUNS + helpers.runs("reference")))
@pytest.mark.parametrize("layout", ["empty", "empty-strided", "one-token-transposed", "one-feature-transposed"])
def test_empty_and_size_one_layouts_run_forward_and_backward(layout, run, monkeypatch):
    """An empty batch, or a size-1 dimension whose stride is not 1 (a transposed view), runs forward and
    backward and gives the oracle's results (zero gradients for an empty batch)."""
    run.apply(monkeypatch)
    T, d_in = {"empty": (0, 8), "empty-strided": (0, 7), "one-token-transposed": (1, 6),
               "one-feature-transposed": (5, 1)}[layout]
    inp = helpers.molora_make(T, d_in, 12, 4, 2, 4, F32)
    if layout == "empty-strided":
        inp["x"] = torch.randn(0, 14)[:, ::2].requires_grad_(True)
    elif layout.endswith("transposed"):
        inp["x"] = torch.randn(d_in, T).T.requires_grad_(True)
    helpers.molora_check(inp, 2, 1.0, run.backend, F32, device=run.device)
    dev = {n: helpers.leaf_on(t, run.device) for n, t in inp.items()}
    y, _ = helpers.molora_call(dev, 2, 1.0, run.backend)
    y.sum().backward()  # an expanded (stride-0) incoming gradient
    assert all(dev[n].grad is not None for n in ("x", "lora_A", "lora_B", "router_weight"))


def _poison(t: torch.Tensor, where, value: float) -> torch.Tensor:
    t = t.detach().clone()
    t[where] = value
    return t.requires_grad_(True)


@pytest.mark.parametrize("run", helpers.by_run(FUSED_RUNS))  # the reference computes every expert: not held to it
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_token_poisons_its_row_and_no_idle_expert(value, run, monkeypatch):
    """docs/design.md, "Non-finite values": one token's NaN/inf reaches its own row of y and logits only,
    and the experts no token chose keep exact zero gradients."""
    run.apply(monkeypatch)
    inp = helpers.molora_make(37, 32, 24, 8, 4, 8, F32)
    with torch.no_grad():
        inp["router_bias"].zero_()
        inp["router_bias"][5], inp["router_bias"][2] = 50.0, 49.5  # experts 5 and 2 take every token
    inp["x"] = _poison(inp["x"], (3, 7), value)
    dev = {n: helpers.leaf_on(t, run.device) for n, t in inp.items()}
    y, logits = helpers.molora_call(dev, 2, 1.0, run.backend)
    clean = torch.ones(37, dtype=torch.bool)
    clean[3] = False
    assert not torch.isfinite(y[3]).all() and not torch.isfinite(logits[3]).all()
    y64, logits64, _ = oracle.molora(*[oracle.leaf64(inp[n]) for n in NAMES[:9]], 2, 1.0)
    helpers.assert_close(y.detach().cpu()[clean], y64[clean], F32, "clean rows of y")
    helpers.assert_close(logits.detach().cpu()[clean], logits64[clean], F32, "clean rows of logits")
    gy = torch.randn_like(y)
    gy[3] = 0.0  # a loss that masks the poisoned token out
    dA, dB = torch.autograd.grad((y * gy).sum(), [dev["lora_A"], dev["lora_B"]])
    chosen = set(helpers.molora_indices(dev, 2, 1.0, run.backend, logits.detach()).view(-1).tolist())
    idle = [e for e in range(8) if e not in chosen]  # the poisoned row picks experts too (NaN weights)
    assert len(idle) >= 4
    assert torch.equal(dA[idle], torch.zeros_like(dA[idle])) and torch.equal(dB[idle], torch.zeros_like(dB[idle]))


@pytest.mark.parametrize("run", helpers.by_run(FUSED_RUNS))  # the reference computes every expert: not held to it
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_never_chosen_expert_is_never_read(value, run, monkeypatch):
    """Whatever a never-chosen expert's A and B hold, y, the logits and every gradient are the oracle's,
    and its own gradients are exact zeros."""
    run.apply(monkeypatch)
    inp = helpers.molora_make(29, 24, 16, 6, 4, 8, F32)
    with torch.no_grad():
        inp["router_bias"].zero_()
        inp["router_bias"][1], inp["router_bias"][4] = 50.0, 49.5
    inp["lora_A"] = _poison(inp["lora_A"], (3, 1, 5), value)
    inp["lora_B"] = _poison(inp["lora_B"], (3, 2, 0), value)
    helpers.molora_check(inp, 2, 1.0, run.backend, F32, device=run.device)
    dev = {n: helpers.leaf_on(t, run.device) for n, t in inp.items()}
    y, _ = helpers.molora_call(dev, 2, 1.0, run.backend)
    dA, dB = torch.autograd.grad(y.square().sum(), [dev["lora_A"], dev["lora_B"]])
    assert torch.equal(dA[3], torch.zeros_like(dA[3])) and torch.equal(dB[3], torch.zeros_like(dB[3]))


@pytest.mark.parametrize("run", helpers.by_run(FUSED_RUNS))
def test_a_nan_router_poisons_every_row_instead_of_dropping_the_lora_term(run, monkeypatch):
    """Every token reads the router: a NaN there makes every row non-finite (the LoRA term is never
    silently dropped to leave the base output), and routing still picks valid experts (no out-of-range
    index on the grouped path)."""
    run.apply(monkeypatch)
    inp = helpers.molora_make(23, 16, 12, 6, 2, 4, F32)
    inp["router_weight"] = _poison(inp["router_weight"], (2, 3), float("nan"))
    dev = {n: helpers.leaf_on(t, run.device) for n, t in inp.items()}
    y, _ = helpers.molora_call(dev, 2, 1.0, run.backend)
    assert not torch.isfinite(y).any()
