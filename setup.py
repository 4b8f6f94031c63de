"""Build script. Metadata lives in pyproject.toml; this file adds the optional CUDA extension.

The extension ``medcare_kernels._C`` (sources in ``csrc/``) registers ``torch.ops.medcare_kernels.*_cuda``.

Environment:

* ``MEDCARE_BUILD_CUDA=1``: build it, and fail loudly if it cannot be built (no torch, a CPU-only
  torch, no CUDA toolkit). ``MEDCARE_BUILD_CUDA=0``: skip it (pure-Python package). Unset: build it
  when torch is a CUDA build and a CUDA toolkit (nvcc) is found, else skip it with a message.
* ``TORCH_CUDA_ARCH_LIST``: GPU architectures, default ``8.0;9.0+PTX`` (A100, H100/H200, plus PTX
  that newer GPUs compile at load time).
* ``CUDA_HOME``: the CUDA toolkit (default: see :func:`_find_cuda_home`).
* ``MAX_JOBS``: parallel compile jobs (ninja).

torch must be importable while building: ``pip install --no-build-isolation ...`` (the extension is
compiled against the torch that will run it; its version and CUDA version must match at run time).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys

from setuptools import setup

ENV = "MEDCARE_BUILD_CUDA"
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
SOURCES = ["csrc/registration.cpp", "csrc/route.cu", "csrc/orthogonal_penalty.cu", "csrc/molora_decode.cu",
           "csrc/build_info.cu"]
HINT = "install a CUDA build of torch first and build with `pip install --no-build-isolation ...`"


def _say(msg: str) -> None:
    print(f"medcare-kernels setup: {msg}", file=sys.stderr, flush=True)


def _mode() -> str:
    flag = os.environ.get(ENV, "").strip().lower()
    if flag in ("", "auto"):
        return "auto"
    if flag in ("0", "false", "no", "off"):
        return "skip"
    if flag in ("1", "true", "yes", "on"):
        return "force"
    raise SystemExit(f"{ENV} must be 1 (build the CUDA extension), 0 (skip it) or unset (auto), got {flag!r}")


def _nvidia_header_dirs() -> list[str]:
    """Header folders of the pip-installed CUDA libraries (nvidia/cu13/include, nvidia/cublas/include, ...)
    that torch's CUDA headers include (cuBLAS, cuSPARSE) when the toolkit itself lacks them."""
    try:
        import nvidia  # namespace package installed with CUDA builds of torch
    except ImportError:
        return []
    found = []
    for root in list(getattr(nvidia, "__path__", [])):
        for inc in sorted(glob.glob(os.path.join(root, "*", "include"))):
            if any(os.path.exists(os.path.join(inc, h)) for h in ("cublas_v2.h", "cusparse.h")):
                found.append(inc)
    return found


def _find_cuda_home() -> str | None:
    """The CUDA toolkit: $CUDA_HOME (or $CUDA_PATH) when set; else the first folder with bin/nvcc and
    include/cuda_runtime.h among: the one of the nvcc on PATH (symlinks resolved), /usr/local/cuda,
    /usr/local/cuda-* (newest first). An nvcc wrapper script on PATH (e.g. /usr/local/bin/nvcc) does not
    make /usr/local a toolkit, which torch's own lookup would assume."""
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return env
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for home in candidates:
        if all(os.path.exists(os.path.join(home, *p)) for p in (("bin", "nvcc"), ("include", "cuda_runtime.h"))):
            return home
    return None


def _gencode_archs(flags: list[str]) -> tuple[str, str]:
    """('80,90', '90') from nvcc -gencode flags: architectures with machine code, and with PTX."""
    sass, ptx = [], []
    for f in flags:
        for kind, arch in re.findall(r"code=\[?(sm|compute)_(\w+)", f):
            (sass if kind == "sm" else ptx).append(arch)
    return ",".join(dict.fromkeys(sass)), ",".join(dict.fromkeys(ptx))


def _cuda_build():
    """(ext_modules, cmdclass, options) for setup(); empty when the extension is skipped."""
    mode = _mode()
    if mode == "skip":
        _say(f"{ENV}=0: building the pure-Python package without the CUDA extension")
        return [], {}, {}
    cuda_home = _find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        if mode == "force":
            raise SystemExit(f"{ENV}=1 but torch cannot be imported ({exc}): {HINT}") from exc
        _say(f"torch is not importable here ({exc}): skipping the CUDA extension ({HINT})")
        return [], {}, {}
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU-only build")
    if cuda_home:
        cpp_extension.CUDA_HOME = cuda_home  # in case it was imported (and looked) earlier
    if not cuda_home or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        problems.append(f"no CUDA toolkit with nvcc found (CUDA_HOME={cuda_home!r}); set CUDA_HOME or put nvcc on PATH")
    if problems:
        if mode == "force":
            raise SystemExit(f"{ENV}=1 but the CUDA extension cannot be built: " + "; ".join(problems))
        _say("skipping the CUDA extension: " + "; ".join(problems) + f" (set {ENV}=1 to make this an error)")
        return [], {}, {}

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    sass, ptx = _gencode_archs(cpp_extension._get_cuda_arch_flags())
    torch_version = torch.__version__.split("+")[0]
    # Searched after every -I folder (torch's, the toolkit's), so a full toolkit's own headers win.
    isystem = [arg for inc in _nvidia_header_dirs() for arg in ("-isystem", inc)]
    defines = [f"-DMEDCARE_SASS_ARCHS={sass}", f"-DMEDCARE_PTX_ARCHS={ptx}", f"-DMEDCARE_TORCH_VERSION={torch_version}"]
    limited = tuple(int(p) for p in re.findall(r"\d+", torch_version)[:2]) >= (2, 6)  # py_limited_api support
    _say(f"building medcare_kernels._C with CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST="
         f"{os.environ['TORCH_CUDA_ARCH_LIST']!r} (machine code: {sass or '-'}; PTX: {ptx or '-'}), "
         f"torch {torch.__version__}, MAX_JOBS={os.environ.get('MAX_JOBS', 'default')}")
    ext = cpp_extension.CUDAExtension(
        name="medcare_kernels._C",
        sources=SOURCES,
        extra_compile_args={
            "cxx": ["-O2", "-g0", *defines, *isystem],
            "nvcc": ["-O3", "-lineinfo", *isystem],
        },
        py_limited_api=limited,
    )
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    options = {"bdist_wheel": {"py_limited_api": "cp310"}} if limited else {}
    return [ext], cmdclass, options


ext_modules, cmdclass, options = _cuda_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass, options=options)
