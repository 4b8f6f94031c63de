// Shared helpers for the medcare_kernels CUDA extension: argument checks that name the argument,
// element types and conversions, vector loads, warp reductions.
//
// Headers are kept lean on purpose (no torch/extension.h, no ATen/ATen.h, no cuBLAS): the whole
// extension must compile in a few minutes on a 2-core CI machine.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

namespace medcare {

// ------------------------------------------------------------------------------------------------
// Argument checks. Every message starts with the op's qualified name and names the argument.
// Shape/rank/contiguity/device problems raise ValueError in Python, dtype problems TypeError,
// matching the Python ops (medcare_kernels/_checks.py). Device checks come last in each op so that
// the shape and dtype checks can be exercised on a machine without a GPU.
// ------------------------------------------------------------------------------------------------

inline std::string shape_str(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(sizes[i]);
  }
  return s + "]";
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim, const char* meaning) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must be ", dim, "-D ", meaning, ", got shape ",
                    shape_str(t.sizes()));
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t, std::initializer_list<int64_t> want,
                        const char* meaning) {
  std::vector<int64_t> w(want);
  TORCH_CHECK_VALUE(t.sizes().vec() == w, op, ": ", name, " must have shape ", meaning, " = ",
                    shape_str(at::IntArrayRef(w)), ", got ", shape_str(t.sizes()));
}

inline void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous (call .contiguous() first)");
}

inline bool is_kernel_float(at::ScalarType s) {
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}

inline void check_float_dtype(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(is_kernel_float(t.scalar_type()), op, ": ", name,
                   " must be float16, bfloat16 or float32, got ", t.scalar_type());
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType want) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, op, ": ", name, " must be ", want, ", got ", t.scalar_type());
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const char* other_name,
                             const at::Tensor& other) {
  TORCH_CHECK_TYPE(t.scalar_type() == other.scalar_type(), op, ": ", name, " must have the dtype of ", other_name,
                   " (", other.scalar_type(), "), got ", t.scalar_type());
}

// `t` must be a CUDA tensor on `device` (the first tensor argument's device).
inline void check_cuda(const char* op, const char* name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got a tensor on ", t.device(),
                    " (the cuda backend runs CUDA tensors only; use backend='torch' on the CPU)");
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " is on ", t.device(), " but the first argument is on ",
                    device, ": put every tensor on one device");
}

// ------------------------------------------------------------------------------------------------
// Element types: kernels are instantiated for float, __half and __nv_bfloat16 only.
// ------------------------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Eight consecutive elements as floats, with 16-byte loads (the pointer must be 16-byte aligned).
__device__ __forceinline__ void load8(const float* p, float (&out)[8]) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  const float4 b = *reinterpret_cast<const float4*>(p + 4);
  out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
  out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
}
template <typename T2, typename T>
__device__ __forceinline__ void load8_16bit(const T* p, float (&out)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T2* h = reinterpret_cast<const T2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = to_float(h[i].x);
    out[2 * i + 1] = to_float(h[i].y);
  }
}
__device__ __forceinline__ void load8(const __half* p, float (&out)[8]) { load8_16bit<__half2>(p, out); }
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&out)[8]) {
  load8_16bit<__nv_bfloat162>(p, out);
}

inline bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

// ------------------------------------------------------------------------------------------------
// Warp reductions (butterfly: every lane gets the result; a fixed order, so deterministic).
// ------------------------------------------------------------------------------------------------

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// The dot product of two length-n rows, in float32, by one warp. `vec`: both rows are 16-byte
// aligned and n % 8 == 0, so every lane reads eight elements per step with 16-byte loads.
template <typename TA, typename TB>
__device__ __forceinline__ float warp_dot(const TA* a, const TB* b, int64_t n, bool vec, int lane) {
  float acc = 0.f;
  if (vec) {
    for (int64_t i = 8 * lane; i < n; i += 8 * 32) {
      float va[8], vb[8];
      load8(a + i, va);
      load8(b + i, vb);
#pragma unroll
      for (int q = 0; q < 8; ++q) acc = fmaf(va[q], vb[q], acc);
    }
  } else {
    for (int64_t i = lane; i < n; i += 32) acc = fmaf(to_float(a[i]), to_float(b[i]), acc);
  }
  return warp_sum(acc);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace medcare

// Kernels are instantiated for three element types; `KERNEL_TYPE` names the CUDA type inside.
#define MEDCARE_DISPATCH_FLOAT(stype, op, KERNEL_TYPE, ...)                                  \
  [&] {                                                                                      \
    switch (stype) {                                                                         \
      case at::kFloat: {                                                                     \
        using KERNEL_TYPE = float;                                                           \
        return __VA_ARGS__();                                                                \
      }                                                                                      \
      case at::kHalf: {                                                                      \
        using KERNEL_TYPE = __half;                                                          \
        return __VA_ARGS__();                                                                \
      }                                                                                      \
      case at::kBFloat16: {                                                                  \
        using KERNEL_TYPE = __nv_bfloat16;                                                   \
        return __VA_ARGS__();                                                                \
      }                                                                                      \
      default:                                                                               \
        TORCH_CHECK_TYPE(false, op, ": unsupported dtype ", stype);                          \
    }                                                                                        \
  }()
