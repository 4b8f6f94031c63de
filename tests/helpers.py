"""What the op tests share: the backends a case runs on, tolerances, comparison against the float64 oracle
(:mod:`tests.oracle`), and per op an input builder and a ``check`` that runs the library on a device and
compares the forward and every gradient with the oracle on the CPU.

Test files import from here (and from :mod:`tests.oracle`), never from one another.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import pytest
import torch

import medcare_kernels as mk
import medcare_kernels.backends as be
from tests import oracle

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
ON_GPU = torch.cuda.is_available()

#: Normalised max error ``max|a - b| / max|b|`` allowed per dtype of the computation under test.
TOL = {F64: 1e-10, F32: 2e-5, BF16: 2e-2, F16: 4e-3}
#: A multiplier of TOL: the fuzz test raises it (random cases include sums that cancel, e.g. a router bias
#: gradient over tokens whose logit gradients nearly cancel, where the normalised error is inflated).
TOL_SCALE = 1.0


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- the backends a case runs on --------------------------------------------------------------------------

def _interpreter_too_old() -> str | None:
    """Triton < 3.8's CPU interpreter converts 1-element arrays to loop bounds with ``int()``, which
    numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted"); compiled GPU runs are fine."""
    if ON_GPU or os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None:
        return None
    import numpy
    import triton

    def version(v):
        return tuple(int(p) for p in v.split("+")[0].split(".")[:2])
    if version(triton.__version__) < (3, 8) and version(numpy.__version__) >= (2, 4):
        return f"triton {triton.__version__}'s interpreter needs numpy < 2.4 (have {numpy.__version__})"
    return None


def _triton_skip() -> str | None:
    device = "cuda" if ON_GPU else "cpu"
    reason = be.backend_unavailable_reason("triton", device)
    return f"triton backend unavailable: {reason}" if reason else _interpreter_too_old()


TRITON_SKIP = _triton_skip()


@dataclass(frozen=True)
class Run:
    """One way to run an op: a backend on a device, with environment knobs (e.g. a formulation)."""

    name: str
    backend: str
    device: str
    env: tuple[tuple[str, str], ...] = ()

    @property
    def interpreted(self) -> bool:
        """Triton kernels on the CPU under ``TRITON_INTERPRET=1``: slow, so small shapes only."""
        return self.backend == "triton" and self.device == "cpu"

    def marks(self) -> list:
        if self.device == "cuda":
            marks = [pytest.mark.gpu]
            if self.backend == "triton" and TRITON_SKIP:
                marks.append(pytest.mark.skip(reason=TRITON_SKIP))
            return marks
        if self.backend == "triton":
            # with CUDA present, the gpu twin runs the case compiled instead of the interpreter
            return [pytest.mark.skipif(ON_GPU or TRITON_SKIP is not None,
                                       reason=TRITON_SKIP or "CUDA present: the gpu twin runs this case")]
        return []

    def apply(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name, value in self.env:
            monkeypatch.setenv(name, value)


_FORMULATION = "MEDCARE_MOLORA_FORMULATION"
_TRITON_PATH = "MEDCARE_TRITON_MOLORA_PATH"
_RUNS = {
    "torch": [Run("torch", "torch", "cpu")],
    "torch-dense": [Run("torch-dense", "torch", "cpu", ((_FORMULATION, "dense"),))],
    "torch-grouped": [Run("torch-grouped", "torch", "cpu", ((_FORMULATION, "grouped"),))],
    "reference": [Run("reference", "reference", "cpu")],
    "triton": [Run("triton-interp", "triton", "cpu"), Run("triton-gpu", "triton", "cuda")],
    "triton-dense": [Run("triton-dense-interp", "triton", "cpu", ((_TRITON_PATH, "dense"),)),
                     Run("triton-dense-gpu", "triton", "cuda", ((_TRITON_PATH, "dense"),))],
    "triton-grouped": [Run("triton-grouped-interp", "triton", "cpu", ((_TRITON_PATH, "grouped"),)),
                       Run("triton-grouped-gpu", "triton", "cuda", ((_TRITON_PATH, "grouped"),))],
    "triton-cublas": [Run("triton-cublas-interp", "triton", "cpu", (("MEDCARE_TRITON_BASE", "cublas"),)),
                      Run("triton-cublas-gpu", "triton", "cuda", (("MEDCARE_TRITON_BASE", "cublas"),))],
    "cuda": [Run("cuda", "cuda", "cuda")],
}


def runs(*names: str) -> list[Run]:
    """The :class:`Run` s named (``"triton"`` gives its interpreter and its GPU twin)."""
    return [r for n in names for r in _RUNS[n]]


def grid(cases: Sequence, run_list: Sequence[Run], dtypes: Callable[[Run], Iterable[torch.dtype]] | Sequence,
         keep: Callable[[object, Run, torch.dtype], bool] | None = None, case_ids: Sequence[str] | None = None):
    """``pytest.param(case, run, dtype)`` for every combination that ``keep`` accepts, with the run's marks
    and a readable id. ``dtypes``: a list, or a function of the run."""
    params = []
    for i, case in enumerate(cases):
        for run in run_list:
            for dt in (dtypes(run) if callable(dtypes) else dtypes):
                if keep is not None and not keep(case, run, dt):
                    continue
                cid = case_ids[i] if case_ids else "-".join(map(str, case if isinstance(case, tuple) else (case,)))
                params.append(pytest.param(case, run, dt, marks=run.marks(), id=f"{cid}-{run.name}-{dtype_id(dt)}"))
    return params


def by_run(run_list: Sequence[Run]):
    """``pytest.param(run)`` for each run, with its marks (for tests parametrised by the run alone)."""
    return [pytest.param(r, marks=r.marks(), id=r.name) for r in run_list]


# ---- comparisons ------------------------------------------------------------------------------------------

def assert_close(actual, expected, dtype, name="", scale=None):
    """``actual`` (any dtype) matches the float64 ``expected`` within ``TOL[dtype]``, normalised by
    ``max|expected|``, or by ``scale`` when that is larger: the magnitude of the terms a sum such as a bias
    gradient adds up (a sum over tokens that nearly cancels is only as accurate as its terms)."""
    assert actual is not None, f"{name}: gradient missing"
    assert tuple(actual.shape) == tuple(expected.shape), \
        f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to(device="cpu", dtype=F64)  # a device result against the CPU oracle
    e = expected.detach().to(device="cpu", dtype=F64)
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    if e.numel() == 0:
        return
    scale = e.abs().max() if scale is None else max(e.abs().max(), torch.as_tensor(scale, dtype=F64))
    if scale < 1e-9:  # mathematically zero (e.g. the router's gradient at top_k = 1): roundoff only
        assert a.abs().max() <= 10 * TOL[dtype] * TOL_SCALE, \
            f"{name}: expected zeros, got up to {a.abs().max().item():.3g}"
        return
    err = ((a - e).abs().max() / scale).item()
    tol = TOL[dtype] * TOL_SCALE
    assert err <= tol, f"{name}: normalised max error {err:.3g} > {tol:.1g} ({dtype})"


def assert_routing_near_ties(indices, logits64, top_k, tol):
    """The library's ``indices`` [T, k] are k distinct experts per token and match the float64 oracle's
    top-k of ``logits64`` [T, E] (ties to the lower index), except at genuine near-ties: where a row's
    expert *set* differs, the gap between its k-th and (k+1)-th largest probability is below ``tol``; where
    only the *order* differs, the gap between two consecutive probabilities among its k largest is."""
    indices = indices.cpu()
    assert (indices.sort(1).values.diff(1) > 0).all(), "k distinct experts per token"
    want = oracle.route_indices(logits64, top_k)
    set_differs = (indices.sort(1).values != want.sort(1).values).any(1)
    order_differs = (indices != want).any(1) & ~set_differs
    assert (oracle.topk_margin(logits64, top_k)[set_differs] < tol).all(), "routed experts differ beyond near-ties"
    # order_margin(., k - 1): the smallest gap between consecutive probabilities among the k largest
    assert (oracle.order_margin(logits64, top_k - 1)[order_differs] < tol).all(), \
        "order of the routed experts differs beyond near-ties"


def leaf_on(t, device):
    """A leaf copy of ``t`` on ``device`` (same strides, same requires_grad); None stays None."""
    return None if t is None else t.detach().to(device).requires_grad_(t.requires_grad)


def grads_of(outputs_and_seeds, inputs):
    """Gradients of ``sum(out * seed)`` w.r.t. the inputs that require grad (None for the others)."""
    loss = sum((o.to(F64) * s.to(F64)).sum() for o, s in outputs_and_seeds)
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(loss, wanted, allow_unused=True))
    return [next(got) if (t is not None and t.requires_grad) else None for t in inputs]


def _check_grads(names, got, want, tensors, dtype, reshape=(), scales=None):
    for name, g, w, t in zip(names, got, want, tensors):
        if t is None or not t.requires_grad:
            assert g is None
            continue
        assert g is not None, f"d{name}: gradient missing"
        assert g.dtype == t.dtype and g.device == t.device, f"{name} grad dtype/device"
        assert_close(g.reshape(w.shape) if name in reshape else g, w, dtype or t.dtype, f"d{name}",
                     (scales or {}).get(name))


# ---- route ------------------------------------------------------------------------------------------------

def route_check(T, E, top_k, dtype, backend, *, device="cpu"):
    """Random logits [T, E] of ``dtype`` routed by the library on ``device``: weights, indices and the
    logits' gradient vs the float64 oracle on the CPU."""
    logits_cpu = (torch.randn(T, E) * 2).to(dtype).requires_grad_(True)
    logits = leaf_on(logits_cpu, device)
    weights, indices = mk.route(logits, top_k, backend=backend)
    acc = F64 if dtype == F64 else F32
    assert weights.shape == (T, top_k) and weights.dtype == acc and weights.device == logits.device
    assert indices.shape == (T, top_k) and indices.dtype == torch.int64 and indices.device == logits.device
    ref_logits = oracle.leaf64(logits_cpu)
    if T:
        assert_routing_near_ties(indices, ref_logits, top_k, 1e-6)
    w64, _ = oracle.route(ref_logits, top_k, indices.cpu())
    tol = F64 if dtype == F64 else F32  # float32 math for every input dtype
    assert_close(weights, w64, tol, "weights")
    if T:
        assert torch.allclose(weights.sum(-1).cpu().double(), torch.ones(T, dtype=F64), atol=1e-6)
        assert (weights[:, :-1] >= weights[:, 1:]).all(), "weights come in descending order"
    g = torch.randn(T, top_k, dtype=F64)
    (got,) = torch.autograd.grad((weights.double() * g.to(weights.device)).sum(), logits, allow_unused=True)
    (want,) = torch.autograd.grad((w64 * g).sum(), ref_logits)
    assert got is not None and got.dtype == dtype and got.device == logits.device
    assert_close(got, want, tol if dtype in (F32, F64) else dtype, "d logits")


def route_check_ties(backend, *, device="cpu"):
    """Equal probabilities go to the lower expert index, in every input dtype and with many experts."""
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0],
                           [2.0, 2.0, 2.0, 2.0, 2.0],
                           [0.0, 5.0, 1.0, 5.0, 1.0]], device=device)
    for dtype in (F32, BF16, F16):
        assert mk.route(logits.to(dtype), 2, backend=backend)[1].tolist() == [[1, 2], [0, 1], [1, 3]]
        assert mk.route(logits.to(dtype), 3, backend=backend)[1].tolist() == [[1, 2, 3], [0, 1, 2], [1, 3, 2]]
    wide = torch.zeros(2, 100, device=device)  # every expert tied, more experts than lanes and k > 32
    assert mk.route(wide, 40, backend=backend)[1].tolist() == [list(range(40))] * 2


# ---- molora_linear ----------------------------------------------------------------------------------------

MOLORA_NAMES = ("x", "weight", "bias", "router_weight", "router_bias", "lora_A", "lora_B", "shared_A", "shared_B",
                "lora_x")

#: Options of :func:`molora_make` that each make a variant of the standard case.
MOLORA_VARIANTS = {
    "no-shared": dict(r_s=0),
    "no-bias": dict(bias=False),
    "no-router-bias": dict(router_bias=False),
    "3d-input": dict(lead=(3, 11)),
    "non-contiguous-x": dict(lead=(5, 9), noncontig=True),
    "lora-x": dict(lora_x=True),
    "lora-x-3d": dict(lora_x=True, lead=(2, 13)),
    "frozen-weight-trains": dict(weight_grad=True),
    "fp32-lora-params": dict(lora_dtype=F32),
}


def molora_make(T, d_in, d_out, E, r, r_s, dtype, *, lora_dtype=None, bias=True, router_bias=True, lead=None,
                lora_x=False, weight_grad=False, noncontig=False):
    """Random MoLoRA inputs; the LoRA/router parameters and x require grad, the base weight does not."""
    lora_dtype = lora_dtype or dtype
    shape = (*lead, d_in) if lead else (T, d_in)

    def rand(*size, dt=dtype, scale=1.0, grad=True):
        return (torch.randn(*size) * scale).to(dt).requires_grad_(grad)

    if noncontig:  # a transposed view: last dim is not contiguous in memory
        x = (torch.randn(d_in, *shape[:-1]).to(dtype).movedim(0, -1)).requires_grad_(True)
        assert not x.is_contiguous() or min(shape) <= 1  # size-0/1 dimensions: contiguous whatever the strides
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


def molora_variant(variant, dtype, T=50, d_in=33, d_out=20, E=6, r=4):
    opts = dict(MOLORA_VARIANTS[variant])
    r_s = opts.pop("r_s", 12)
    return molora_make(T, d_in, d_out, E, r, r_s, dtype, **opts)


def molora_call(inp, top_k, scaling, backend):
    return mk.molora_linear(*[inp[n] for n in MOLORA_NAMES[:9]], top_k=top_k, scaling=scaling, lora_x=inp["lora_x"],
                            backend=backend)


def molora_indices(inp, top_k, scaling, backend, logits):
    """The experts the library chose (its own routing of its own logits), through the custom op's state."""
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


def molora_check(inp, top_k, scaling, backend, dtype, *, device="cpu", logits_grad=False):
    """Forward and every gradient of the library on ``device`` vs the float64 oracle on the CPU (on the
    library's routing, which must agree with the oracle's except at genuine near-ties). ``inp`` holds
    CPU tensors (:func:`molora_make`); the library gets leaf copies of them on ``device``. ``dtype``: the
    tolerance of every comparison, or None for each result's own dtype (y: x's; a gradient: its
    parameter's), which mixed-precision inputs must meet."""
    dev = {n: leaf_on(inp[n], device) for n in MOLORA_NAMES}
    y, logits = molora_call(dev, top_k, scaling, backend)
    d_out = inp["weight"].shape[0]
    T = inp["x"].numel() // inp["x"].shape[-1]
    assert y.shape == (*inp["x"].shape[:-1], d_out) and y.dtype == inp["x"].dtype and y.device == dev["x"].device
    assert logits.shape == (T, inp["router_weight"].shape[0]) and logits.dtype == F32
    assert logits.device == dev["x"].device

    idx = molora_indices(dev, top_k, scaling, backend, logits.detach()).cpu()
    ref = {n: oracle.leaf64(inp[n]) for n in MOLORA_NAMES}
    x2 = lambda t: None if t is None else t.reshape(-1, t.shape[-1])  # noqa: E731
    y64, logits64, _ = oracle.molora(x2(ref["x"]), ref["weight"], ref["bias"], ref["router_weight"],
                                     ref["router_bias"], ref["lora_A"], ref["lora_B"], ref["shared_A"],
                                     ref["shared_B"], top_k, scaling, lora_x=x2(ref["lora_x"]), indices=idx)
    if T:
        assert_routing_near_ties(idx, logits64, top_k, 1e-4)
    assert_close(y.reshape(T, d_out), y64, dtype or y.dtype, "y")
    assert_close(logits, logits64, F32, "router_logits")  # float32 math whatever the input dtype

    gy = torch.randn(y.shape).to(y.dtype).to(F64)  # what the library receives, exactly
    seeds = [(y, gy.to(y.device))]
    seeds64 = [(y64, gy.reshape(T, d_out))]
    if logits_grad:
        gl = torch.randn(logits.shape, dtype=F64)
        seeds.append((logits, gl.to(logits.device)))
        seeds64.append((logits64, gl))
    got = grads_of(seeds, [dev[n] for n in MOLORA_NAMES])
    scales = {}
    if logits64.requires_grad and T:  # the router's gradients are sums over tokens: their terms' magnitude
        (dl64,) = torch.autograd.grad(sum((o * s).sum() for o, s in seeds64), logits64, retain_graph=True)
        scales = {"router_bias": dl64.abs().sum(0).max(),
                  "router_weight": (dl64.abs().T @ x2(ref["x"]).detach().abs()).max()}
    want = grads_of(seeds64, [ref[n] for n in MOLORA_NAMES])
    _check_grads(MOLORA_NAMES, got, want, [dev[n] for n in MOLORA_NAMES], dtype, reshape=("x", "lora_x"),
                 scales=scales)


def molora_check_idle_experts(inp, top_k, busy, backend, dtype, *, device="cpu"):
    """Routing skewed by the router bias (``busy``: expert -> bias, the others 0) so that the busy experts
    take every token: :func:`molora_check` holds, and the idle experts' A/B gradients exist and are exactly
    zero while every busy expert's are not."""
    with torch.no_grad():
        inp["router_bias"].zero_()
        for e, b in busy.items():
            inp["router_bias"][e] = b
    molora_check(inp, top_k, 1.0, backend, dtype, device=device)
    dev = {n: leaf_on(inp[n], device) for n in MOLORA_NAMES}
    y, _ = molora_call(dev, top_k, 1.0, backend)
    dA, dB = torch.autograd.grad(y.float().square().sum(), [dev["lora_A"], dev["lora_B"]])
    idle = [e for e in range(dA.shape[0]) if e not in busy]
    assert torch.equal(dA[idle], torch.zeros_like(dA[idle])) and torch.equal(dB[idle], torch.zeros_like(dB[idle]))
    assert all(dA[e].abs().sum() > 0 and dB[e].abs().sum() > 0 for e in busy)


def saved_numel(call: Callable[[], object], inputs: Iterable[torch.Tensor | None]) -> int:
    """How many elements ``call()`` saves for its backward beyond ``inputs`` (saved-tensor hooks)."""
    ptrs = {t.data_ptr() for t in inputs if t is not None}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in ptrs:
            total += t.numel()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        call()
    return total


# ---- lora_linear ------------------------------------------------------------------------------------------

LORA_NAMES = ("x", "weight", "bias", "lora_A", "lora_B", "lora_x")

LORA_VARIANTS = {
    "no-bias": dict(bias=False),
    "3d-input": dict(shape=(3, 7, 40)),
    "non-contiguous-x": dict(shape=(4, 9, 40), noncontig=True),
    "lora-x": dict(lora_x=True),
    "frozen-weight-trains": dict(weight_grad=True),
    "fp32-lora-params": dict(lora_dtype=F32),
}


def lora_make(shape, d_out, r, dtype, *, lora_dtype=None, bias=True, lora_x=False, weight_grad=False,
              noncontig=False):
    d_in = shape[-1]
    lora_dtype = lora_dtype or dtype

    def rand(*size, dt=dtype, scale=1.0, grad=True):
        return (torch.randn(*size) * scale).to(dt).requires_grad_(grad)

    if noncontig:
        x = torch.randn(d_in, *shape[:-1]).to(dtype).movedim(0, -1).requires_grad_(True)
    else:
        x = rand(*shape)
    return dict(x=x, weight=rand(d_out, d_in, scale=d_in ** -0.5, grad=weight_grad),
                bias=rand(d_out, grad=weight_grad) if bias else None,
                lora_A=rand(r, d_in, dt=lora_dtype, scale=d_in ** -0.5),
                lora_B=rand(d_out, r, dt=lora_dtype, scale=r ** -0.5),
                lora_x=rand(*shape) if lora_x else None)


def lora_variant(variant, dtype, r=8):
    opts = dict(LORA_VARIANTS[variant])
    shape = opts.pop("shape", (50, 40))
    return lora_make(shape, 24, r, dtype, **opts)


def lora_call(inp, scaling, backend):
    return mk.lora_linear(inp["x"], inp["weight"], inp["bias"], inp["lora_A"], inp["lora_B"], scaling=scaling,
                          lora_x=inp["lora_x"], backend=backend)


def lora_check(inp, scaling, backend, dtype, *, device="cpu"):
    """Forward and every gradient of the library on ``device`` (leaf copies of the CPU tensors ``inp``)
    vs the float64 oracle on the CPU."""
    dev = {n: leaf_on(inp[n], device) for n in LORA_NAMES}
    y = lora_call(dev, scaling, backend)
    assert y.shape == (*inp["x"].shape[:-1], inp["weight"].shape[0]) and y.dtype == inp["x"].dtype
    assert y.device == dev["x"].device
    ref = {n: oracle.leaf64(inp[n]) for n in LORA_NAMES}
    y64 = oracle.lora(ref["x"], ref["weight"], ref["bias"], ref["lora_A"], ref["lora_B"], scaling, ref["lora_x"])
    assert_close(y, y64, dtype, "y")
    gy = torch.randn(y.shape).to(y.dtype).to(F64)  # what the library receives, exactly
    got = grads_of([(y, gy.to(y.device))], [dev[n] for n in LORA_NAMES])
    want = grads_of([(y64, gy)], [ref[n] for n in LORA_NAMES])
    _check_grads(LORA_NAMES, got, want, [dev[n] for n in LORA_NAMES], dtype)


# ---- orthogonal_penalty -----------------------------------------------------------------------------------

#: (r_base, r_orth, d) per layer: several shapes, repeated shapes (batched together), ragged d.
PENALTY_LAYERS = [(32, 32, 48), (32, 32, 48), (32, 32, 80), (16, 8, 48), (4, 4, 7), (32, 32, 80)]


def penalty_make(layers, dtype, grad_base=True):
    base = [torch.randn(r1, d).to(dtype).requires_grad_(grad_base) for r1, _, d in layers]
    orth = [torch.randn(r2, d).to(dtype).requires_grad_(True) for _, r2, d in layers]
    return base, orth


def penalty_check(layers, dtype, backend, *, device="cpu"):
    """Penalty and both sequences' gradients of the library on ``device`` vs the float64 oracle on the CPU."""
    base_cpu, orth_cpu = penalty_make(layers, dtype)
    base, orth = [leaf_on(t, device) for t in base_cpu], [leaf_on(t, device) for t in orth_cpu]
    p = mk.orthogonal_penalty(base, orth, backend=backend)
    assert p.shape == () and p.dtype == F32 and p.device == base[0].device
    base64, orth64 = [oracle.leaf64(t) for t in base_cpu], [oracle.leaf64(t) for t in orth_cpu]
    p64 = oracle.orthogonal_penalty(base64, orth64)
    assert_close(p, p64, F32, "penalty")  # float32 math on exactly upcast inputs
    got = torch.autograd.grad(p, base + orth)
    want = torch.autograd.grad(p64, base64 + orth64)
    for i, (g, w, t) in enumerate(zip(got, want, base + orth)):
        assert g.dtype == t.dtype and g.shape == t.shape and g.device == t.device
        assert_close(g, w, dtype, f"grad {i}")
