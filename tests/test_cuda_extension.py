"""The compiled CUDA extension without a GPU: it is built wherever nvcc is, imports, registers every op
with the expected schema next to the Python custom ops, checks its arguments (shapes, dtypes, layout,
device) with errors that name the argument, has fake implementations, and the ``cuda`` backend is
selected, refused or explained as documented."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import medcare_kernels as mk
import medcare_kernels.backends as be
from medcare_kernels import _extension

ROOT = Path(__file__).resolve().parents[1]
ops = torch.ops.medcare_kernels


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [os.path.join(home, "bin", "nvcc")] if home else []
    candidates += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.path.exists(c)), None)


needs_ext = pytest.mark.skipif(not _extension.loaded() and _nvcc() is None,
                               reason="nvcc is not available here, so the CUDA extension cannot be built")


def test_extension_is_built_wherever_nvcc_is():
    """CI has nvcc: `make test` must have built and loaded the extension, not skipped it."""
    if _nvcc() is None:
        pytest.skip("nvcc is not available here")
    assert _extension.loaded(), \
        f"nvcc is at {_nvcc()} but the extension is not loaded: {_extension.unavailable_reason()}"


@needs_ext
@pytest.mark.parametrize("name", list(_extension.OPS))
def test_op_registered_with_schema(name):
    op = getattr(ops, name).default
    assert str(op._schema) == "medcare_kernels::" + _extension.OPS[name]
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Meta"), "fake implementation registered"


@needs_ext
def test_python_custom_ops_keep_their_schemas():
    """The compiled ops join the namespace (a FRAGMENT) without replacing the Python custom ops."""
    for name in ("route", "route_backward", "molora_linear", "molora_linear_backward", "lora_linear",
                 "orthogonal_penalty", "orthogonal_penalty_backward"):
        schema = str(getattr(ops, name).default._schema)
        assert schema.startswith(f"medcare_kernels::{name}(") and "str backend" in schema
    assert not set(_extension.OPS) & {"route", "route_backward", "molora_linear", "molora_linear_backward",
                                      "lora_linear", "orthogonal_penalty", "orthogonal_penalty_backward"}


@needs_ext
def test_build_info_matches_this_build():
    info = _extension.build_info()
    assert info["loaded"] and Path(info["path"]).parent == ROOT / "medcare_kernels"
    assert info["built_with_torch"] == torch.__version__.split("+")[0]
    assert info["built_with_cuda"].split(".")[0] == torch.version.cuda.split(".")[0]
    archs = info["archs"]
    assert archs["sass"], "machine code for at least one architecture"
    # nvcc's own list of virtual architectures = everything that got machine code or PTX
    assert sorted(info["virtual_archs"]) == sorted(set(archs["sass"]) | set(archs["ptx"]))
    wanted = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if wanted is None:  # the default of setup.py
        assert archs == {"sass": ["8.0", "9.0"], "ptx": ["9.0"]}
    assert _extension.runs_on((9, 0)) == ("9.0" in archs["sass"] or "9.0" in archs["ptx"])
    assert not _extension.runs_on((7, 0)), "no kernels for a Volta GPU"


# ------------------------------------------------------------------------------------------------
# Argument checks in C++: each case names the argument. CPU tensors of the right shapes reach the
# device check, which comes last; wrong shapes/dtypes/layouts fail before it.
# ------------------------------------------------------------------------------------------------

def decode_args(T=3, d_in=16, d_out=12, E=4, r=2, r_s=4, dtype=torch.float32, **change):
    args = dict(x=torch.randn(T, d_in, dtype=dtype), weight=torch.randn(d_out, d_in, dtype=dtype),
                bias=torch.randn(d_out, dtype=dtype), router_weight=torch.randn(E, d_in),
                router_bias=torch.randn(E), lora_A=torch.randn(E, r, d_in), lora_B=torch.randn(E, d_out, r),
                shared_A=torch.randn(r_s, d_in), shared_B=torch.randn(d_out, r_s), lora_x=None, top_k=2,
                scaling=0.5)
    args.update(change)
    return list(args.values())


def route_bwd_args(T=3, E=5, k=2, **change):
    args = dict(grad_weights=torch.randn(T, k), logits=torch.randn(T, E), weights=torch.rand(T, k),
                indices=torch.zeros(T, k, dtype=torch.long))
    args.update(change)
    return list(args.values())


def penalty_args(**change):
    args = dict(base_A=[torch.randn(4, 8), torch.randn(4, 5)], orth_A=[torch.randn(2, 8), torch.randn(3, 5)])
    args.update(change)
    return list(args.values())


T_ = torch.randn
CASES = [
    # route_fwd_cuda
    ("route_fwd_cuda", [T_(3, 4), 2], ValueError, r"route_fwd_cuda: logits must be a CUDA tensor, got a tensor on cpu"),
    ("route_fwd_cuda", [T_(3, 4, 1), 2], ValueError, r"logits must be 2-D \[T, E\], got shape \[3, 4, 1\]"),
    ("route_fwd_cuda", [T_(3, 4), 5], ValueError, r"top_k must satisfy 1 <= top_k <= E = 4, got 5"),
    ("route_fwd_cuda", [T_(3, 4), 0], ValueError, r"top_k must satisfy 1 <= top_k <= E = 4, got 0"),
    ("route_fwd_cuda", [T_(3, 0), 1], ValueError, r"logits must have at least one expert"),
    ("route_fwd_cuda", [T_(3, 4, dtype=torch.float64), 2], TypeError,
     r"logits must be float16, bfloat16 or float32, got Double"),
    ("route_fwd_cuda", [T_(4, 3).T, 2], ValueError, r"logits must be contiguous"),
    # route_bwd_cuda
    ("route_bwd_cuda", route_bwd_args(), ValueError, r"route_bwd_cuda: grad_weights must be a CUDA tensor"),
    ("route_bwd_cuda", route_bwd_args(weights=T_(3, 3)), ValueError,
     r"grad_weights must have shape \[T, k\] = \[3, 3\], got \[3, 2\]"),
    ("route_bwd_cuda", route_bwd_args(indices=torch.zeros(3, 2, dtype=torch.int32)), TypeError,
     r"indices must be Long, got Int"),
    ("route_bwd_cuda", route_bwd_args(grad_weights=T_(3, 2, dtype=torch.float16)), TypeError,
     r"grad_weights must be Float, got Half"),
    ("route_bwd_cuda", route_bwd_args(weights=T_(3, 6)), ValueError, r"weights must have 1 <= k <= E = 5 columns"),
    ("route_bwd_cuda", route_bwd_args(logits=T_(2, 5)), ValueError, r"weights must have shape \[T, k\] = \[2, 2\]"),
    # orthogonal_penalty_fwd_cuda / _bwd_cuda
    ("orthogonal_penalty_fwd_cuda", penalty_args(), ValueError,
     r"orthogonal_penalty_fwd_cuda: base_A\[0\] must be a CUDA tensor"),
    ("orthogonal_penalty_fwd_cuda", penalty_args(orth_A=[T_(2, 8)]), ValueError, r"must have the same length"),
    ("orthogonal_penalty_fwd_cuda", penalty_args(orth_A=[T_(2, 8), T_(3, 6)]), ValueError,
     re.escape("base_A[1] [r1, d] and orth_A[1] [r2, d] must share d, got [4, 5] and [3, 6]")),
    ("orthogonal_penalty_fwd_cuda", penalty_args(orth_A=[T_(2, 8), T_(3, 5, 1)]), ValueError,
     re.escape("orth_A[1] must be 2-D [r2, d], got shape [3, 5, 1]")),
    ("orthogonal_penalty_fwd_cuda", penalty_args(orth_A=[T_(2, 8), T_(3, 5, dtype=torch.bfloat16)]), TypeError,
     re.escape("orth_A[1] must have the dtype of base_A[0] (Float), got BFloat16")),
    ("orthogonal_penalty_fwd_cuda", penalty_args(base_A=[T_(8, 4).T, T_(4, 5)]), ValueError,
     re.escape("base_A[0] must be contiguous")),
    ("orthogonal_penalty_bwd_cuda", [torch.ones(()), *penalty_args(), True, True], ValueError,
     r"orthogonal_penalty_bwd_cuda: base_A\[0\] must be a CUDA tensor"),
    ("orthogonal_penalty_bwd_cuda", [torch.ones(2), *penalty_args(), True, True], ValueError,
     r"grad must hold one value"),
    ("orthogonal_penalty_bwd_cuda", [torch.ones((), dtype=torch.float64), *penalty_args(), True, False], TypeError,
     r"grad must be Float, got Double"),
    # molora_decode_cuda
    ("molora_decode_cuda", decode_args(), ValueError, r"molora_decode_cuda: x must be a CUDA tensor"),
    ("molora_decode_cuda", decode_args(x=T_(3, 16, 1)), ValueError, r"x must be 2-D \[T, d_in\]"),
    ("molora_decode_cuda", decode_args(x=T_(16, 3).T), ValueError, r"x must be contiguous"),
    ("molora_decode_cuda", decode_args(weight=T_(12, 15)), ValueError,
     r"weight must have shape \[d_out, d_in\] = \[12, 16\], got \[12, 15\]"),
    ("molora_decode_cuda", decode_args(bias=T_(11)), ValueError, r"bias must have shape \[d_out\] = \[12\]"),
    ("molora_decode_cuda", decode_args(weight=T_(12, 16, dtype=torch.float16)), TypeError,
     r"weight must have the dtype of x \(Float\), got Half"),
    ("molora_decode_cuda", decode_args(router_weight=T_(3, 16)), ValueError,
     r"router_weight must have shape \[E, d_in\] = \[4, 16\]"),
    ("molora_decode_cuda", decode_args(router_bias=T_(5)), ValueError, r"router_bias must have shape \[E\] = \[4\]"),
    ("molora_decode_cuda", decode_args(lora_A=T_(4, 2, 15)), ValueError,
     r"lora_A must have shape \[E, r, d_in\] = \[4, 2, 16\]"),
    ("molora_decode_cuda", decode_args(lora_B=T_(4, 12, 3)), ValueError,
     r"lora_B must have shape \[E, d_out, r\] = \[4, 12, 2\]"),
    ("molora_decode_cuda", decode_args(lora_B=T_(4, 12, 2, dtype=torch.float16)), TypeError,
     r"lora_B must have the dtype of lora_A"),
    ("molora_decode_cuda", decode_args(dtype=torch.float16, lora_A=T_(4, 2, 16, dtype=torch.bfloat16)), TypeError,
     r"lora_A must have the dtype of x \(Half\) or float32, got BFloat16"),
    ("molora_decode_cuda", decode_args(shared_B=None), ValueError, r"shared_A and shared_B must be given together"),
    ("molora_decode_cuda", decode_args(shared_B=T_(12, 5)), ValueError,
     r"shared_B must have shape \[d_out, r_s\] = \[12, 4\]"),
    ("molora_decode_cuda", decode_args(lora_x=T_(3, 15)), ValueError, r"lora_x must have shape x.shape"),
    ("molora_decode_cuda", decode_args(top_k=5), ValueError, r"top_k must satisfy 1 <= top_k <= E = 4, got 5"),
    ("molora_decode_cuda", decode_args(r=7000), ValueError,
     r"exceed the decode kernels' shared memory"),
]


@needs_ext
@pytest.mark.parametrize("name,args,err,pattern", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_compiled_op_checks_its_arguments(name, args, err, pattern):
    with pytest.raises(err, match=pattern):
        getattr(ops, name)(*args)


@needs_ext
def test_fake_implementations_give_shapes():
    m = "meta"
    w, i = ops.route_fwd_cuda(torch.empty(5, 8, device=m, dtype=torch.bfloat16), 3)
    assert (w.shape, w.dtype, i.shape, i.dtype) == ((5, 3), torch.float32, (5, 3), torch.int64)
    g = ops.route_bwd_cuda(torch.empty(5, 3, device=m), torch.empty(5, 8, device=m), w, i)
    assert g.shape == (5, 8) and g.dtype == torch.float32
    base = [torch.empty(4, 8, device=m), torch.empty(2, 5, device=m)]
    orth = [torch.empty(3, 8, device=m), torch.empty(2, 5, device=m)]
    assert ops.orthogonal_penalty_fwd_cuda(base, orth).shape == ()
    db, do = ops.orthogonal_penalty_bwd_cuda(torch.empty((), device=m), base, orth, False, True)
    assert db == [] and [t.shape for t in do] == [(3, 8), (2, 5)]
    args = [t.to(m) if isinstance(t, torch.Tensor) else t for t in decode_args(T=3, dtype=torch.float16)]
    args[0], args[1], args[2] = (torch.empty(3, 16, device=m, dtype=torch.float16),
                                 torch.empty(12, 16, device=m, dtype=torch.float16),
                                 torch.empty(12, device=m, dtype=torch.float16))
    y, logits, weights, indices, z = ops.molora_decode_cuda(*args)
    assert (y.shape, y.dtype) == ((3, 12), torch.float16)
    assert logits.shape == (3, 4) and weights.shape == (3, 2) and indices.dtype == torch.int64
    assert z.shape == (3, 2 * 2 + 4) and z.dtype == torch.float32


@needs_ext
def test_compiled_ops_trace_with_fake_tensors():
    """The fakes let graph tracers (torch.compile's, make_fx) see through the compiled ops without running them."""
    def f(logits):
        return ops.route_fwd_cuda(logits, 2)

    gm = torch.fx.experimental.proxy_tensor.make_fx(f, tracing_mode="fake")(torch.randn(6, 4))
    assert "medcare_kernels.route_fwd_cuda" in gm.code


# ------------------------------------------------------------------------------------------------
# The backend: availability, explicit requests, auto's choices.
# ------------------------------------------------------------------------------------------------

def test_cuda_backend_is_known_but_not_available_on_cpu():
    assert "cuda" in mk.BACKENDS
    assert "cuda" not in mk.available_backends("cpu")
    if not torch.cuda.is_available():
        assert "cuda" not in mk.available_backends()
    reason = be.backend_unavailable_reason("cuda", "cpu")
    assert reason is not None


def test_asking_for_cuda_with_cpu_tensors_raises():
    with pytest.raises(mk.BackendUnavailableError,
                       match=r"backend='cuda' cannot run route: .*(CUDA tensors only|not built)"):
        mk.route(torch.randn(3, 4), 2, backend="cuda")
    with pytest.raises(mk.BackendUnavailableError, match=r"backend='cuda' cannot run orthogonal_penalty"):
        mk.orthogonal_penalty([torch.randn(2, 4)], [torch.randn(2, 4)], backend="cuda")


def test_missing_extension_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_extension, "_module", None)
    monkeypatch.setattr(_extension, "_error", "the compiled CUDA extension medcare_kernels._C is not built")
    reason = be.backend_unavailable_reason("cuda", "cuda")
    assert "not built" in reason and "MEDCARE_BUILD_CUDA=1 pip install --no-build-isolation -e ." in reason
    assert "make wheel" in reason
    with pytest.raises(mk.BackendUnavailableError, match=r"MEDCARE_BUILD_CUDA=1"):
        be.resolve_backend("molora_linear", "cuda", torch.device("cuda"), torch.float32)
    monkeypatch.setenv("MEDCARE_BACKEND", "cuda")
    with pytest.raises(mk.BackendUnavailableError,
                       match=r"MEDCARE_BACKEND='cuda' cannot run route: .*MEDCARE_BUILD_CUDA"):
        mk.route(torch.randn(3, 4), 2)


def test_env_cuda_on_cpu_tensors_raises(monkeypatch):
    monkeypatch.setenv("MEDCARE_BACKEND", "cuda")
    with pytest.raises(mk.BackendUnavailableError, match=r"MEDCARE_BACKEND='cuda' cannot run molora_linear"):
        mk.molora_linear(torch.randn(2, 8), torch.randn(4, 8), None, torch.randn(3, 8), None,
                         torch.randn(3, 2, 8), torch.randn(3, 4, 2), top_k=1, scaling=1.0)


@pytest.mark.gpu
def test_cuda_backend_runs_on_a_gpu_machine():
    """On a GPU machine the extension must have been built (make gpu-check builds it first)."""
    reason = be.backend_unavailable_reason("cuda", "cuda")
    assert reason is None, f"the cuda backend cannot run on this GPU machine: {reason}"


@pytest.mark.gpu
def test_compiled_op_names_the_tensor_on_the_wrong_device():
    E, r, d_in, d_out = 4, 2, 16, 12
    args = [torch.randn(4, d_in), torch.randn(d_out, d_in), torch.randn(d_out), torch.randn(E, d_in),
            torch.randn(E), torch.randn(E, r, d_in), torch.randn(E, d_out, r), torch.randn(4, d_in),
            torch.randn(d_out, 4)]
    args = [t.to("cuda") for t in args]
    args[6] = args[6].cpu()  # lora_B
    with pytest.raises(ValueError, match=r"molora_decode_cuda: lora_B must be a CUDA tensor, got a tensor on cpu"):
        ops.molora_decode_cuda(*args, None, 2, 1.0)
    with pytest.raises(ValueError, match=r"route_bwd_cuda: weights must be a CUDA tensor"):
        ops.route_bwd_cuda(torch.randn(3, 2, device="cuda"), torch.randn(3, 5, device="cuda"), torch.rand(3, 2),
                           torch.zeros(3, 2, dtype=torch.long, device="cuda"))


# ------------------------------------------------------------------------------------------------
# The info command and the build script.
# ------------------------------------------------------------------------------------------------

def run(args, env=None, timeout=120):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(args, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def test_info_reports_versions_backends_and_archs():
    proc = run([sys.executable, "-m", "medcare_kernels.info", "--json"])
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["versions"]["torch"] == torch.__version__
    assert info["versions"]["medcare-kernels"] == mk.__version__
    assert set(info["backends"]["available"]) == set(mk.available_backends())
    assert info["extension"]["loaded"] == _extension.loaded()
    if _extension.loaded():
        assert info["extension"]["archs"] == _extension.compiled_archs()
    if not torch.cuda.is_available():
        assert info["gpu"] is None
        assert "cuda" in info["backends"]["unavailable"]
    text = run([sys.executable, "-m", "medcare_kernels.info"]).stdout
    assert "backends for" in text and "CUDA extension (medcare_kernels._C)" in text
    if _extension.loaded():
        assert "machine code for: sm_" in text


def test_info_require_cuda_fails_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    proc = run([sys.executable, "-m", "medcare_kernels.info", "--require-cuda"])
    assert proc.returncode == 1 and "cannot run here" in proc.stderr


@pytest.mark.parametrize("env,code,message", [
    ({"MEDCARE_BUILD_CUDA": "maybe"}, 1, "MEDCARE_BUILD_CUDA must be 1"),
    ({"MEDCARE_BUILD_CUDA": "0"}, 0, "MEDCARE_BUILD_CUDA=0: building the pure-Python package"),
    ({"MEDCARE_BUILD_CUDA": "1", "CUDA_HOME": "/nonexistent-cuda", "PATH": "/usr/bin:/bin"}, 1,
     "the CUDA extension cannot be built: .*no CUDA toolkit with nvcc found"),
    ({"CUDA_HOME": "/nonexistent-cuda", "PATH": "/usr/bin:/bin"}, 0, "skipping the CUDA extension: .*no CUDA toolkit"),
])
def test_setup_py_build_switch(env, code, message):
    """MEDCARE_BUILD_CUDA=1 fails loudly when it cannot build, 0 skips, unset builds only when it can."""
    proc = run([sys.executable, "setup.py", "--name"], env=env)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert re.search(message, proc.stderr), proc.stderr[-2000:]
