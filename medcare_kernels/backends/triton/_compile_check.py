"""Compile every Triton kernel of the backend for real GPU targets, without a GPU.

``python -m medcare_kernels.backends.triton._compile_check [--arch 90 80] [--dtype bf16 fp32]`` lowers each kernel
(with representative MedCare constexprs and each of its autotune configs' tile shapes, or the first
few with ``--quick``) through TTIR/TTGIR/LLVM/PTX to a cubin with triton's bundled ``ptxas``. It
catches what the CPU interpreter cannot: constructs that do not lower, bad layouts, shared-memory
overflows of a config. Run it with ``TRITON_INTERPRET`` unset (the interpreter replaces the kernels).
Integer arguments are compiled unspecialised (a launch specialises strides equal to 1 and may then
pipeline deeper), so the shared-memory figures it prints are lower bounds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _cases(dt: str):
    from medcare_kernels.backends.triton import gemm, orthogonal_penalty, route, shrink

    L = shrink.Layout(8, 16, 32, 2, True)
    lay = dict(E_R=L.E_R, R_PAD=L.R_PAD, RS_PAD=L.RS_PAD, WR=L.WR)
    f32 = {"logits_ptr": "*fp32", "w_ptr": "*fp32", "z_ptr": "*fp32", "ws_ptr": "*fp32", "dl_ptr": "*fp32",
           "gl_ptr": "*fp32", "idx_ptr": "*i64", "hl_ptr": "*fp32", "meta_ptr": "*i64", "out_ptr": "*fp32",
           "g_ptr": "*fp32", "d_base_ptr": "*fp32", "d_orth_ptr": "*fp32", "c_ptr_red": "*fp32",
           "used_ptr": "*i8"}
    yield ("route_fwd", route._route_fwd_kernel, dict(BLOCK_T=64, BLOCK_E=8), f32, [(4, 2)])
    yield ("route_bwd", route._route_bwd_kernel, dict(BLOCK_T=64, BLOCK_E=8), f32, [(4, 2)])
    big = dict(lay, EL=L.EL, ROUTED=True, SHARED=True, ROUTER=True, HAS_LX=False, HAS_RBIAS=True, WRITE_H=True,
               SPLIT=1, BLOCK_T=128)
    for bt in (128, 32):  # the prefill token blocks (shrink._block_t); 64 and 16 are compiled below
        yield (f"shrink_fwd[BLOCK_T={bt}]", shrink._shrink_fwd_kernel, dict(big, BLOCK_T=bt), f32, None)
        yield (f"shrink_bwd[BLOCK_T={bt}]", shrink._shrink_bwd_kernel,
               dict(lay, EL=L.EL, ROUTED=True, SHARED=True, HAS_GL=False, SPLIT=1, BLOCK_T=bt), f32, None)
    for split in (1, 4):
        for routed, shared, router in ((True, True, True), (False, True, False)):
            meta = dict(lay, EL=L.EL, ROUTED=routed, SHARED=shared, ROUTER=router, HAS_LX=False, HAS_RBIAS=True,
                        WRITE_H=True, SPLIT=split, BLOCK_T=64 if split == 1 else 16)
            yield (f"shrink_fwd[split={split},routed={routed}]", shrink._shrink_fwd_kernel, meta, f32, None)
            bmeta = dict(lay, EL=L.EL, ROUTED=routed, SHARED=shared, HAS_GL=True, SPLIT=split,
                         BLOCK_T=64 if split == 1 else 16)
            yield (f"shrink_bwd[split={split},routed={routed}]", shrink._shrink_bwd_kernel, bmeta, f32, None)
    red = dict(lay, EL=L.EL, ROUTED=True, SHARED=True, ROUTER=True, HAS_RBIAS=True, WRITE_H=True, BLOCK_T=16)
    yield ("shrink_fwd_reduce", shrink._shrink_fwd_reduce_kernel, red, f32, [(4, 1)])
    redb = dict(lay, ROUTED=True, SHARED=True, HAS_GL=True, BLOCK_T=16)
    yield ("shrink_bwd_reduce", shrink._shrink_bwd_reduce_kernel, redb, f32, [(4, 1)])
    for base, acc, router in ((True, False, False), (False, True, False), (True, False, True)):
        meta = dict(lay, NL_PAD=16, KP=2, BKE=16, BKS=32, BKL=16, BASE=base, ROUTED=True, SHARED=True, ROUTER=router,
                    HAS_BIAS=base, ACC=acc, SKIP=True, USED=True)
        yield (f"ext_gemm[base={base},acc={acc},router={router}]", gemm._ext_gemm_kernel, meta, f32, None)
    yield ("token_reduce", gemm._token_reduce_kernel, dict(SPLIT=4), {"c_ptr": "*fp32"}, None)
    yield ("penalty_fwd", orthogonal_penalty._pen_fwd_kernel, dict(BR1=32, BR2=32, BK=64), f32, [(4, 2)])
    yield ("penalty_bwd", orthogonal_penalty._pen_bwd_kernel,
           dict(NEED_BASE=True, NEED_ORTH=True, BR1=32, BR2=32, BK=64), f32, [(4, 2)])
    try:
        from medcare_kernels.backends.triton import grouped
    except ImportError:
        return
    if hasattr(grouped, "compile_cases"):
        yield from grouped.compile_cases(dt, f32)


_SMEM = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # opt-in shared memory per block, bytes


def _compile(fn, meta: dict, ptr_types: dict, dt: str, arch: int, warps: int, stages: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit = fn.fn if hasattr(fn, "configs") else fn  # unwrap an Autotuner
    sig, const = {}, {}
    for p in jit.params:
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
            const[name] = meta[name]
        elif name.endswith("_ptr"):
            sig[name] = ptr_types.get(name, f"*{dt}")
        elif name == "scaling":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    src = ASTSource(fn=jit, signature=sig, constexprs=const)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(_SMEM))
    ap.add_argument("--dtype", nargs="+", default=["bf16"], choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--quick", action="store_true", help="one autotune config per kernel")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the interpreter replaces the kernels", file=sys.stderr)
        return 2
    failures = 0
    for dt in args.dtype:
        for name, fn, meta, ptrs, configs in _cases(dt):
            if configs is None:
                tuned = [(c.kwargs, c.num_warps, c.num_stages) for c in fn.configs]
            else:
                tuned = [({}, w, s) for w, s in configs]
            if args.quick:
                tuned = tuned[:1]
            for arch in args.arch:
                for kw, warps, stages in tuned:
                    t0 = time.perf_counter()
                    try:
                        out = _compile(fn, {**meta, **kw}, ptrs, dt, arch, warps, stages)
                        smem = int(getattr(out.metadata, "shared", 0))
                        status = f"ok smem={smem // 1024}KiB"
                        if smem > _SMEM[arch]:  # the autotuner skips such a config on that GPU
                            status += " (over the SM's shared memory: skipped there)"
                    except Exception as exc:  # noqa: BLE001 - report every failure, keep going
                        status = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                        failures += 1
                    print(f"sm_{arch} {dt} {name} {kw} w{warps} s{stages}: {status} ({time.perf_counter() - t0:.1f}s)",
                          flush=True)
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
