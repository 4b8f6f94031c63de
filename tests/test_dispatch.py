"""Who runs what: availability, ``auto``'s table (medcare_kernels.dispatch), the environment knobs, recording
which backend ran, and clear errors for what cannot run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import medcare_kernels as mk
import medcare_kernels.backends as be
from medcare_kernels import dispatch

ROOT = Path(__file__).resolve().parents[1]
F32, F64 = torch.float32, torch.float64
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def small():
    E, d_in, d_out = 4, 8, 6
    return (torch.randn(5, d_in), torch.randn(d_out, d_in), None, torch.randn(E, d_in), None,
            torch.randn(E, 2, d_in), torch.randn(E, d_out, 2))


@pytest.fixture
def gpu_here(monkeypatch):
    """Pretend exactly ``names`` of the cuda/triton backends can run on CUDA tensors (no GPU needed)."""
    real = be._unavailable

    def make(names):
        def fake(backend, device):
            if device.type == "cuda" and backend in ("cuda", "triton"):
                return None if backend in names else f"{backend} is off in this test"
            return real(backend, device)
        monkeypatch.setattr(be, "_unavailable", fake)
    return make


def test_cpu_machine_lists_reference_and_torch():
    assert {"reference", "torch"} <= set(mk.available_backends("cpu"))
    assert mk.available_backends("cpu")[:2] == ["reference", "torch"]


def test_auto_on_cpu_is_torch_and_env_overrides(monkeypatch):
    assert be.resolve_backend("molora_linear", "auto", CPU, F32) == "torch"
    monkeypatch.setenv("MEDCARE_BACKEND", "reference")
    assert be.resolve_backend("molora_linear", "auto", CPU, F32) == "reference"
    assert be.resolve_backend("molora_linear", "torch", CPU, F32) == "torch", "an explicit name wins over the env"
    monkeypatch.setenv("MEDCARE_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"MEDCARE_BACKEND must be one of .* got 'nope'"):
        mk.molora_linear(*small(), top_k=2, scaling=1.0)


def test_env_override_reaches_the_reference(monkeypatch):
    from medcare_kernels.backends.reference import molora_linear as reference_molora

    calls = []
    real = reference_molora.apply
    monkeypatch.setattr(reference_molora, "apply", lambda *a: calls.append(1) or real(*a))
    mk.molora_linear(*small(), top_k=2, scaling=1.0)
    assert not calls
    monkeypatch.setenv("MEDCARE_BACKEND", "reference")
    mk.molora_linear(*small(), top_k=2, scaling=1.0)
    assert calls == [1]


def test_known_backend_that_cannot_run_raises_with_the_reason(gpu_here):
    gpu_here(set())
    with pytest.raises(mk.BackendUnavailableError, match=r"backend='triton' cannot run lora_linear: triton is off"):
        be.resolve_backend("lora_linear", "triton", CUDA, F32)
    assert issubclass(mk.BackendUnavailableError, ValueError)
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'fancy'"):
        be.resolve_backend("route", "fancy", CPU, F32)


def test_every_backend_agrees():
    args = small()
    y_t, l_t = mk.molora_linear(*args, top_k=2, scaling=1.0, backend="torch")
    y_r, l_r = mk.molora_linear(*args, top_k=2, scaling=1.0, backend="reference")
    torch.testing.assert_close(y_t, y_r)
    torch.testing.assert_close(l_t, l_r)


@pytest.mark.parametrize("knob", [k for k in dispatch.KNOBS if k.scope == "runtime"], ids=lambda k: k.name)
def test_every_runtime_knob_is_validated_with_its_name(knob, monkeypatch):
    monkeypatch.setenv(knob.name, "sparse")
    with pytest.raises(ValueError, match=f"{knob.name} must be one of"):
        dispatch.knob(knob.name)
    monkeypatch.setenv(knob.name, "")
    assert dispatch.knob(knob.name) == knob.default


def test_formulation_env_reaches_the_op(monkeypatch):
    monkeypatch.setenv("MEDCARE_MOLORA_FORMULATION", "sparse")
    with pytest.raises(ValueError, match="MEDCARE_MOLORA_FORMULATION must be one of"):
        mk.molora_linear(*small(), top_k=2, scaling=1.0)


def test_auto_on_cuda_follows_the_preference_table(gpu_here):
    gpu_here({"cuda", "triton"})
    for op, pref in dispatch.PREFERENCES.items():
        assert be.resolve_backend(op, "auto", CUDA, F32, 4096, True) == pref.order[0]
        assert be.resolve_backend(op, "auto", CUDA, F64, 4096, True) == "torch", "no 64-bit kernels"
        assert be.resolve_backend(op, "auto", CPU, F32, 4096, True) == "torch"
    decode = dispatch.THRESHOLDS["DECODE_MAX_TOKENS"].value
    for tokens, grad, want in ((1, False, "cuda"), (decode, False, "cuda"), (decode + 1, False, "triton"),
                               (16, True, "triton"), (4096, False, "triton")):
        assert be.resolve_backend("molora_linear", "auto", CUDA, F32, tokens, grad) == want, (tokens, grad)
    gpu_here({"triton"})
    assert be.resolve_backend("route", "auto", CUDA, F32) == "triton"
    assert be.resolve_backend("molora_linear", "auto", CUDA, F32, 1, False) == "triton"
    gpu_here(set())
    assert all(be.resolve_backend(op, "auto", CUDA, F32) == "torch" for op in dispatch.PREFERENCES)


def test_every_op_has_a_preference_and_every_preference_names_real_backends():
    from medcare_kernels import ops  # noqa: F401

    assert set(dispatch.PREFERENCES) == {"route", "molora_linear", "lora_linear", "orthogonal_penalty"}
    for pref in dispatch.PREFERENCES.values():
        assert set(pref.order) | set(pref.decode) <= set(be.BACKENDS) - {"reference", "torch"}
        assert pref.evidence


def test_torch_formulation_follows_the_cpu_measurements(monkeypatch):
    """benchmarks/RESULTS.md: grouped for decoding (fewer slots than experts) and for many tokens, dense in
    between and whenever k = E; on CUDA dense unless E*r is wide."""
    f = dispatch.torch_formulation
    assert f(1, 8, 16, 2, CPU) == "grouped"
    assert f(8, 8, 16, 2, CPU) == "dense"
    assert f(128, 8, 16, 2, CPU) == "grouped"
    assert f(1024, 8, 16, 8, CPU) == "dense"
    assert f(0, 8, 16, 2, CPU) == "dense"
    assert f(4096, 8, 16, 2, CUDA) == "dense"
    assert f(4096, 64, 16, 2, CUDA) == "grouped"
    monkeypatch.setenv("MEDCARE_MOLORA_FORMULATION", "dense")
    assert f(128, 8, 16, 2, CPU) == "dense"


def test_triton_base_switches_to_cublas_for_many_tokens(monkeypatch):
    n = dispatch.THRESHOLDS["CUBLAS_BASE_MIN_TOKENS"].value
    assert dispatch.triton_base(n - 1) == "triton"
    assert dispatch.triton_base(n) == "cublas"
    monkeypatch.setenv("MEDCARE_TRITON_BASE", "triton")
    assert dispatch.triton_base(10**6) == "triton"
    monkeypatch.setenv("MEDCARE_TRITON_BASE", "cuBLAS")
    with pytest.raises(ValueError, match="MEDCARE_TRITON_BASE"):
        dispatch.triton_base(1)


def test_triton_path_is_grouped_only_for_wide_experts(monkeypatch):
    w = dispatch.THRESHOLDS["TRITON_GROUPED_MIN_WIDTH"].value
    assert dispatch.triton_path(w - 1, 8, 2) == "dense"
    assert dispatch.triton_path(w, 8, 2) == "grouped"
    assert dispatch.triton_path(w, 8, 8) == "dense", "k = E: nothing to skip"
    monkeypatch.setenv("MEDCARE_TRITON_MOLORA_PATH", "grouped")
    assert dispatch.triton_path(16, 8, 2) == "grouped"


def test_record_backends_says_which_backend_ran(monkeypatch):
    with be.record_backends() as seen:
        mk.molora_linear(*small(), top_k=2, scaling=1.0)
        mk.route(torch.randn(3, 4), 2, backend="reference")
    assert seen == {"molora_linear": {"torch"}, "route": {"reference"}}
    mk.route(torch.randn(3, 4), 2)
    assert "torch" not in seen["route"], "nothing is recorded after the block"


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
        be.resolve_backend("route", "auto", torch.device(device), F32)


def test_resolution_for_cuda_tensors_traces_without_graph_breaks():
    """What ``backend="auto"`` decides for CUDA tensors compiles with fullgraph=True (no GPU needed)."""
    def pick(x):
        name = be.resolve_backend("route", "auto", CUDA, F32, 16, True)
        reasons = [be.backend_unavailable_reason(b, CUDA) for b in be.BACKENDS]
        return x + be.BACKENDS.index(name) + sum(r is None for r in reasons)

    x = torch.zeros(3)
    torch.testing.assert_close(torch.compile(pick, fullgraph=True, backend="eager")(x), pick(x))


def test_unavailable_reason_names_what_is_missing(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in be.backend_unavailable_reason("triton", "cpu")
    assert be.backend_unavailable_reason("triton", "cuda") is None
    monkeypatch.setattr(be, "_TRITON_INSTALLED", False)  # looked up once, at import
    assert "triton package is not installed" in be.backend_unavailable_reason("triton", "cuda")


def test_float64_is_refused_by_triton_with_a_clear_error():
    if "triton" not in mk.available_backends("cpu"):
        pytest.skip("triton cannot run on CPU tensors here")
    x = torch.randn(4, 8, dtype=F64)
    with pytest.raises(TypeError, match=r"triton backend's lora_linear supports float16, bfloat16 and float32.*"
                                        r"backend='torch'"):
        mk.lora_linear(x, torch.randn(6, 8, dtype=F64), None, torch.randn(2, 8, dtype=F64),
                       torch.randn(6, 2, dtype=F64), scaling=1.0, backend="triton")
    with pytest.raises(TypeError, match="route supports float16"):
        mk.route(torch.randn(3, 4, dtype=F64), 2, backend="triton")


def test_importing_the_library_does_not_import_triton():
    code = "import sys, medcare_kernels; assert 'triton' not in sys.modules, 'triton imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_every_medcare_environment_variable_is_in_the_knob_table():
    """No MEDCARE_* variable is read anywhere without an entry in dispatch.KNOBS (name, choices, default)."""
    known = {k.name for k in dispatch.KNOBS}
    used = set()
    for path in [*ROOT.glob("medcare_kernels/**/*.py"), *ROOT.glob("medcare/**/*.py"), ROOT / "setup.py",
                 ROOT / "tests" / "conftest.py"]:
        used |= set(re.findall(r"[\"'](MEDCARE_[A-Z0-9_]+)[\"']", path.read_text()))
    assert used <= known, f"environment variables missing from dispatch.KNOBS: {sorted(used - known)}"
    setup = (ROOT / "setup.py").read_text()
    assert all(k.name in setup for k in dispatch.KNOBS if k.scope == "build")


def test_readme_tables_are_the_dispatch_tables():
    """README.md's knob and preference tables are generated from dispatch (``medcare_kernels.info --dispatch``
    prints them): a change to one without the other fails here."""
    from medcare_kernels.info import dispatch_markdown

    readme = (ROOT / "README.md").read_text()
    assert dispatch_markdown() in readme


@pytest.mark.gpu
def test_gpu_auto_runs_what_the_table_says():
    with be.record_backends() as seen:
        x = torch.randn(4, 16, device="cuda")
        mk.lora_linear(x, torch.randn(8, 16, device="cuda"), None, torch.randn(2, 16, device="cuda"),
                       torch.randn(8, 2, device="cuda"), scaling=1.0)
        mk.route(torch.randn(5, 8, device="cuda"), 2)
    assert seen["lora_linear"] == {dispatch.PREFERENCES["lora_linear"].order[0]}
    assert seen["route"] == {next(b for b in dispatch.PREFERENCES["route"].order
                                  if be.backend_unavailable_reason(b, "cuda") is None)}


def test_readme_layout_matches_the_tree():
    """Every path the README's layout section names exists, and every package and top-level module of the
    library is named there."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    named = {line.split()[0] for line in block.splitlines() if line.strip() and not line.startswith(" ")}
    for path in named:
        assert (ROOT / path).exists(), f"README layout names {path}, which does not exist"
    pkgs = ["medcare_kernels", "medcare_kernels/backends", "medcare"]
    for pkg in pkgs:
        for child in sorted((ROOT / pkg).iterdir()):
            if child.name.startswith("__") or child.suffix not in ("", ".py") or child.name.startswith("_C"):
                continue
            if child.is_dir() and not (child / "__init__.py").exists():
                continue
            rel = f"{pkg}/{child.name}" + ("/" if child.is_dir() else "")
            mentioned = rel in named or f"{pkg}/" in named and child.name.removesuffix(".py") in block
            assert mentioned, f"{rel} is not in the README's layout section"
