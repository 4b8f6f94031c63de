// What this binary was built for, reported by medcare_kernels._C (registration.cpp): the GPU
// architectures with machine code (SASS) and with PTX, the virtual architectures nvcc compiled, and the
// torch version. Plain C++, included by the host-compiled registration.cpp too; named .cuh like every
// header here, the suffix the build's file lists (Makefile, MANIFEST.in) pick up.
#pragma once

// A macro's expansion as a string literal (two steps, so the argument is expanded first).
#define MEDCARE_STR2(...) #__VA_ARGS__
#define MEDCARE_STR(...) MEDCARE_STR2(__VA_ARGS__)

// Set by setup.py from the -gencode flags it passes to nvcc (e.g. 80,90 and 90 for
// TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX") and from torch.__version__; plain tokens, no quoting needed.
#ifndef MEDCARE_SASS_ARCHS
#define MEDCARE_SASS_ARCHS
#endif
#ifndef MEDCARE_PTX_ARCHS
#define MEDCARE_PTX_ARCHS
#endif
#ifndef MEDCARE_TORCH_VERSION
#define MEDCARE_TORCH_VERSION unknown
#endif

namespace medcare {

// The virtual architectures nvcc compiled for, e.g. "800,900" (__CUDA_ARCH_LIST__, nvcc >= 11.5; ""
// with an older nvcc). Defined in build_info.cu: only nvcc defines __CUDA_ARCH_LIST__, the host
// compiler that builds registration.cpp does not.
const char* device_arch_list();

}  // namespace medcare
