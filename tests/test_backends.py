"""Backend selection: availability, ``auto``, ``MEDCARE_BACKEND``, and clear errors for what cannot run."""

from __future__ import annotations

import pytest
import torch

import medcare_kernels as mk
import medcare_kernels.backends as be
from medcare_kernels.backends.reference import molora_linear as reference_molora


def small():
    E, d_in, d_out = 4, 8, 6
    return (torch.randn(5, d_in), torch.randn(d_out, d_in), None, torch.randn(E, d_in), None,
            torch.randn(E, 2, d_in), torch.randn(E, d_out, 2))


def test_cpu_machine_lists_reference_and_torch():
    assert {"reference", "torch"} <= set(mk.available_backends("cpu"))
    assert mk.available_backends("cpu")[:2] == ["reference", "torch"]


def test_auto_on_cpu_is_torch_and_env_overrides(monkeypatch):
    dev = torch.device("cpu")
    assert be.resolve_backend("auto", dev, "molora_linear") == "torch"
    monkeypatch.setenv("MEDCARE_BACKEND", "reference")
    assert be.resolve_backend("auto", dev, "molora_linear") == "reference"
    assert be.resolve_backend("torch", dev, "molora_linear") == "torch", "an explicit name wins over the env"
    monkeypatch.setenv("MEDCARE_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"MEDCARE_BACKEND must be one of .* got 'nope'"):
        mk.molora_linear(*small(), top_k=2, scaling=1.0)


def test_env_override_reaches_the_reference(monkeypatch):
    calls = []
    real = reference_molora.apply
    monkeypatch.setattr(reference_molora, "apply", lambda *a: calls.append(1) or real(*a))
    mk.molora_linear(*small(), top_k=2, scaling=1.0)
    assert not calls
    monkeypatch.setenv("MEDCARE_BACKEND", "reference")
    mk.molora_linear(*small(), top_k=2, scaling=1.0)
    assert calls == [1]


def test_known_backend_that_cannot_run_raises_with_the_reason(monkeypatch):
    monkeypatch.setitem(be._BACKENDS, "fancy", ("nowhere", lambda device: "it needs a quantum computer"))
    monkeypatch.setattr(be, "BACKENDS", (*be.BACKENDS, "fancy"))
    assert "fancy" not in mk.available_backends("cpu")
    with pytest.raises(mk.BackendUnavailableError, match=r"backend='fancy' cannot run molora_linear: it needs a quantum"):
        be.resolve_backend("fancy", torch.device("cpu"), "molora_linear")
    assert issubclass(mk.BackendUnavailableError, ValueError)


def test_every_backend_agrees():
    args = small()
    y_t, l_t = mk.molora_linear(*args, top_k=2, scaling=1.0, backend="torch")
    y_r, l_r = mk.molora_linear(*args, top_k=2, scaling=1.0, backend="reference")
    torch.testing.assert_close(y_t, y_r)
    torch.testing.assert_close(l_t, l_r)


def test_formulation_env_is_validated(monkeypatch):
    monkeypatch.setenv("MEDCARE_MOLORA_FORMULATION", "sparse")
    with pytest.raises(ValueError, match="MEDCARE_MOLORA_FORMULATION must be one of"):
        mk.molora_linear(*small(), top_k=2, scaling=1.0)


def _route_choice(available):
    """``route``'s ``auto`` preference as the op passes it to ``resolve_backend``."""
    from medcare_kernels.ops import route as route_op

    return be.pick_fast(available, torch.float32, route_op._FAST)


def test_resolution_looks_nothing_up_per_call(monkeypatch):
    """``resolve_backend`` runs inside ``torch.compile``d code, where dynamo (torch 2.11) refuses to
    trace ``importlib.util.find_spec``: a graph break under fullgraph=True, seen on an H200. The module
    lookups happen once, at import, and a call does none."""
    import importlib.util

    def refuse(*args, **kwargs):
        raise AssertionError("importlib.util.find_spec called during backend resolution")

    monkeypatch.setattr(importlib.util, "find_spec", refuse)
    for device in ("cpu", "cuda"):
        be.available_backends(device)
        be.resolve_backend("auto", torch.device(device), "route", choose=_route_choice)


def test_resolution_for_cuda_tensors_traces_without_graph_breaks():
    """What ``backend="auto"`` decides for CUDA tensors compiles with fullgraph=True (no GPU needed)."""
    def pick(x):
        name = be.resolve_backend("auto", torch.device("cuda"), "route", choose=_route_choice)
        reasons = [be.backend_unavailable_reason(b, torch.device("cuda")) for b in be.BACKENDS]
        return x + be.BACKENDS.index(name) + sum(r is None for r in reasons)

    x = torch.zeros(3)
    torch.testing.assert_close(torch.compile(pick, fullgraph=True)(x), pick(x))
