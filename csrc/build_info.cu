// device_arch_list (see build_info.cuh), in a translation unit of its own that nvcc compiles with the
// same -gencode flags as the kernels, so __CUDA_ARCH_LIST__ names exactly what they were built for.
#include "build_info.cuh"

namespace medcare {

const char* device_arch_list() {
#ifdef __CUDA_ARCH_LIST__
  return MEDCARE_STR(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

}  // namespace medcare
