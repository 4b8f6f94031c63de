"""Fuzz: random shapes, dtypes, layouts, options and non-finite values, every backend against the float64
oracle (tests/oracle.py), forward and every gradient.

Each case is drawn inside its test from the per-test seed (tests/conftest.py), so a failure replays with
the ``MEDCARE_TEST_SEED`` printed in the header; the failure message spells the case. The non-finite
cases check the contract of docs/design.md ("Non-finite values"): a poisoned token reaches its own row
only, and experts no token chose are never read and get exact zero gradients.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import medcare_kernels as mk
from tests import helpers, oracle
from tests.helpers import BF16, F16, F32

#: Cases per run: hundreds on the torch backend (milliseconds each), a few dozen under the Triton
#: interpreter (a second or more each), more when the kernels run compiled on a GPU.
CASES = {"torch-dense": 80, "torch-grouped": 80, "reference": 40, "triton-dense-interp": 12,
         "triton-grouped-interp": 12, "triton-dense-gpu": 120, "triton-grouped-gpu": 120, "cuda": 120}
POISONS = ("none", "none", "none", "token", "idle-expert")


@pytest.fixture(autouse=True)
def _fuzz_tolerance(monkeypatch):
    monkeypatch.setattr(helpers, "TOL_SCALE", 4.0)


@dataclasses.dataclass
class Case:
    T: int
    d_in: int
    d_out: int
    E: int
    k: int
    r: int
    r_s: int
    dtype: torch.dtype
    lora_dtype: torch.dtype
    bias: bool
    router_bias: bool
    lora_x: bool
    layout: str
    poison: str
    scaling: float


def _draw(run: helpers.Run, small: bool) -> Case:
    def pick(options):
        return options[int(torch.randint(len(options), ()))]

    def upto(n, low=1):
        return int(torch.randint(low, n + 1, ()))
    E = upto(6 if small else 10)
    poison = pick(POISONS) if run.backend != "reference" else "none"
    if poison == "idle-expert" and E < 4:
        E = 4
    dtypes = (F32, BF16) if run.backend == "triton" else (F32, BF16, F16)
    if poison == "token" and run.device == "cpu":
        # PyTorch's CPU bfloat16 GEMM (oneDNN) can carry an inf from one row into the next one of its tile (seen
        # for x @ W.T alone, the frozen base): on the CPU the row contract is checked in float32 and float16.
        dtypes = tuple(d for d in dtypes if d != BF16)
    dtype = pick(dtypes)
    return Case(T=upto(24 if small else 80, low=2 if poison == "token" else 0), d_in=upto(20 if small else 48),
                d_out=upto(20 if small else 40),
                E=E, k=upto(2 if poison == "idle-expert" else min(E, 3)), r=upto(6), r_s=pick((0, upto(8))),
                dtype=dtype, lora_dtype=pick((dtype, F32)), bias=pick((True, False)), router_bias=True,
                lora_x=pick((False, False, True)), layout=pick(("contiguous", "transposed", "3d")), poison=poison,
                scaling=float(torch.empty(()).uniform_(0.1, 3.0)))


def _inputs(c: Case) -> dict:
    lead = {"3d": (2, c.T // 2 if c.T > 1 else c.T), "transposed": None, "contiguous": None}[c.layout]
    T = lead[0] * lead[1] if lead else c.T
    inp = helpers.molora_make(T, c.d_in, c.d_out, c.E, c.r, c.r_s, c.dtype, lora_dtype=c.lora_dtype, bias=c.bias,
                              router_bias=c.router_bias, lead=lead, lora_x=c.lora_x,
                              noncontig=c.layout == "transposed")
    return inp


def _skew(inp: dict, busy: tuple[int, ...]) -> None:
    """Router biases that send every token to ``busy`` (the other experts idle)."""
    with torch.no_grad():
        inp["router_bias"].zero_()
        for n, e in enumerate(busy):
            inp["router_bias"][e] = 50.0 - 0.5 * n


def _poison(t: torch.Tensor, index, value: float) -> torch.Tensor:
    t = t.detach().clone()
    t[index] = value
    return t.requires_grad_(True)


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1, t.shape[-1])


def _check_poisoned_token(c: Case, inp: dict, run: helpers.Run) -> None:
    T = inp["x"].numel() // c.d_in
    assert T >= 2, "a poisoned-token case needs a clean token beside it (see _draw)"
    busy = tuple(range(c.k))
    _skew(inp, busy)
    value = float(torch.tensor([float("nan"), float("inf"), -float("inf")])[int(torch.randint(3, ()))])
    bad = int(torch.randint(T, ()))
    x = inp["x"].detach().reshape(T, c.d_in).clone()
    x[bad, int(torch.randint(c.d_in, ()))] = value
    inp["x"] = x.requires_grad_(True)
    inp["lora_x"] = None
    dev = {n: helpers.leaf_on(t, run.device) for n, t in inp.items()}
    y, logits = helpers.molora_call(dev, c.k, c.scaling, run.backend)
    # The frozen linear is torch's own: rows it poisons are not ours to keep clean.
    with torch.no_grad():
        base = torch.nn.functional.linear(dev["x"], dev["weight"], dev["bias"])
    clean = torch.isfinite(base).all(1).cpu() & (torch.arange(T) != bad)
    ref = {n: oracle.leaf64(inp[n]) for n in helpers.MOLORA_NAMES}
    idx = helpers.molora_indices(dev, c.k, c.scaling, run.backend, logits.detach()).cpu()
    y64, logits64, _ = oracle.molora(*[ref[n] for n in helpers.MOLORA_NAMES[:9]], c.k, c.scaling, indices=idx)
    assert not torch.isfinite(y[bad]).all(), f"{c}: the poisoned token's row is finite"
    helpers.assert_close(y.detach().cpu()[clean], y64[clean], c.dtype, f"{c}: clean rows of y")
    helpers.assert_close(logits.detach().cpu()[clean], logits64[clean], F32, f"{c}: clean rows of logits")
    gy = torch.randn(y.shape, dtype=y.dtype, device=y.device)
    gy[bad] = 0  # the loss masks the poisoned token out
    dA, dB, dx = torch.autograd.grad((y.float() * gy).sum(), [dev["lora_A"], dev["lora_B"], dev["x"]])
    idle = sorted(set(range(c.E)) - set(idx.view(-1).tolist()))
    assert torch.equal(dA[idle], torch.zeros_like(dA[idle])), f"{c}: idle experts' d lora_A not exact zeros"
    assert torch.equal(dB[idle], torch.zeros_like(dB[idle])), f"{c}: idle experts' d lora_B not exact zeros"
    assert torch.isfinite(dx[clean]).all(), f"{c}: a clean token's dx is not finite"


def _check_idle_expert(c: Case, inp: dict, run: helpers.Run) -> None:
    busy = tuple(range(c.k))
    _skew(inp, busy)
    e = c.E - 1  # never chosen
    value = float(torch.tensor([float("nan"), float("inf")])[int(torch.randint(2, ()))])
    inp["lora_A"] = _poison(inp["lora_A"], (e, int(torch.randint(c.r, ())), int(torch.randint(c.d_in, ()))), value)
    inp["lora_B"] = _poison(inp["lora_B"], (e, int(torch.randint(c.d_out, ())), int(torch.randint(c.r, ()))), value)
    helpers.molora_check(inp, c.k, c.scaling, run.backend, c.dtype, device=run.device)
    dev = {n: helpers.leaf_on(t, run.device) for n, t in inp.items()}
    y, _ = helpers.molora_call(dev, c.k, c.scaling, run.backend)
    dA, dB = torch.autograd.grad(y.float().square().sum(), [dev["lora_A"], dev["lora_B"]])
    assert torch.equal(dA[e], torch.zeros_like(dA[e])) and torch.equal(dB[e], torch.zeros_like(dB[e])), str(c)


def _fuzz_runs():
    runs = helpers.runs("torch-dense", "torch-grouped", "reference", "triton-dense", "triton-grouped", "cuda")
    return [pytest.param(run, i, marks=run.marks(), id=f"{run.name}-{i}") for run in runs
            for i in range(CASES[run.name])]


@pytest.mark.parametrize("run,case", _fuzz_runs())
def test_fuzz_molora_linear(run, case, monkeypatch):
    run.apply(monkeypatch)
    c = _draw(run, small=run.interpreted)
    inp = _inputs(c)
    try:
        if c.poison == "token":
            _check_poisoned_token(c, inp, run)
        elif c.poison == "idle-expert":
            _check_idle_expert(c, inp, run)
        else:
            helpers.molora_check(inp, c.k, c.scaling, run.backend, c.dtype if c.dtype == c.lora_dtype else None,
                                 device=run.device, logits_grad=bool(torch.randint(2, ())))
    except AssertionError as e:
        raise AssertionError(f"{c}: {e}") from e


def _simple_runs(n_cpu: int, n_interp: int, n_gpu: int):
    out = []
    for run in helpers.runs("torch", "reference", "triton", "cuda"):
        n = n_interp if run.interpreted else n_gpu if run.device == "cuda" else n_cpu
        out += [pytest.param(run, i, marks=run.marks(), id=f"{run.name}-{i}") for i in range(n)]
    return out


@pytest.mark.parametrize("run,case", _simple_runs(40, 10, 40))
def test_fuzz_lora_linear(run, case, monkeypatch):
    run.apply(monkeypatch)
    T, d_in, d_out, r = int(torch.randint(0, 60, ())), int(torch.randint(1, 40, ())), int(torch.randint(1, 30, ())), \
        int(torch.randint(1, 12, ()))
    dtypes = (F32, BF16) if run.backend == "triton" else (F32, BF16, F16)
    dtype = dtypes[int(torch.randint(len(dtypes), ()))]
    lead = (T,) if T % 2 or T == 0 else (2, T // 2)
    inp = helpers.lora_make((*lead, d_in), d_out, r, dtype, bias=bool(torch.randint(2, ())),
                            lora_x=bool(torch.randint(2, ())), noncontig=bool(torch.randint(2, ())))
    helpers.lora_check(inp, float(torch.empty(()).uniform_(0.1, 3.0)), run.backend, dtype, device=run.device)


@pytest.mark.parametrize("run,case", _simple_runs(60, 10, 60))
def test_fuzz_route(run, case, monkeypatch):
    run.apply(monkeypatch)
    E = int(torch.randint(1, 70, ()))
    k, T = int(torch.randint(1, E + 1, ())), int(torch.randint(0, 90, ()))
    dtypes = (F32, BF16, F16) if run.backend == "triton" else (F32, BF16, F16, torch.float64)
    helpers.route_check(T, E, k, dtypes[int(torch.randint(len(dtypes), ()))], run.backend, device=run.device)
    if T and run.backend != "reference":  # a poisoned row: valid distinct experts, NaN weights, others intact
        logits = torch.randn(T, E)
        logits[int(torch.randint(T, ())), int(torch.randint(E, ()))] = float("nan")
        w, i = mk.route(logits.to(run.device), k, backend=run.backend)
        assert ((i >= 0) & (i < E)).all() and (i.sort(1).values.diff(1) > 0).all()
        assert torch.isnan(w).any(1).sum() == 1


@pytest.mark.parametrize("run,case", _simple_runs(30, 6, 30))
def test_fuzz_orthogonal_penalty(run, case, monkeypatch):
    run.apply(monkeypatch)
    layers = [(int(torch.randint(1, 12, ())), int(torch.randint(1, 12, ())), int(torch.randint(1, 70, ())))
              for _ in range(int(torch.randint(1, 5, ())))]
    dtypes = (F32, BF16, F16)
    helpers.penalty_check(layers, dtypes[int(torch.randint(3, ()))], run.backend, device=run.device)
